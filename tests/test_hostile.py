"""Values at the edge of their range and two processes on one run folder: each range is checked where
the parameter is declared (one error naming the value and what is valid), a diverging run stops, and a
run folder is trained by one process at a time, so no step is logged twice."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import Timeout

import snlp_lab
from snlp_lab import load_model, parse_config, solve
from snlp_lab.decoding.decoder import generate
from snlp_lab.decoding.speculative import speculative_generate
from snlp_lab.generate import main as generate_main
from snlp_lab.gpu_check import main as gpu_check_main
from snlp_lab.models.build import build_model
from snlp_lab.models.checkpoint import load_checkpoint, save_checkpoint
from snlp_lab.models.run_folder import has_checkpoint
from snlp_lab.core.files import DamagedFileError
from snlp_lab.solvers import jacobian
from snlp_lab.solvers.ppl import evaluate_ppl
from snlp_lab.train import main as train_main
from snlp_lab.training import TrainConfig, train
from snlp_lab.training.runs import lock_owner, own_run, run_lock

from conftest import randomize
from test_damaged import one_error_line
from test_train import write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus folder, with SNLP_CACHE in a temporary folder for the module (subprocesses inherit it)."""
    root = tmp_path_factory.mktemp("hostile")
    old = os.environ.get("SNLP_CACHE")
    os.environ["SNLP_CACHE"] = str(root / "cache")
    yield write_corpus(root / "corpus")
    if old is None:
        os.environ.pop("SNLP_CACHE")
    else:
        os.environ["SNLP_CACHE"] = old


def cfg_for(corpus, out, **kw):
    return TrainConfig(**{**dict(model="tiny", data=str(corpus), vocab_size=300, seq_len=32, batch_size=4,
                                 steps=6, out=str(out), progress=False, save_every=0, eval_batches=2), **kw})


# ------------------------------------------------------------------------------------------ ranges
def test_a_tiny_temperature_samples_the_argmax_and_inf_is_refused(tiny):
    prompt = torch.tensor([[1, 5, 9]])
    greedy = generate(tiny, prompt, 6, temperature=0)
    assert torch.equal(generate(tiny, prompt, 6, temperature=1e-45, seed=3), greedy)  # once inf/inf = NaN
    for bad in (float("inf"), float("nan"), -1.0, "hot"):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0: greedy\)"):
            generate(tiny, prompt, 2, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            speculative_generate(tiny, prompt, 2, temperature=bad)


@pytest.mark.parametrize("seed", [10**23, -1, 1.5, True])
def test_a_seed_out_of_range_is_one_error_everywhere(tiny, corpus, tmp_path, seed):
    words = r"seed must be an integer in \[0, 2\*\*63 - 1\]"
    with pytest.raises(ValueError, match=words):
        generate(tiny, torch.tensor([[1, 2]]), 2, temperature=1.0, seed=seed)
    with pytest.raises(ValueError, match=words):
        speculative_generate(tiny, torch.tensor([[1, 2]]), 2, seed=seed)
    with pytest.raises(ValueError, match=words):
        train(cfg_for(corpus, tmp_path / "run", seed=seed))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=words):
        snlp_lab.measurement.bench.run_bench("tiny", seq_lens=(8,), decode_tokens=2, seed=seed)


def test_iterations_beyond_finite_termination_are_refused_at_once(tiny, idx):
    t0 = time.perf_counter()
    for text in ("idn:K=99999999999999999999", "idn:K=5:n=4", "hcn:K=3:n=4:2xF2"):
        with pytest.raises(ValueError, match=r"exceeds its \d parallel units: .*\(finite termination\)"):
            parse_config(text).check(4)
    with pytest.raises(ValueError, match=r"K must be in 1\.\.2"):
        solve(tiny, idx, method="idn", iters=3, chunks="2xF2")
    assert time.perf_counter() - t0 < 5  # once a hang: K was executed literally
    assert parse_config("idn:K=4:n=4").check(4).iters == 4  # K = units is exact, and allowed


@pytest.mark.parametrize("text,words", [
    ("idn:K=1:kappa=.", r"'kappa=\.' in configuration 'idn:K=1:kappa=\.' is not a number"),
    ("sequential:K=2", "sequential runs each layer once and takes no iters"),
    ("sequential:fwd", "takes no init"),
    ("diagn:K=1:seed=99999999999999999999999", r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
])
def test_a_configuration_field_out_of_range_is_named(text, words):
    with pytest.raises(ValueError, match=words):
        parse_config(text)


def test_estimator_counts_have_stated_ranges(tiny, idx):
    f = lambda h: torch.tanh(h)
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"probes must be an integer in 1\.\.10000"):
        jacobian.hutchinson_diag(f, h, probes=10**20)
    with pytest.raises(ValueError, match=r"iters must be an integer in 1\.\.10000"):
        jacobian.sigma_max(f, h, iters=10**9)
    with pytest.raises(ValueError, match=r"probes must be an integer in 1\.\.10000"):
        solve(tiny, idx, method="diagn", iters=1, probes=10**6)


def test_evaluate_ppl_takes_any_token_stream_and_checks_its_counts(tiny):
    toks = np.random.default_rng(0).integers(0, 64, size=200)
    ref = evaluate_ppl(tiny, toks, 16, 4)
    assert evaluate_ppl(tiny, torch.from_numpy(toks), 16, 4) == ref  # once an AttributeError
    assert evaluate_ppl(tiny, toks.tolist(), 16, 4) == ref
    for kw, words in [(dict(batch_size=0), "batch_size must be >= 1, got 0"),
                      (dict(seq_len=0), "seq_len must be >= 1"), (dict(max_batches=0), "max_batches must be >= 1")]:
        with pytest.raises(ValueError, match=words):
            evaluate_ppl(tiny, toks, **{"seq_len": 16, "batch_size": 4, **kw})
    for bad in (torch.zeros(2, 100, dtype=torch.long), np.linspace(0, 1, 100), "tokens"):
        with pytest.raises(ValueError, match="tokens must be a 1-D stream of integer token ids"):
            evaluate_ppl(tiny, bad, 16, 4)


def test_a_diverging_run_stops_without_a_checkpoint(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path / "run", matrix_lr=1e30, embedding_lr=1e30)
    with pytest.raises(FloatingPointError, match="diverged: lower the learning rates"):
        train(cfg)
    assert not has_checkpoint(tmp_path / "run")  # once: 20 steps to weights of 1e31, exit status 0


def test_fine_tuning_from_non_finite_weights_names_the_weight(corpus, tmp_path):
    good = train(cfg_for(corpus, tmp_path / "good", steps=2)).run_dir
    with torch.no_grad():
        m = load_checkpoint(good)
        m.lm_head.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan", m, step=2, train_config={})
    (tmp_path / "nan" / "tokenizer.json").write_bytes((good / "tokenizer.json").read_bytes())
    with pytest.raises(FloatingPointError, match="the starting model: weight lm_head.weight has magnitude nan"):
        train(cfg_for(corpus, tmp_path / "ft", init_from=str(tmp_path / "nan")))


# ------------------------------------------------------------------------------------------ paths, devices
def test_resume_needs_a_checkpoint_and_creates_nothing(corpus, tmp_path, capsys):
    typo = tmp_path / "rnu"
    with pytest.raises(ValueError, match="nothing to resume in .*rnu: it holds no checkpoint"):
        train(cfg_for(corpus, typo, resume=True))
    assert not typo.exists()  # once: a fresh run started silently in the mistyped folder
    typo.mkdir()
    assert train_main(["--model", "tiny", "--data", str(corpus), "--out", str(typo), "--resume"]) == 2
    assert "nothing to resume" in one_error_line(capsys.readouterr().err)


def test_an_output_folder_that_is_a_file_fails_before_any_work(corpus, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert train_main(["--model", "tiny", "--data", str(tmp_path / "no-corpus"), "--out", str(f)]) == 2
    assert "out " + str(f) + " is a file, not a folder" in one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        save_checkpoint(f, build_model("tiny"), step=1)
    assert gpu_check_main(["--smoke", "--out", str(f)]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert f.read_text() == "mine"


def test_saving_keeps_files_that_are_not_a_steps(tmp_path):
    m = build_model("tiny")
    (tmp_path / "model_best.safetensors").write_text("a user's copy")
    (tmp_path / "hf_export").mkdir()
    save_checkpoint(tmp_path, m, step=1)
    save_checkpoint(tmp_path, m, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "hf_export", "model_0000002.safetensors", "model_best.safetensors"]


def test_integer_weights_are_a_damaged_file(tmp_path):
    m = build_model("tiny")
    save_checkpoint(tmp_path, m, step=1)
    path = tmp_path / "model_0000001.safetensors"
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    state["lm_head.weight"] = state["lm_head.weight"].long()
    save_file(state, path)
    with pytest.raises(DamagedFileError, match="lm_head.weight hold torch.int64 values"):
        load_checkpoint(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_torch_does_not_see_is_one_error(capsys):
    with pytest.raises(ValueError, match="sees no GPU"):
        load_model("tiny", device="cuda")
    assert gpu_check_main(["--smoke", "--device", "tpu"]) == 2
    assert "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ one process per run
HOLD = """
import sys, time
from snlp_lab.training.runs import own_run
with own_run(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_names_its_holder_and_is_free_once_it_dies(tmp_path):
    folder = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        owner = lock_owner(folder)
        assert owner["pid"] == p.pid and owner["argv"][1:] == [str(folder), "60"]
        with pytest.raises(Timeout):
            run_lock(folder).acquire(timeout=0.2)
        lines = []
        p.send_signal(signal.SIGKILL)  # no clean-up runs: the OS drops the lock, the record stays
        p.wait()
        assert lock_owner(folder)["pid"] == p.pid
        with own_run(folder, log=lines.append):
            assert lock_owner(folder)["pid"] == os.getpid()
        assert lines == []  # taken at once: a dead holder holds nothing
        assert lock_owner(folder) is None and not (folder / ".lock.owner").exists()
    finally:
        p.kill()


def test_a_second_process_waits_and_says_who_holds_the_run(tmp_path):
    folder = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        lines, t0 = [], time.perf_counter()
        with own_run(folder, log=lines.append):
            waited = time.perf_counter() - t0
        assert len(lines) == 1 and f"is in use by PID {p.pid}" in lines[0] and "waiting" in lines[0]
        assert waited > 0.5 and p.wait(timeout=30) == 0
    finally:
        p.kill()


TRAIN = """
import sys
from snlp_lab.training import trained_model
trained_model("tiny", steps=12, data=sys.argv[1], vocab_size=300, seq_len=32, batch_size=4,
              progress=False, eval_batches=2, eval_every=4, save_every=3)
print("done", flush=True)
"""


def test_two_processes_training_one_run_log_every_step_once(corpus, tmp_path):
    from snlp_lab.training.runs import trained_run_dir
    out = trained_run_dir("tiny", steps=12, data=str(corpus), vocab_size=300, seq_len=32, batch_size=4,
                          progress=False, eval_batches=2, eval_every=4, save_every=3)
    with own_run(out):  # both start while the run is held, so one of them must wait for the other
        procs = [subprocess.Popen([sys.executable, "-c", TRAIN, str(corpus)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=ROOT) for _ in range(2)]
        for p in procs:
            assert "in use by PID" in p.stdout.readline()
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 13))  # once: every step two or three times
    assert [m["step"] for m in lines if "val_ppl" in m] == [4, 8, 12]


# ------------------------------------------------------------------------------------------ found by trying
@pytest.fixture(scope="module")
def run2(corpus, tmp_path_factory):
    """A finished 2-step run (checkpoint, optimizer state, tokenizer) and its config, to damage copies of."""
    out = tmp_path_factory.mktemp("run2") / "run"
    cfg = cfg_for(corpus, out, steps=4, stop_at=2)
    train(cfg)
    return out, cfg


def _edit(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("damage,words", [
    ("optimizer without param_groups", "optim_0000002.pt: its optimizer state does not fit (KeyError"),
    ("optimizer state of another run", "optim_0000002.pt: holds 1 optimizer and 1 scheduler states; this run has 2"),
    ("checkpoint without its stream", "checkpoint.json: its data-stream or RNG state does not fit"),
    ("RNG state of the wrong size", "checkpoint.json: its data-stream or RNG state does not fit"),
])
def test_resuming_from_damaged_state_names_the_file(run2, tmp_path, capsys, damage, words):
    import shutil
    src, cfg = run2
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    if damage.startswith("optimizer without"):
        torch.save({"optimizers": [{}] * 2, "schedulers": [{}] * 2}, out / "optim_0000002.pt")
    elif damage.startswith("optimizer"):
        torch.save({"optimizers": [{}], "schedulers": [{}]}, out / "optim_0000002.pt")
    elif damage.endswith("stream"):
        _edit(out / "checkpoint.json", lambda d: d.pop("stream"))
    else:
        _edit(out / "checkpoint.json", lambda d: d["rng"].update(torch="AAAA"))
    with pytest.raises(DamagedFileError, match=words.replace("(", r"\(")):
        train(dataclasses.replace(cfg, out=str(out), resume=True, stop_at=None))
    cli = ["--model", "tiny", "--data", cfg.data, "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
           "--steps", "4", "--save-every", "0", "--eval-batches", "2", "--out", str(out), "--resume"]
    assert train_main(cli) == 2
    assert "delete it and train again" in one_error_line(capsys.readouterr().err)


def test_evaluate_names_non_finite_weights_instead_of_a_table(run2, tmp_path, capsys):
    import shutil
    from snlp_lab.evaluate import main as evaluate_main
    out = tmp_path / "nan"
    shutil.copytree(run2[0], out)
    with torch.no_grad():
        m = load_checkpoint(out)
        m.lm_head.weight[0, 0] = float("nan")
    save_checkpoint(out, m, step=2, train_config=json.loads((out / "checkpoint.json").read_text())["train_config"])
    assert evaluate_main(["--checkpoint", str(out), "--configs", "sequential", "--max-batches", "1"]) == 2
    assert "weights hold inf or NaN (lm_head.weight)" in one_error_line(capsys.readouterr().err)


def test_api_edges_found_by_trying(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"batch, time >= 1, got \(1, 0\)"):  # once: an empty result
        solve(tiny, torch.zeros(1, 0, dtype=torch.long), method="idn", n_par=4)
    with pytest.raises(ValueError, match="max_new_tokens=1000000000 exceed the model's context sequence_len=32"):
        generate(tiny, torch.zeros(1, 4, dtype=torch.long), 10**9)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):  # once an AssertionError from torch.cuda
            load_model("tiny", device=torch.device("cuda"))
    (tmp_path / "gpu_check.json").write_text("{}")
    from snlp_lab.lab.gpu_check import redraw
    with pytest.raises(DamagedFileError, match="gpu_check.json: is not a valid GPU check record: it has no 'speed'"):
        redraw(tmp_path)
