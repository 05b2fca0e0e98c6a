"""Where a run lives and which runs are the same run: the config hash that names a cached run folder
(cache_dir()/runs/<model>-<hash>), the comparison behind resuming, the config of a cached run
(`trained_model`, `trained_run_dir`) and the lock that lets one process at a time train a run folder.
`trained_model` itself, which trains, is in `loop`: `loop.train` names its default folder with
`run_dir`, so this module sits below the loop.

A run's identity is the resolved config's fields that determine the trained weights, and the model
config: bookkeeping fields (`config.RUN_FIELDS`) are left out, and so are options added after runs were
cached while at their old behaviour (`config.LATER_DEFAULTS`), so that those runs keep their folders.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..core.files import atomic_write_text, read_json
from ..core.paths import cache_dir
from ..models.config import GPTConfig
from .config import LATER_DEFAULTS, RUN_FIELDS, TrainConfig, model_config, resolve

LOCK = ".lock"  # in the run folder
OWNER = ".lock.owner"  # who holds the lock: JSON with pid, host, since (UTC), argv


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
    trains: out its `run_dir` (`trained_model` resumes it where it holds a checkpoint). kwargs:
    TrainConfig fields (not out, resume or override) and model config fields (overrides; `init` is the
    training option). Raises ValueError for an unknown name, or as `resolve`."""
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
    return dataclasses.replace(cfg, out=str(run_dir(cfg, resolved=True)))


def trained_run_dir(preset: str = "cpu", steps: int = 600, reg: str = "none", lam: float = 0.1, seed: int = 0,
                    **kwargs) -> Path:
    """The run folder `trained_model` with the same arguments uses (metrics.jsonl, checkpoint); it
    exists only once that model has been trained."""
    return Path(cached_config(preset, steps, reg, lam, seed, **kwargs).out)


def run_lock(folder: Path) -> FileLock:
    """The lock on run folder `folder` (created if missing): one process at a time trains a run. An OS
    file lock (fcntl on Linux), so the system drops it when its holder dies, however it dies. One lock
    object per folder in a process (filelock's singleton), so a process that holds it may take it
    again (`trained_model` around `train`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / LOCK, is_singleton=True)


def lock_owner(folder: Path) -> dict | None:
    """The holder that `own_run` recorded for run folder `folder` (pid, host, since, argv), or None when
    there is no readable record. The record can outlive a holder that was killed: only the lock says
    whether the folder is held."""
    try:
        return read_json(Path(folder) / OWNER, "run-folder lock record")
    except (OSError, ValueError):  # missing, or cut short by a killed writer
        return None


@contextlib.contextmanager
def own_run(folder: Path, log=print):
    """Hold run folder `folder` for the body of a `with`: take its lock (`run_lock`), waiting for another
    process that holds it and saying so once through `log` (its PID, host and since when), then record
    this process as the holder (`lock_owner`). On exit the record is removed and the lock released.
    Re-entrant: a process that already holds the folder passes through."""
    folder = Path(folder)
    lock = run_lock(folder)
    if lock.is_locked:  # this process holds it already
        with lock:
            yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        o = lock_owner(folder) or {}
        who = f"PID {o.get('pid', '?')} on {o.get('host', '?')} since {o.get('since', '?')}" if o else "another process"
        log(f"[train] run folder {folder} is in use by {who}; waiting for it")
        lock.acquire()
    try:
        atomic_write_text(folder / OWNER, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv}) + "\n")
        yield
    finally:
        (folder / OWNER).unlink(missing_ok=True)
        lock.release()
