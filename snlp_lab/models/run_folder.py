"""The layout of a run folder written by `python -m snlp_lab.train` (its checkpoint.json), read without
loading any weights: whether a folder is one, its JSON, and where its weights are."""
from __future__ import annotations

import os
from pathlib import Path

from ..core.files import DamagedFileError, field, read_json

CHECKPOINT_JSON = "checkpoint.json"
FORMAT_VERSION = 1
# what to do about a damaged run folder
REMEDY = "the run folder is damaged: delete it and train again (a cached run is then trained anew)"


def _json_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / CHECKPOINT_JSON if path.is_dir() else path


def has_checkpoint(path: str | os.PathLike) -> bool:
    return _json_path(path).is_file()


def is_finished(path: str | os.PathLike) -> bool:
    """Whether the run folder holds the checkpoint of a finished training run."""
    return has_checkpoint(path) and bool(read_checkpoint(path).get("finished"))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON (a run folder or the JSON file itself), checked: a JSON object of this
    format with an int step, the files it names and the model config. Raises ValueError when there is
    none, `DamagedFileError` (a ValueError naming the file) when it is not such a JSON."""
    p = _json_path(path)
    if not p.exists():
        raise ValueError(f"no checkpoint at {path} (expected {p}); train a model into this folder first")
    if p.name != CHECKPOINT_JSON and p.suffix != ".json":
        raise ValueError(f"{path} is a file, not a run folder or its {CHECKPOINT_JSON}; give the folder that "
                         f"holds it")
    what = f"run checkpoint ({CHECKPOINT_JSON})"
    meta = read_json(p, what, REMEDY)
    if meta.get("format") != FORMAT_VERSION:
        raise DamagedFileError(p, f"has format {meta.get('format')!r}, this code reads format {FORMAT_VERSION}",
                               "load it with the version of snlp_lab that wrote it")
    field(p, meta, "step", int, what, REMEDY)
    files = field(p, meta, "files", dict, what, REMEDY)
    field(p, files, "model", str, what, REMEDY)
    if not isinstance(files.get("optimizer", ""), str) or "/" in files["model"] or files["model"].startswith("."):
        raise DamagedFileError(p, f"is not a valid {what}: its files entry {files!r} names no file of the folder",
                               REMEDY)
    field(p, meta, "model_config", dict, what, REMEDY)
    field(p, meta, "train_config", (dict, type(None)), what, REMEDY)
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
