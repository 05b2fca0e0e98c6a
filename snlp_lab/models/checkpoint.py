"""Checkpoints of a run folder: weights as safetensors, everything else as JSON (optimizer: torch.save).

A run folder holds

    checkpoint.json            step, model config, train config, data stream position, RNG states,
                               metrics, and the names of the two files below; written last
    model_<step>.safetensors   model weights (a transformers model, `snlp_lab.models.hf`: the folder hf_<step>/
                               written by its save_pretrained, which `load_hf` and transformers read)
    optim_<step>.pt            optimizer and learning-rate scheduler states
    tokenizer.json             the run's tokenizer (written by snlp_lab.train; `load_tokenizer`)

Every file is written to a temporary name and moved into place with `os.replace`, and the JSON that
points to the step's files is replaced last, so an interrupted save leaves the previous checkpoint
intact. Files of older steps are removed once the new JSON is in place.

    model = load_checkpoint("runs/abc")            # a new model with the saved config
    load_checkpoint("runs/abc", model)             # into an existing model (same config or ValueError)

`load_checkpoint` also reads a nanochat checkpoint folder (model_<step>.pt + meta_<step>.json, newest
step; see `snlp_lab.models.nanochat`) into a given model. What a model string names, for every entry point, is
decided by `snlp_lab.models.loader.load_model`.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.checks import check_output_dir
from ..core.files import (DamagedFileError, atomic_write, dataclass_from_record, first_line, read_safetensors,
                          read_torch)

from .config import GPTConfig
from .build import build_model
from .hf import load_hf
from .nanochat import NanochatTokenizer, is_nanochat_checkpoint, load_nanochat, load_nanochat_tokenizer
from .run_folder import CHECKPOINT_JSON, FORMAT_VERSION, REMEDY, _json_path, read_checkpoint

TOKENIZER_JSON = "tokenizer.json"  # written by snlp_lab.train beside the checkpoint
STEP_FILE = re.compile(r"(model_\d{7}\.safetensors|optim_\d{7}\.pt|hf_\d{7})")  # one step's files


def _unwrap(model):
    """The model inside its wrappers: DistributedDataParallel (`.module`) and torch.compile
    (`._orig_mod`), in any nesting, so that saved keys never carry a wrapper's prefix."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# ------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """torch's CPU (and CUDA) generator states, JSON-ready (base64)."""
    enc = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")
    state = {"torch": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------ save
def save_checkpoint(run_dir: str | os.PathLike, model, step: int, train_config: dict | None = None,
                    optim_state: dict | None = None, **info) -> Path:
    """Write the checkpoint of `step` into run_dir; returns the path of its JSON.

    train_config: JSON-ready dict of the training options; optim_state: anything torch.save can write
    (optimizer and scheduler state dicts); info: more JSON-ready entries (stream, metrics, finished...).
    A save that fails (a full disk: `DiskFullError`) removes what it wrote and leaves the previous
    checkpoint as it was.
    """
    run_dir = check_output_dir("run_dir", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    path = run_dir / CHECKPOINT_JSON
    try:  # the files of the checkpoint in place, which a failed save must leave alone
        kept = set(read_checkpoint(run_dir)["files"].values()) if path.is_file() else set()
    except ValueError:
        kept = set()
    files = {}
    try:
        if hasattr(model, "save_pretrained"):  # a transformers model: its own folder format
            files["model"] = f"hf_{step:07d}"
            atomic_write(run_dir / files["model"], model.save_pretrained)
        else:
            files["model"] = f"model_{step:07d}.safetensors"
            weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            atomic_write(run_dir / files["model"], lambda p: save_file(weights, str(p), metadata={"step": str(step)}))
        if optim_state is not None:
            files["optimizer"] = f"optim_{step:07d}.pt"
            atomic_write(run_dir / files["optimizer"], lambda p: torch.save(optim_state, p))
        meta = {"format": FORMAT_VERSION, "step": step, "model_config": dataclasses.asdict(model.config),
                "train_config": train_config, "files": files, "rng": rng_state(), **info}
        atomic_write(path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    except BaseException:  # a full disk, an interrupt: remove this step's files, which no JSON names
        for name in set(files.values()) - kept:
            old = run_dir / name
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        raise
    for old in run_dir.iterdir():  # earlier steps' files, by their exact names: never a user's own file
        if STEP_FILE.fullmatch(old.name) and old.name not in files.values():
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------ load
def config_mismatch(saved: dict, cfg: GPTConfig) -> dict:
    """{field: (saved value, model value)} for every config field that differs."""
    mine = dataclasses.asdict(cfg)
    return {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}


def saved_config(meta: dict, path: str | os.PathLike = CHECKPOINT_JSON) -> GPTConfig:
    """The GPTConfig a checkpoint's JSON `meta` (read from `path`) records. DamagedFileError naming the
    file for a field this code does not know, a value of the wrong type or a config that fails its checks."""
    return dataclass_from_record(GPTConfig, path, meta["model_config"], "run checkpoint's model config",
                                 REMEDY)


def checkpoint_weights(path: str | os.PathLike, meta: dict | None = None) -> Path:
    """The weights of the checkpoint at `path` (a safetensors file, or a transformers model's folder);
    DamagedFileError naming the JSON when the weights it names are missing."""
    meta = meta or read_checkpoint(path)
    weights = _json_path(path).parent / meta["files"]["model"]
    if not weights.exists():
        raise DamagedFileError(_json_path(path), f"names the weights {weights.name}, which are missing", REMEDY)
    return weights


def load_weights(model, state: dict, source: str | os.PathLike) -> None:
    """model.load_state_dict(state) for weights read from file `source`; DamagedFileError naming it and
    the keys when they do not fit the model (missing, unexpected or mis-shaped tensors, or integer
    tensors where the model has floating-point weights, which load_state_dict would convert silently)."""
    mine = model.state_dict()
    ints = [k for k, v in state.items() if k in mine and mine[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise DamagedFileError(source, f"its tensors {', '.join(ints[:3])} hold {state[ints[0]].dtype} values "
                                       f"where the model has floating-point weights", REMEDY)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]
        raise DamagedFileError(source, f"its tensors do not fit the model its config describes ("
                                       f"{'; '.join(lines)[:300] or first_line(e)})", REMEDY) from None


def _check_config(path, saved: dict, model) -> None:
    diff = config_mismatch(saved, model.config)
    if diff:
        fields = "; ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} does not fit this model, config fields differ: {fields}")


def load_checkpoint(path: str | os.PathLike, model=None, device: str | torch.device = "cpu"):
    """The checkpoint's weights in `model` (built from the saved config when None); returns the model.

    path: a run folder or its checkpoint.json, or a nanochat checkpoint folder (its newest step). A given
    model must have the saved config: otherwise a ValueError names the mismatching fields. A new model
    is created on `device`.
    """
    if is_nanochat_checkpoint(path):
        loaded = load_nanochat(path, device=device)
        if model is None:
            return loaded
        _check_config(path, dataclasses.asdict(loaded.config), _unwrap(model))
        _unwrap(model).load_state_dict(loaded.state_dict())
        return model
    meta = read_checkpoint(path)
    weights = checkpoint_weights(path, meta)
    if weights.is_dir():  # a transformers model's folder (snlp_lab.models.hf)
        saved = load_hf(weights, dtype="auto")
        if model is None:
            return saved.to(device)
    elif model is None:
        model = build_model(saved_config(meta, _json_path(path))).to(device)
    target = _unwrap(model)
    _check_config(path, meta["model_config"], target)
    dev = next(target.parameters()).device
    state = saved.state_dict() if weights.is_dir() else read_safetensors(weights, str(dev), remedy=REMEDY)
    load_weights(target, state, weights)
    return model


def load_optim_state(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The optimizer/scheduler states saved with the checkpoint (None if none were saved): a dict with
    lists "optimizers" and "schedulers" of state dicts. DamagedFileError naming the file when it is
    missing, truncated or of another structure."""
    meta = read_checkpoint(path)
    name = meta["files"].get("optimizer")
    if name is None:
        return None
    file = _json_path(path).parent / name
    state = read_torch(file, "optimizer state", REMEDY, map_location=device)
    for key in ("optimizers", "schedulers"):
        if not (isinstance(state.get(key), list) and all(isinstance(s, dict) for s in state[key])):
            raise DamagedFileError(file, f"is not a valid optimizer state: no list of state dicts {key!r}", REMEDY)
    return state


def save_tokenizer(run_dir: str | os.PathLike, tokenizer) -> None:
    """Keep a run's tokenizer beside its checkpoint, so that the run reads and writes text without data
    settings: our BPE (`snlp_lab.data.Tokenizer`) as tokenizer.json, nanochat's where nanochat keeps it
    (tokenizer/tokenizer.pkl). A transformers model's tokenizer stays in its own folder."""
    run_dir = Path(run_dir)
    if isinstance(tokenizer, NanochatTokenizer):
        atomic_write(run_dir / "tokenizer", lambda p: (p.mkdir(), (p / "tokenizer.pkl").write_bytes(tokenizer.pickle())))
    elif hasattr(tokenizer, "save"):
        tokenizer.save(run_dir / TOKENIZER_JSON)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer a run was trained with: the run folder's tokenizer.json (`snlp_lab.data.Tokenizer`),
    nanochat's tokenizer/tokenizer.pkl for a run that fine-tuned a nanochat model, or for a fine-tuned
    transformers model (`--init-from-hf`) that model's own tokenizer.

    A run written before runs carried their tokenizer is rebuilt from its training settings (data
    source and vocabulary size: the same corpus gives the same tokenizer); the data key recorded at
    training must match, otherwise the corpus changed since and a ValueError says so.
    """
    from ..data import Tokenizer, prepare_data  # tokenizers are needed only here
    folder = _json_path(path).parent
    if (folder / TOKENIZER_JSON).exists():
        return Tokenizer.load(folder / TOKENIZER_JSON)
    if (folder / "tokenizer" / "tokenizer.pkl").is_file():
        return load_nanochat_tokenizer(folder)
    meta = read_checkpoint(path)
    tc = meta.get("train_config") or {}
    if tc.get("init_from_hf"):  # a fine-tuned transformers model reads text with its own tokenizer
        from ..data import PretrainedTokenizer
        return PretrainedTokenizer(tc["init_from_hf"])
    if "data" not in tc or "data" not in meta:
        raise ValueError(f"run {path} holds no {TOKENIZER_JSON} and records no training data to rebuild it from")
    ds = prepare_data(tc["data"], vocab_size=tc["vocab_size"])
    if ds.meta["key"] != meta["data"]:
        raise ValueError(f"run {path} holds no {TOKENIZER_JSON}, and its training data {tc['data']!r} changed "
                         f"since training (data key {ds.meta['key']}, trained on {meta['data']})")
    return ds.tokenizer
