"""The one loader: what a model string names, and the model (with its tokenizer) it loads.

Every entry point (the API, `python -m snlp_lab.bench`, `generate`, `evaluate`, the notebooks' `model`,
`checkpoint` and `hf_model` parameters) passes its model string to `load_model`, which decides, in
this order, what it names:

    "preset"    a name in `snlp_lab.PRESETS`: `build_model(name)`, fresh random weights (torch's RNG),
                no tokenizer. A folder named like a preset is written as a path (./cpu).
    "run"       a run folder of `python -m snlp_lab.train` (checkpoint.json; `models/checkpoint.py`):
                our GPT (model_<step>.safetensors) or a fine-tuned transformers model (hf_<step>/,
                written by save_pretrained), with the run's tokenizer (`load_tokenizer`: tokenizer.json)
    "nanochat"  a nanochat checkpoint folder (model_<step:06d>.pt + meta_<step:06d>.json, as nanochat's
                checkpoint_manager.save_checkpoint writes them; `models/nanochat.py`), newest step, with
                nanochat's tokenizer (tokenizer/tokenizer.pkl in the folder or up to two levels above)
    "hf"        a local Hugging Face folder (config.json, weights and tokenizer files as transformers'
                save_pretrained writes them; `models/hf.py`), with its tokenizer (`PretrainedTokenizer`)

    m = load_model("runs/abc")                      # LoadedModel(model, tokenizer, kind="run", meta, source)
    idx = torch.tensor([[m.tokenizer.bos_id] + m.tokenizer.encode("def f(x):")])
    logits = m.model(idx)                           # [1, T, vocab_size]

A model evaluated on text reads it with its own tokenizer: `LoadedModel.require_tokenizer()` returns it
or raises a ValueError that says why there is none. Anything else that is not a model (a missing path,
a file, a folder of none of the kinds) is one ValueError line naming the valid kinds and presets.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..core.checks import check_path
from .build import build_model
from .checkpoint import load_checkpoint, load_tokenizer, saved_config
from .config import PRESETS, resolve_device
from .nanochat import checkpoint_steps, is_nanochat_checkpoint, load_nanochat, load_nanochat_tokenizer, read_meta
from .run_folder import CHECKPOINT_JSON, has_checkpoint, read_checkpoint

KINDS = ("preset", "run", "nanochat", "hf")


def valid_specs() -> str:
    """What a model string may name, for error messages."""
    return (f"valid: a preset ({', '.join(PRESETS)}), a run folder of snlp_lab.train ({CHECKPOINT_JSON}), "
            f"a nanochat checkpoint folder (model_<step>.pt + meta_<step>.json) or a local Hugging Face "
            f"folder (config.json)")


def resolve_spec(spec):
    """A model string with a relative folder found as `core.checks.check_path` finds it (from the working
    folder, then the repository root: a notebook runs in nb/), as an absolute path string; a preset
    name, and a path found nowhere, come back as given (`model_kind` judges them); None and "" give None."""
    if spec is None or str(spec) == "":
        return None
    if str(spec) in PRESETS:
        return str(spec)
    try:
        return str(check_path("model", spec))
    except ValueError:
        return str(spec)


def model_kind(spec: str | os.PathLike) -> tuple[str, str | Path]:
    """(kind, preset name or folder) of a model string: the decision `load_model` acts on, reading no
    weights. kind is one of `KINDS`; a folder comes back as a Path with ~ expanded.

    Raises ValueError (one line, naming the valid kinds and presets) for an empty string, a name that is
    no preset, a path that does not exist ("... does not exist"), a file ("... is a file; give the
    folder that holds it") and a folder of no kind."""
    text = str(spec) if spec is not None else ""
    if text.strip() == "":
        raise ValueError(f"no model given; {valid_specs()}")
    if text in PRESETS:
        return "preset", text
    path = Path(text).expanduser()
    if path.is_file():
        raise ValueError(f"{text} is a file; give the folder that holds it ({valid_specs()})")
    if not path.is_dir():
        if os.sep in text or text.startswith((".", "~")):  # meant as a path
            raise ValueError(f"{text} does not exist; {valid_specs()}")
        raise ValueError(f"unknown model {text!r}: neither a preset nor an existing folder; {valid_specs()}")
    if has_checkpoint(path):
        return "run", path
    if is_nanochat_checkpoint(path):
        return "nanochat", path
    if (path / "config.json").is_file():
        return "hf", path
    raise ValueError(f"{text} holds no model (no {CHECKPOINT_JSON}, model_<step>.pt or config.json in it); "
                     f"{valid_specs()}")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model string names, read without its weights (`model_info`): kind (`KINDS`), config (a
    GPTConfig, or an `HFConfig` for a transformers model), name (how tables call it: the preset, "tiny
    (trained, step 300)", "d32 (nanochat, step 5000)", the Hugging Face folder's name), the run's
    checkpoint JSON ({} for the other kinds) and the source string."""
    kind: str
    config: object
    name: str
    meta: dict
    source: str


def model_info(spec: str | os.PathLike) -> ModelInfo:
    """The kind, config and name of what `spec` names, from its JSON files only (no weights read), so
    that settings can be checked before a model is loaded. Raises ValueError as `model_kind` does, and
    for a config this code cannot read."""
    kind, where = model_kind(spec)
    if kind == "preset":
        return ModelInfo(kind, PRESETS[where], where, {}, str(spec))
    if kind == "run":
        meta = read_checkpoint(where)
        weights = where / meta["files"]["model"]
        if weights.is_dir():  # a fine-tuned transformers model: its config is in its folder
            from .hf import HFConfig, hf_config
            cfg = HFConfig.from_hf(hf_config(weights))
        else:
            cfg = saved_config(meta, where / CHECKPOINT_JSON)
        trained_as = (meta.get("train_config") or {}).get("model", "model")
        return ModelInfo(kind, cfg, f"{trained_as} (trained, step {meta['step']})", meta, str(spec))
    if kind == "nanochat":
        step = checkpoint_steps(where)[-1]
        cfg = read_meta(where / f"meta_{step:06d}.json")
        return ModelInfo(kind, cfg, f"{where.name} (nanochat, step {step})", {}, str(spec))
    from .hf import HFConfig, hf_config
    return ModelInfo(kind, HFConfig.from_hf(hf_config(where)), where.name, {}, str(spec))


@dataclasses.dataclass
class LoadedModel:
    """A model and what came with it (`load_model`).

    model: the layer stack (`GPT`, `MHCGPT` or `HFModel`) in eval mode; logits = model(idx) [B, T, V]
    for token ids idx [B, T]. tokenizer: the model's own tokenizer (`data.Tokenizer` of a run,
    `NanochatTokenizer`, `data.PretrainedTokenizer`; each has bos_id, encode, encode_batch, decode and
    vocab_size), or None (a preset; a folder without one), and then `no_tokenizer` says why.
    kind: one of `KINDS`. meta: the run's checkpoint JSON (train_config, step, ...), {} for the other
    kinds. source: the model string as given."""
    model: torch.nn.Module
    tokenizer: object | None
    kind: str
    meta: dict
    source: str
    no_tokenizer: str = ""

    def require_tokenizer(self):
        """The model's tokenizer, for reading or writing text with it. Raises ValueError
        ("<source> has no tokenizer; <why>") when there is none, and when the tokenizer has more ids than
        the model's vocabulary (its tokens would index past the embedding)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer; {self.no_tokenizer}")
        n, V = self.tokenizer.vocab_size, self.model.config.vocab_size
        if n > V:
            raise ValueError(f"the tokenizer of {self.source} has {n} token ids, more than the model's "
                             f"vocabulary of {V}: they do not belong together")
        return self.tokenizer


def _dtype(dtype) -> torch.dtype:
    from .hf import resolve_dtype
    dt = resolve_dtype(dtype)
    if dt == "auto":
        raise ValueError("dtype 'auto' keeps a Hugging Face folder's saved dtype; load_model takes None "
                         "(float32) or a torch dtype / its name")
    return dt


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu", dtype=None) -> LoadedModel:
    """The model that `spec` names (a preset, a run folder, a nanochat checkpoint folder or a local
    Hugging Face folder: see the module docstring and `model_kind`), on `device`, in eval mode.

    dtype: None (float32, every kind), or a torch dtype or its name ("bfloat16"); a Hugging Face
    folder is read in that dtype directly. The tokenizer is loaded with the model where the folder
    has one; a failure to load it leaves `tokenizer` None with the reason in `no_tokenizer` (a model
    needs no tokenizer to be timed), and `require_tokenizer` raises it.
    device: a torch.device, or "auto", "cpu", "cuda" or "cuda:N" (`resolve_device`).
    Raises ValueError (one line) for a string that names no model (`model_kind`), for a device torch
    does not see, and for a folder whose files do not load (a missing weights file, a config this code cannot read, mismatching keys)."""
    kind, where = model_kind(spec)
    dt = _dtype(dtype)
    device = resolve_device(str(device))  # a device torch does not see fails before any weights are read
    source, meta, tokenizer, why = str(spec), {}, None, ""
    if kind == "preset":
        model = build_model(where).to(dtype=dt)
        why = ("a preset is a fresh model with random weights; give a run folder, a nanochat folder with "
               "its tokenizer or a Hugging Face folder with tokenizer files")
    elif kind == "run":
        meta = read_checkpoint(where)
        model = load_checkpoint(where).to(dtype=dt)
        try:
            tokenizer = load_tokenizer(where)
        except ValueError as e:
            why = str(e)
    elif kind == "nanochat":
        model = load_nanochat(where, dtype=dt, tokenizer=False)
        try:
            tokenizer = load_nanochat_tokenizer(where)
        except ValueError as e:  # tiktoken missing
            why = str(e)
        model.tokenizer = tokenizer  # where load_nanochat puts it
        if tokenizer is None and not why:
            why = ("nanochat keeps it in tokenizer/tokenizer.pkl, which is neither in the folder nor up to "
                   "two folders above it")
    else:
        from .hf import load_hf
        model = load_hf(where, dtype=dt)
        from ..data import PretrainedTokenizer
        try:
            tokenizer = PretrainedTokenizer(where)
        except ValueError as e:
            why = " ".join(str(e).split())  # transformers' messages span lines
    return LoadedModel(model.to(device).eval(), tokenizer, kind, meta, source, why)
