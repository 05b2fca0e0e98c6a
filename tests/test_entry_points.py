"""How users come in: notebook parameters and output folders, the benchmark's command line, silent
failures (NaN), wrapped models in checkpoints. Each test replays a way in that once failed."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
from snlp_lab.lab.profiles import PROFILES
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
    with pytest.raises(ValueError, match=r"iters must be an integer in 1\.\.10000"):
        jacobian.sigma_max(f, h, iters=0)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=r"probes must be an integer in 1\.\.10000"):
            jacobian.hutchinson_diag(f, h, probes=bad)


def test_output_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))
    quiet = lambda s: None
    # only publish (make figures) writes the committed folders; a run without folders gets its own
    assert outputs.output_dirs("cpu", publish=True, log=quiet) == ((ROOT / "figures").resolve(),
                                                                  (ROOT / "reports").resolve())
    with pytest.raises(ValueError, match="smoke.*no committed results"):
        outputs.output_dirs("smoke", publish=True, log=quiet)
    first = outputs.output_dirs("cpu", name="speedup", log=quiet)
    second = outputs.output_dirs("cpu", name="speedup", log=quiet)
    assert first != second and first[0].parent.parent == (tmp_path / "cache/scratch").resolve()
    assert first[0].parent.name.endswith("-speedup-cpu") and first[1].parent == first[0].parent
    # the committed folders are refused when named without publish
    for named in (("figures", None), (None, "reports/long"), (str(ROOT / "figures"), "elsewhere")):
        with pytest.raises(ValueError, match="committed results, which only make figures writes"):
            outputs.output_dirs("cpu", *named, log=quiet)
    # relative paths are taken from the repository root, whatever the working directory
    monkeypatch.chdir(tmp_path)
    fig, rep = outputs.output_dirs("smoke", "out/f", str(tmp_path / "r"), log=quiet)
    assert fig == (ROOT / "out/f").resolve() and rep == tmp_path / "r"
    fig.rmdir(), fig.parent.rmdir()
    assert outputs.output_dirs("smoke", None, str(tmp_path / "r"), log=quiet) == (tmp_path / "r",) * 2


def test_index_follows_the_readings(tmp_path):
    rep, fig = tmp_path / "reports", tmp_path / "figures"
    report.add_reading(rep, "speedup", "speedup_0.5b", "reading one")
    report.add_reading(rep, "speedup", "speedup_0.5b", "reading two")
    index = (rep / "README.md").read_text()
    assert "`speedup_0.5b`" in index and "reading two" in index and "reading one" not in index
    report.write_run_times(rep, "cpu", {"speedup": 12.0})
    report.add_reading(rep, "frontier", "frontier", "three")
    assert "wall time per notebook: speedup 12 s" in (rep / "README.md").read_text()


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_a_notebook_run_by_hand_leaves_the_committed_results_alone(tmp_path):
    """nb/speedup (the cheapest notebook of make figures' own profile) as a user runs it: papermill with no
    parameters and `jupyter nbconvert --execute`, from the repository root and from nb/. Each run writes
    a scratch folder of its own, says so in its first output, and `git status` does not change."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SNLP_CACHE": str(tmp_path / "cache")}
    runs = {"papermill-root": (ROOT, [bin_dir / "papermill", "nb/speedup.ipynb", tmp_path / "pm-root.ipynb"]),
            "papermill-nb": (ROOT / "nb", [bin_dir / "papermill", "speedup.ipynb", tmp_path / "pm-nb.ipynb"]),
            "nbconvert-root": (ROOT, [bin_dir / "jupyter", "nbconvert", "--to", "notebook", "--execute",
                                      "nb/speedup.ipynb", "--output-dir", tmp_path / "nbc-root"]),
            "nbconvert-nb": (ROOT / "nb", [bin_dir / "jupyter", "nbconvert", "--to", "notebook", "--execute",
                                           "speedup.ipynb", "--output", "speedup.nbconvert.ipynb"])}
    before = git_status()
    procs = {k: subprocess.Popen(list(map(str, argv)), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, (cwd, argv) in runs.items()}
    logs = {k: p.communicate(timeout=600)[0] for k, p in procs.items()}  # together: 2 cores, mostly waiting
    executed = {"papermill-root": tmp_path / "pm-root.ipynb", "papermill-nb": tmp_path / "pm-nb.ipynb",
                "nbconvert-root": tmp_path / "nbc-root" / "speedup.ipynb",
                "nbconvert-nb": ROOT / "nb" / "speedup.nbconvert.ipynb"}
    try:
        assert all(p.returncode == 0 for p in procs.values()), logs
        wrote = set()
        for k, path in executed.items():
            cells = json.loads(path.read_text())["cells"]
            first = next("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"]
                         if o.get("text"))
            where = re.search(r"\[outputs\] figures -> (\S+)", first)
            assert where, (k, first)
            folder = Path(where.group(1)).parent
            assert folder.parent == tmp_path / "cache" / "scratch" and re.search(r"-speedup-cpu(-\d+)?$", folder.name), k
            assert (folder / "figures" / "speedup_cpu.png").stat().st_size > 1000, k
            wrote.add(folder)
        assert len(wrote) == 4  # a folder per run: none overwrote another
    finally:
        executed["nbconvert-nb"].unlink(missing_ok=True)
    assert git_status() == before


# ------------------------------------------------------------------------------------------ the bench CLI
@pytest.mark.parametrize("argv, msg", [
    (["--model", "1b"], "unknown model '1b'"), (["--model", "tiny", "--configs", "idn:n=9"], "n_par must be an integer in 1..4"),
    (["--model", "tiny", "--configs", "foo:K=1"], "unknown method 'foo'"),
    (["--model", "tiny", "--configs", "idn:2x3"], "cannot read"), (["--model", "tiny", "--seq-lens", "0"], "must be >= 1"),
    (["--model", "tiny", "--repeats", "0"], "repeats must be >= 1"),
    (["--checkpoint", "/nonexistent/run"], "does not exist"),
    (["--model", "tiny", "--csv", "/nonexistent/dir/out.csv"], "/nonexistent/dir does not exist"),
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
