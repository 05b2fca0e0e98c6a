"""Where a run lives and which runs are the same run: the config hash that names a cached run folder
(cache_dir()/runs/<model>-<hash>), the comparison behind resuming, the config of a cached run
(`trained_model`, `trained_run_dir`) and the lock that lets one process at a time train it.
`trained_model` itself, which trains, is in `loop`: `loop.train` names its default folder with
`run_dir`, so this module sits below the loop.

A run's identity is the resolved config's fields that determine the trained weights, and the model
config: bookkeeping fields (`config.RUN_FIELDS`) are left out, and so are options added after runs were
cached while at their old behaviour (`config.LATER_DEFAULTS`), so that those runs keep their folders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from filelock import FileLock

from ..core.paths import cache_dir
from ..models.config import GPTConfig
from .config import LATER_DEFAULTS, RUN_FIELDS, TrainConfig, model_config, resolve

LOCK = ".lock"  # in the run folder


def _later_default(key: str, value) -> bool:
    return key in LATER_DEFAULTS and value == LATER_DEFAULTS[key]


def config_hash(cfg: TrainConfig, resolved: bool = False) -> str:
    """16 hex digits of the SHA-256 of the fields that determine the trained weights (module docstring;
    not out, device, eval options...) and of the model config, so that a preset whose architecture
    changed is a new run. resolved: cfg is `resolve`'s output, not resolved again. Raises ValueError
    as `resolve`."""
    if not resolved:
        cfg = resolve(cfg)
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS and not _later_default(k, v)}
    d["model_config"] = dataclasses.asdict(model_config(cfg))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(cfg: TrainConfig, resolved: bool = False) -> Path:
    """The cached run folder of a config: cache_dir()/runs/<model>-<config hash> ("hf" for the model
    with init_from_hf). resolved: as `config_hash`."""
    if not resolved:
        cfg = resolve(cfg)
    return cache_dir() / "runs" / f"{cfg.model}-{config_hash(cfg, resolved=True)}"


def comparable(cfg_dict: dict) -> dict:
    """The fields of a config (`dataclasses.asdict`, or a checkpoint's stored train_config) that
    determine the weights, as stored (tuples as lists); None (an option not set) and the later options
    at their old behaviour are left out, so that runs saved before those options existed match."""
    d = json.loads(json.dumps(cfg_dict))
    return {k: v for k, v in d.items() if k not in RUN_FIELDS and v is not None and not _later_default(k, v)}


def cached_config(preset: str, steps: int, reg: str, lam: float, seed: int, **kwargs) -> TrainConfig:
    """The resolved config of the cached run `trained_model(preset, steps, reg, lam, seed, **kwargs)`
    trains: out its `run_dir`, resume set. kwargs: TrainConfig fields (not out, resume or override) and
    model config fields (overrides; `init` is the training option). Raises ValueError for an unknown
    name, or as `resolve`."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"out", "resume", "override"}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(kwargs) - names - fields)
    if bad:
        raise ValueError(f"unknown option(s) {bad}; valid: TrainConfig fields {', '.join(sorted(names))} "
                         f"and model config fields {', '.join(sorted(fields))}")
    train_kw = {k: v for k, v in kwargs.items() if k in names}
    # init names both a training option (the SNLP forward's initial guess) and a model field: here the former
    overrides = tuple(f"{k}={v}" for k, v in kwargs.items() if k in fields and k != "init")
    cfg = resolve(TrainConfig(model=preset, steps=steps, reg=reg, lam=lam, seed=seed, override=overrides,
                              **train_kw))
    return dataclasses.replace(cfg, out=str(run_dir(cfg, resolved=True)), resume=True)


def trained_run_dir(preset: str = "cpu", steps: int = 600, reg: str = "none", lam: float = 0.1, seed: int = 0,
                    **kwargs) -> Path:
    """The run folder `trained_model` with the same arguments uses (metrics.jsonl, checkpoint); it
    exists only once that model has been trained."""
    return Path(cached_config(preset, steps, reg, lam, seed, **kwargs).out)


def run_lock(folder: Path) -> FileLock:
    """A lock on run folder `folder` (created if missing), for `with`: one process at a time trains or
    reads a cached run (two notebooks asking for the same model); the others wait."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / LOCK)
