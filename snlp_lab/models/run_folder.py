"""The layout of a run folder written by `python -m snlp_lab.train` (its checkpoint.json), read without
loading any weights: whether a folder is one, its JSON, and where its weights are."""
from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINT_JSON = "checkpoint.json"
FORMAT_VERSION = 1



def _json_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / CHECKPOINT_JSON if path.is_dir() else path


def has_checkpoint(path: str | os.PathLike) -> bool:
    return _json_path(path).is_file()


def is_finished(path: str | os.PathLike) -> bool:
    """Whether the run folder holds the checkpoint of a finished training run."""
    return has_checkpoint(path) and bool(read_checkpoint(path).get("finished"))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON (a run folder or the JSON file itself)."""
    p = _json_path(path)
    if not p.is_file():
        raise ValueError(f"no checkpoint at {path} (expected {p}); train a model into this folder first")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {p} has format {meta.get('format')}, this code reads {FORMAT_VERSION}")
    return meta


def hf_weights_folder(path: str | os.PathLike) -> Path:
    """The Hugging Face folder holding the weights of a run folder's checkpoint (a fine-tuned
    transformers model); ValueError for a checkpoint of one of our GPTs."""
    meta = read_checkpoint(path)
    folder = _json_path(path).parent / meta["files"]["model"]
    if not folder.is_dir():
        raise ValueError(f"the checkpoint in {path} holds one of snlp_lab's own models, not a Hugging Face "
                         f"model; load it with snlp_lab.load_checkpoint")
    return folder
