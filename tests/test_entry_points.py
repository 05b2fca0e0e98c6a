"""How users come in: notebook parameters and output folders, the benchmark's command line, silent
failures (NaN), wrapped models in checkpoints. Each test replays a way in that once failed."""
import os

import pytest
import torch

import snlp_lab
from snlp_lab.solvers.grammar import parse_config
from snlp_lab.measurement import bench
from snlp_lab.solvers import jacobian
from snlp_lab.core import checks as params
from snlp_lab.lab import outputs
import snlp_lab.bench as bench_cmd
from snlp_lab.lab import report
from snlp_lab.models.checkpoint import load_checkpoint, save_checkpoint
from snlp_lab.decoding.decoder import Decoder, generate
from snlp_lab.lab.experiments import PROFILES
from snlp_lab.core.paths import repo_root
from snlp_lab.solvers.solver import NonFiniteError

ROOT = repo_root()


# ------------------------------------------------------------------------------------------ notebook parameters
@pytest.mark.parametrize("value, item_type, expected", [
    ("idn:K=1:n=4", str, ["idn:K=1:n=4"]), (["sequential", "idn:K=2"], str, ["sequential", "idn:K=2"]),
    (16, int, [16]), ("16", int, [16]), ("[16]", int, [16]), ("[16, 32]", int, [16, 32]), ((8, 16), int, [8, 16]),
    ("['idn:K=1', 'sequential']", str, ["idn:K=1", "sequential"]), (0.5, float, [0.5])])
def test_list_parameters_take_one_value_or_a_list(value, item_type, expected):
    assert params.as_list("p", value, item_type) == expected


@pytest.mark.parametrize("value, item_type", [({"a": 1}, str), ("[16", int), ("sixteen", int), ([], str),
                                              (2.5, int), ([True], int)])
def test_bad_list_parameters_name_the_yaml_form(value, item_type):
    with pytest.raises(ValueError, match='-y "p: \\[16, 32\\]"'):
        params.as_list("p", value, item_type)


def test_scalar_parameters_are_checked():
    assert params.check_int("power_iters", "20") == 20
    for bad in (0, -1, 2.5, "x", True):
        with pytest.raises(ValueError, match="power_iters must be"):
            params.check_int("power_iters", bad)
    with pytest.raises(ValueError, match="must be a finite number"):
        params.check_float("lr", float("inf"), 0)
    with pytest.raises(ValueError, match="does not exist"):
        params.check_path("checkpoint", "/nonexistent/run")
    assert params.check_path("checkpoint", "") is None


def test_library_refuses_zero_sizes(tiny, idx):
    h, ctx = tiny.embed(idx)
    f = jacobian.layer_fn(tiny, 0, ctx)
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        jacobian.sigma_max(f, h, iters=0)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="probes must be an integer >= 1"):
            jacobian.hutchinson_diag(f, h, probes=bad)


def test_output_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))
    quiet = lambda s: None
    # only the make-figures profiles write the committed folders by default
    assert outputs.output_dirs("cpu", log=quiet) == ((ROOT / "figures").resolve(), (ROOT / "reports").resolve())
    fig, rep = outputs.output_dirs("smoke", log=quiet)
    assert fig == (tmp_path / "cache/scratch/smoke/figures").resolve() and rep.parent == fig.parent
    assert outputs.output_dirs("cpu", scratch=True, log=quiet)[0].is_relative_to(tmp_path)
    # relative paths are taken from the repository root, whatever the working directory
    monkeypatch.chdir(tmp_path)
    fig, rep = outputs.output_dirs("smoke", "out/f", str(tmp_path / "r"), log=quiet)
    assert fig == (ROOT / "out/f").resolve() and rep == tmp_path / "r"
    fig.rmdir(), fig.parent.rmdir()


def test_index_follows_the_readings(tmp_path):
    rep, fig = tmp_path / "reports", tmp_path / "figures"
    report.add_reading(rep, "speedup", "speedup_0.5b", "reading one")
    report.add_reading(rep, "speedup", "speedup_0.5b", "reading two")
    index = (rep / "README.md").read_text()
    assert "`speedup_0.5b`" in index and "reading two" in index and "reading one" not in index
    report.write_run_times(rep, "cpu", {"speedup": 12.0})
    report.add_reading(rep, "frontier", "frontier", "three")
    assert "wall time per notebook: speedup 12 s" in (rep / "README.md").read_text()


def test_notebook_from_the_repo_root_writes_to_scratch(tmp_path):
    """`papermill nb/speedup.ipynb out.ipynb -p profile smoke ...` from the repository root, as the README
    shows: list parameters as a single value and as a string; outputs in the scratch folder only."""
    import papermill as pm
    env = os.environ.copy()
    os.environ["SNLP_CACHE"] = str(tmp_path / "cache")
    before = set(ROOT.parent.iterdir()), {p: p.stat().st_mtime for p in (ROOT / "figures").iterdir()}
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        pm.execute_notebook("nb/speedup.ipynb", str(tmp_path / "out.ipynb"), kernel_name="python3",
                            parameters=dict(profile="smoke", model="tiny", configs="idn:K=1:n=4", seq_lens="[12]"),
                            progress_bar=False)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    scratch = tmp_path / "cache" / "scratch" / "smoke"
    assert (scratch / "figures" / "speedup_tiny.png").stat().st_size > 1000
    assert "speedup_tiny" in (scratch / "reports" / "README.md").read_text()
    assert set(ROOT.parent.iterdir()) == before[0]  # nothing written beside the clone
    assert {p: p.stat().st_mtime for p in (ROOT / "figures").iterdir()} == before[1]


def test_bad_notebook_parameters_fail_in_the_first_cell(tmp_path):
    import papermill as pm
    for nb, bad, msg in [("jacobians", dict(power_iters=0), "power_iters must be >= 1"),
                         ("jacobians", dict(probes=2.5), "probes must be an integer"),
                         ("pretrained", dict(checkpoint="/nonexistent"), "does not exist"),
                         ("speedup", dict(seq_lens={"a": 1}), "-y"),
                         ("speedup", dict(compile="fast"), "valid modes: default"),
                         # these two once failed only after training, inside the decoding
                         ("speculative", dict(temperatures=-1), "temperatures must be a finite number in"),
                         ("speculative", dict(drafts="idn:n=9"), "n_par must be an integer in 1..4")]:
        with pytest.raises(pm.PapermillExecutionError, match=msg) as err:
            pm.execute_notebook(str(ROOT / "nb" / f"{nb}.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                parameters=dict(profile="smoke", **bad), progress_bar=False)
        assert err.value.exec_count <= 3, (nb, bad)  # markdown, parameters, injected, then the first code cell


# ------------------------------------------------------------------------------------------ the bench CLI
@pytest.mark.parametrize("argv, msg", [
    (["--model", "1b"], "valid models: 0.5b"), (["--model", "tiny", "--configs", "idn:n=9"], "n_par must be an integer in 1..4"),
    (["--model", "tiny", "--configs", "foo:K=1"], "unknown method 'foo'"),
    (["--model", "tiny", "--configs", "idn:2x3"], "cannot read"), (["--model", "tiny", "--seq-lens", "0"], "must be >= 1"),
    (["--model", "tiny", "--repeats", "0"], "repeats must be >= 1"),
    (["--checkpoint", "/nonexistent/run"], "does not exist"),
    (["--model", "tiny", "--csv", "/nonexistent/dir/out.csv"], "cannot write --csv"),
    (["--model", "cpu-mhc", "--configs", "idn:n=12:2xF6"], "not supported on mHC"),
    (["--model", "tiny", "--seq-lens", "abc"], "invalid"), (["--model", "tiny", "--bogus"], "unrecognized arguments"),
    # a mode torch.compile lacks: once a silent fallback to eager timings
    (["--model", "tiny", "--seq-lens", "8", "--decode-tokens", "2", "--compile", "fast"], "valid modes: default")]
    + ([] if torch.cuda.is_available() else [(["--model", "tiny", "--device", "cuda"], "sees no GPU")]))
def test_bench_cli_errors_are_one_line(argv, msg, capsys):
    assert bench_cmd.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


@pytest.mark.parametrize("module, argv, msg", [
    ("train", ["--n-par-set", "abc"], "expected comma-separated integers"),
    ("train", ["--model", "tiny", "--n-par-set", "0,9"], "every n_par in n_par_set must be an integer in 1..4"),
    ("train", ["--model", "tiny", "--bogus"], "unrecognized arguments"),
    ("train", ["--model", "tiny", "--device", "gpu"], "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N"),
    ("figures", ["--profile", "smok"], "invalid choice: 'smok'"),
    # a typo once ran no notebook and still rewrote the committed ledger and index
    ("figures", ["--profile", "smoke", "--only", "speedups"], "unknown notebook(s) 'speedups' for profile smoke; valid: regularization"),
    ("gpu_check", ["--smoke", "--bogus"], "unrecognized arguments"),
    ("claims", ["--bogus"], "unrecognized arguments")])
def test_every_command_prints_one_error_line(module, argv, msg, capsys):
    """Bad input to any command is one `error: ...` line and exit status 2, never argparse's usage block."""
    import importlib
    assert importlib.import_module(f"snlp_lab.{module}").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_devices_are_checked_against_the_gpus_torch_sees(monkeypatch):
    """cuda:N names one of the GPUs torch sees; a malformed or missing index is a ValueError (one error
    line in every command), not torch's RuntimeError at the first tensor moved there."""
    from snlp_lab.models.config import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    for bad in ("cuda:2", "cuda:x", "cuda:", "cuda:-1"):
        with pytest.raises(ValueError, match="torch sees 2 GPU"):
            resolve_device(bad)
    # train takes cuda:N as the other commands do, except under torchrun, which places each process itself
    from snlp_lab.training import TrainConfig, resolve
    assert resolve(TrainConfig(model="tiny", device="cuda:1")).device == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun puts each process on cuda:LOCAL_RANK"):
        resolve(TrainConfig(model="tiny", device="cuda:1"))


@pytest.mark.parametrize("model", ["tiny", "cpu-mhc"])
def test_bench_defaults_fit_the_model(model, capsys):
    s = bench.settings(model, device="cpu", study=PROFILES["smoke"].speedup)
    L = snlp_lab.get_config(model).n_layer
    for c in s["configs"]:
        parse_config(c).check(L)
    assert bench_cmd.main(["--model", model, "--repeats", "1", "--warmup", "0", "--seq-lens", "8",
                       "--decode-tokens", "2", "--configs", *s["configs"][:3]]) == 0
    assert "sequential" in capsys.readouterr().out


def test_readme_bench_example_fits_the_default_lengths():
    s = bench.settings("cpu", device="cpu", configs=["sequential", "idn:K=2:n=12:4xF3:h0"])
    assert s["seq_lens"] == [128]


# ------------------------------------------------------------------------------------------ silent failures
def test_non_finite_decoding_says_so(tiny, idx):
    with torch.no_grad():
        tiny.blocks[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        generate(tiny, idx[:1, :4], 5, method="idn", n_par=2)
    dec = Decoder(tiny, method="sequential")
    with pytest.raises(NonFiniteError):
        dec.prefill(idx[:1, :4])
    with pytest.raises(NonFiniteError, match="gives non-finite logits"):
        bench.run_bench(tiny, ["idn:K=1:n=2"], seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0, device="cpu")


def test_wrapped_models_save_plain_keys(tiny, tmp_path):
    compiled = torch.compile(tiny)  # compiles lazily: wrapping costs nothing here
    save_checkpoint(tmp_path / "run", compiled, step=3)
    back = load_checkpoint(tmp_path / "run")
    for (k, v), (k2, v2) in zip(tiny.state_dict().items(), back.state_dict().items()):
        assert k == k2 and "_orig_mod" not in k2
        torch.testing.assert_close(v.float(), v2.float())
