"""Damaged files, non-finite weights, paths of the wrong kind and a full disk: each is one error that
names the file and what is wrong (a command: one `error: ...` line, exit status 2), never a traceback,
and a failed write leaves the previous files intact and no temporary file behind.

Every damaged artifact is a copy of a real one (a run folder saved by `save_checkpoint` with its
optimizer state and tokenizer, nanochat's fixture folder, a Hugging Face folder written by
save_pretrained), damaged here: truncated, its JSON corrupted or of the wrong types, a NaN weight."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import snlp_lab
from snlp_lab import load_model
from snlp_lab.bench import main as bench_main
from snlp_lab.core import files
from snlp_lab.core.cli import run_command
from snlp_lab.core.files import DamagedFileError, DiskFullError, atomic_write
from snlp_lab.core.paths import cache_dir
from snlp_lab.data import Tokenizer, prepare_data
from snlp_lab.evaluate import main as evaluate_main
from snlp_lab.generate import main as generate_main
from snlp_lab.models.build import build_model
from snlp_lab.models.checkpoint import (TOKENIZER_JSON, load_checkpoint, load_optim_state, load_tokenizer,
                                        save_checkpoint)
from snlp_lab.models.run_folder import read_checkpoint
from snlp_lab.solvers.solver import NonFiniteError, solve

from conftest import randomize
from test_hf import make_folder
from test_nanochat import FIXTURES, ByteEncoding

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One intact folder of each kind: a run (weights, optimizer state, tokenizer), a nanochat base
    folder (checkpoints + tokenizer.pkl) and a Hugging Face folder."""
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    gpt = randomize(build_model("tiny", vocab_size=300)).eval()
    opt = torch.optim.AdamW(gpt.parameters())
    gpt(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    save_checkpoint(root / "run", gpt, step=3, train_config={"model": "tiny", "seq_len": 16},
                    optim_state={"optimizers": [opt.state_dict()], "schedulers": [{}]})
    src = [p.read_text() for p in sorted(Path(snlp_lab.__file__).parent.glob("*.py"))]
    Tokenizer.train(src, 300).save(root / "run" / TOKENIZER_JSON)
    shutil.copytree(FIXTURES / "plain", root / "base" / "plain")
    (root / "base" / "tokenizer").mkdir()
    (root / "base" / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(ByteEncoding()))
    make_folder("llama", root / "hf")
    return root


@pytest.fixture
def copy(real, tmp_path):
    """copy(kind) -> a fresh copy of the real folder of that kind, to damage."""
    def make(kind):
        src = {"run": real / "run", "nanochat": real / "base", "hf": real / "hf"}[kind]
        dst = tmp_path / kind
        shutil.copytree(src, dst)
        return dst / "plain" if kind == "nanochat" else dst
    return make


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def edit_json(path: Path, change) -> Path:
    d = json.loads(path.read_text())
    path.write_text(json.dumps(change(d)))
    return path


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# each damage: (kind, what it does to the folder -> the damaged file, words the message must hold)
def _no_model_config(d):
    del d["model_config"]
    return d


def _wide(d):
    d["model_config"]["n_embd"] = "wide"
    return d


DAMAGES = {
    "truncated weights": ("run", lambda f: truncate(next(f.glob("model_*.safetensors"))), "safetensors"),
    "json without model_config": ("run", lambda f: edit_json(f / "checkpoint.json", _no_model_config), "model_config"),
    "json with a string width": ("run", lambda f: edit_json(f / "checkpoint.json", _wide), "'n_embd' is 'wide'"),
    "json holding a list": ("run", lambda f: edit_json(f / "checkpoint.json", lambda d: [d]), "JSON array"),
    "truncated json": ("run", lambda f: truncate(f / "checkpoint.json"), "bad JSON"),
    "binary json": ("run", lambda f: (f / "checkpoint.json").write_bytes(b"\xff\xfe\x00") and f / "checkpoint.json",
                    "not UTF-8"),
    "missing weights": ("run", lambda f: next(f.glob("model_*.safetensors")).unlink() or f / "checkpoint.json",
                        "missing"),
    "truncated nanochat .pt": ("nanochat", lambda f: truncate(next(f.glob("model_*.pt"))), "truncated"),
    "nanochat .pt holding a list": ("nanochat", lambda f: torch.save([1, 2], next(f.glob("model_*.pt")))
                                    or next(f.glob("model_*.pt")), "holds a list"),
    "nanochat meta of wrong type": ("nanochat", lambda f: edit_json(next(f.glob("meta_*.json")), lambda d: {
        **d, "model_config": {**d["model_config"], "n_layer": "four"}}), "'n_layer' is 'four'"),
    "truncated nanochat meta": ("nanochat", lambda f: truncate(next(f.glob("meta_*.json"))), "bad JSON"),
    "truncated Hugging Face weights": ("hf", lambda f: truncate(f / "model.safetensors"), "safetensors"),
    "malformed Hugging Face config": ("hf", lambda f: truncate(f / "config.json"), "config"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_model_file_is_one_error_naming_it(damage, copy, capsys):
    kind, do, words = DAMAGES[damage]
    folder = copy(kind)
    bad = do(folder)
    with pytest.raises(DamagedFileError) as e:  # the API: one class, a ValueError, naming the file
        load_model(folder)
    assert isinstance(e.value, ValueError) and str(bad) in str(e.value) and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    # the commands: one line each, the same message
    argv = {"generate": ["--checkpoint", str(folder), "--prompt", "x", "--max-new-tokens", "2", "--device", "cpu"],
            "evaluate": ["--checkpoint", str(folder), "--data", "stdlib", "--device", "cpu"],
            "bench": ["--checkpoint", str(folder), "--seq-lens", "8", "--decode-tokens", "1", "--repeats", "1",
                      "--device", "cpu"]}
    for name, main in (("generate", generate_main), ("evaluate", evaluate_main), ("bench", bench_main)):
        assert main(argv[name]) == 2, name
        assert str(bad) in one_error_line(capsys.readouterr().err), name


def test_a_damaged_run_folder_fails_in_every_reader(copy):
    run = copy("run")
    truncate(next(run.glob("model_*.safetensors")))
    with pytest.raises(DamagedFileError, match="safetensors"):
        load_checkpoint(run)
    run = copy("run") if False else run
    optim = next(run.glob("optim_*.pt"))
    truncate(optim)
    with pytest.raises(DamagedFileError, match="optimizer state") as e:
        load_optim_state(run)
    assert str(optim) in str(e.value)
    torch.save({"optimizers": "nope"}, optim)
    with pytest.raises(DamagedFileError, match="no list of state dicts"):
        load_optim_state(run)
    (run / TOKENIZER_JSON).write_text('{"version": "1.0", "model": ')
    with pytest.raises(DamagedFileError, match="not a tokenizer file") as e:
        load_tokenizer(run)
    assert str(run / TOKENIZER_JSON) in str(e.value)
    (run / "checkpoint.json").write_text("[]")
    with pytest.raises(DamagedFileError, match="JSON array"):
        read_checkpoint(run)


def test_a_malformed_tokenizer_is_named_when_text_is_needed(copy, capsys):
    run = copy("run")
    (run / TOKENIZER_JSON).write_text("{not json")
    m = load_model(run)  # a model is timed without its tokenizer ...
    with pytest.raises(ValueError, match="tokenizer.json"):  # ... and text needs it
        m.require_tokenizer()
    assert generate_main(["--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "tokenizer.json" in one_error_line(capsys.readouterr().err)


def test_a_damaged_nanochat_tokenizer_is_named(copy):
    folder = copy("nanochat")
    pkl = folder.parent / "tokenizer" / "tokenizer.pkl"
    truncate(pkl)
    m = load_model(folder)
    with pytest.raises(ValueError, match="tokenizer.pkl"):
        m.require_tokenizer()


def test_a_file_given_as_a_checkpoint_is_named_as_such(copy, capsys):
    weights = next(copy("run").glob("model_*.safetensors"))
    assert evaluate_main(["--checkpoint", str(weights), "--data", "stdlib"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="is a file"):
        load_checkpoint(weights)


# ------------------------------------------------------------------------------------------ non-finite
def _nan_in(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file
    f = next(folder.glob("model_*.safetensors"))
    state = load_file(str(f))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(f))


def test_non_finite_weights_are_named_by_the_api_and_the_commands(copy, capsys):
    run = copy("run")
    _nan_in(run, "lm_head.weight")
    model = load_model(run).model
    with pytest.raises(NonFiniteError, match="lm_head.weight"):
        solve(model, torch.zeros(1, 4, dtype=torch.long), method="idn")
    assert generate_main(["--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "lm_head.weight" in one_error_line(capsys.readouterr().err)
    assert bench_main(["--checkpoint", str(run), "--seq-lens", "8", "--decode-tokens", "1", "--repeats", "1",
                       "--configs", "idn:K=1"]) == 2
    assert "lm_head.weight" in one_error_line(capsys.readouterr().err)


def test_run_command_turns_each_kind_of_failure_into_one_line(capsys):
    def raising(e):
        def main(argv):
            raise e
        return main
    for e in (ValueError("bad"), NonFiniteError("nan"), FloatingPointError("inf"), DiskFullError("/tmp/x/f"),
              PermissionError(13, "Permission denied", "/x"), ValueError("a\nmessage over\n lines")):
        assert run_command(raising(e)) == 2
        one_error_line(capsys.readouterr().err)
    assert run_command(raising(KeyboardInterrupt())) == 130
    with pytest.raises(ZeroDivisionError):  # a bug stays a traceback
        run_command(raising(ZeroDivisionError()))


# ------------------------------------------------------------------------------------------ paths
def test_a_cache_that_is_a_file_is_one_error(tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("")
    monkeypatch.setenv("SNLP_CACHE", str(f))
    with pytest.raises(ValueError, match="is a file"):
        cache_dir()
    r = subprocess.run([sys.executable, "-m", "snlp_lab.train", "--model", "tiny", "--steps", "1"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "SNLP_CACHE": str(f)})
    assert r.returncode == 2 and "SNLP_CACHE" in one_error_line(r.stderr)


def test_bench_csv_is_checked_before_the_run(tmp_path, monkeypatch, capsys):
    from snlp_lab import bench as cmd
    monkeypatch.setattr(cmd, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert bench_main(["--model", "tiny", "--csv", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_a_prompt_that_is_not_utf8_is_one_error(capsys):
    prompt = os.fsdecode(b"ab\xff\xfe x")  # how Python hands such bytes in argv over
    assert generate_main(["--checkpoint", "tiny", "--prompt", prompt, "--max-new-tokens", "1"]) == 2
    assert "0xff at position 2" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ a full disk
class _FullAfter:
    """A write that puts n bytes into the file and then fails as a full disk does."""

    def __init__(self, n: int, error=None):
        self.n, self.error = n, error or OSError(errno.ENOSPC, "No space left on device")

    def __call__(self, tmp):
        Path(tmp).write_bytes(b"x" * self.n)
        raise self.error


def test_a_full_disk_names_the_disk_removes_the_temporary_file_and_keeps_the_old(tmp_path):
    target = tmp_path / "out" / "model.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError) as e:
        atomic_write(target, _FullAfter(1000))
    msg = str(e.value)
    assert "no space left on the disk mounted at" in msg and str(target.parent) in msg and e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]
    atomic_write(target, lambda p: p.write_bytes(b"new"))  # the retry
    assert target.read_bytes() == b"new"


def test_a_writer_error_on_a_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save and safetensors report a full disk in their own words (torch: "unexpected pos"): the
    free space decides."""
    target = tmp_path / "optim.pt"
    full = SimpleNamespace(free=0, total=1 << 20, used=1 << 20)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: full)
    with pytest.raises(DiskFullError):
        atomic_write(target, _FullAfter(10, RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()  # with space left, the writer's own error stays what it is
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(target, _FullAfter(10, RuntimeError("unexpected pos")))
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "meta.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".meta.json.{dead}.tmp"
    stale.write_text("half")
    other = tmp_path / f".other.json.{dead}.tmp"  # another file's: not ours to remove
    other.write_text("half")
    files.atomic_write_text(target, "{}")
    assert not stale.exists() and other.exists() and target.read_text() == "{}"


def test_a_full_disk_while_caching_data_leaves_no_files_and_the_retry_works(tmp_path, monkeypatch):
    from snlp_lab.data import corpus
    calls = {"n": 0}
    real_save = corpus.np.save

    def save(f, arr):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr)

    monkeypatch.setattr(corpus.np, "save", save)
    src = tmp_path / "text"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    with pytest.raises(DiskFullError):
        prepare_data(str(src), vocab_size=300, cache=tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert all(not (n.endswith(".tmp") or n.endswith(".raw")) for n in left), left
    ds = prepare_data(str(src), vocab_size=300, cache=tmp_path / "cache")  # the retry
    assert len(ds.train) > 0 and not ds.cached


def test_a_damaged_data_cache_is_built_again(tmp_path):
    src = tmp_path / "text"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_text(f"def g{i}(y):\n    return y + {i}\n" * 20)
    ds = prepare_data(str(src), vocab_size=300, cache=tmp_path / "cache")
    want = ds.train.copy()
    truncate(ds.path / "train.npy", 0.3)
    again = prepare_data(str(src), vocab_size=300, cache=tmp_path / "cache")
    assert not again.cached and (again.train == want).all()


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    return ok


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """On a 1 MiB tmpfs (where the platform lets the test mount one): the second save, with 4 MB of
    optimizer state, runs out of space; the first checkpoint loads as it was and no temporary file is
    left."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root and a platform that allows it")
    try:
        model = build_model("tiny", vocab_size=300)
        save_checkpoint(disk / "run", model, step=1, train_config={})
        with pytest.raises(DiskFullError, match=str(disk)):
            save_checkpoint(disk / "run", model, step=2, train_config={},
                            optim_state={"optimizers": [{"x": torch.zeros(1_000_000)}], "schedulers": []})
        assert read_checkpoint(disk / "run")["step"] == 1
        assert sorted(p.name for p in (disk / "run").iterdir()) == ["checkpoint.json", "model_0000001.safetensors"]
        load_checkpoint(disk / "run")
        save_checkpoint(disk / "run", model, step=2, train_config={})  # the retry, with what fits
        assert read_checkpoint(disk / "run")["step"] == 2
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
