"""Checking parameters: the values of notebook parameters, command options and function arguments.

papermill passes `-p name value` as a string or number, so a list parameter can arrive as a single
value (`-p configs idn:K=1:n=4`, `-p seq_lens 16`) or as a list written as a string
(`-p seq_lens "[16, 32]"`); `-y "seq_lens: [16, 32]"` passes a real list. `as_list` takes all three.
Every other check raises a `ValueError` that names the parameter and what it accepts, so a bad value
fails in the first cell, before any model is trained.
"""
from __future__ import annotations

import ast
import math
import os
from pathlib import Path

from .paths import repo_root


def _yaml_hint(name: str) -> str:
    return f'a single value, a list written as a string ("[16, 32]"), or a YAML list: -y "{name}: [16, 32]"'


def as_list(name: str, value, item_type: type = str, allow_none: bool = False) -> list | None:
    """The list parameter `name` as a list of `item_type` (see the module docstring)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"parameter {name} is required: {_yaml_hint(name)}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"parameter {name}={value!r} is not a list; give {_yaml_hint(name)}") from None
        else:
            value = [text]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        if item_type is str and isinstance(v, str) and v.strip():
            out.append(v.strip())
        elif item_type is int and isinstance(v, str) and v.strip().lstrip("-").isdigit():
            out.append(int(v))
        elif item_type is int and isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif item_type is float and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:
                out.append(float(v))
            except ValueError:
                raise ValueError(f"parameter {name}: {v!r} is not a number; give {_yaml_hint(name)}") from None
        else:
            raise ValueError(f"parameter {name}: {v!r} is not a {item_type.__name__}; give {_yaml_hint(name)}")
    if not out:
        raise ValueError(f"parameter {name} is an empty list; give {_yaml_hint(name)}")
    return out


def check_int(name: str, value, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """An integer parameter (a whole-number string is taken too) that is at least `minimum`."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {name} must be an integer" + (f" >= {minimum}" if minimum is not None else "")
                         + f", got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"parameter {name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number parameter within [minimum, maximum]."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x) or (minimum is not None and x < minimum) or \
            (maximum is not None and x > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"parameter {name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return x


SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


def check_seed(name: str, value) -> int:
    """A random seed: an integer in [0, 2**63 - 1] (what torch's generators take). ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {value!r}")
    return value


def check_choice(name: str, value, valid) -> None:
    """Fail at a notebook's first cell with the valid values, rather than deep inside a run."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid {name}s: {', '.join(map(str, valid))}")


def check_path(name: str, value, allow_empty: bool = True) -> Path | None:
    """An existing file or folder (relative paths: relative to the repository root or the cwd)."""
    if value in (None, "") and allow_empty:
        return None
    p = Path(str(value)).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p] + ([repo_root() / p] if repo_root() else [])):
        if cand.exists():
            return cand.resolve()
    raise ValueError(f"parameter {name}: {value!r} does not exist")


def check_output_dir(name: str, value) -> Path:
    """A folder to be written (an option such as --out), checked before any work starts: a folder or not
    there yet, and writable, or creatable below its nearest existing parent. Returns it as a Path (~
    expanded). Raises ValueError naming the option and the path."""
    if value is None or str(value).strip() == "":
        raise ValueError(f"{name} is empty; give a folder")
    p = Path(str(value)).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {value} is a file, not a folder; give a folder (e.g. {p.parent / 'run'})")
    parent = p
    while not parent.exists():  # the nearest existing ancestor must let us create the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} {value}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {value} cannot be written: {parent} is not writable")
    return p


def check_output_file(name: str, value) -> Path:
    """A file to be written (an option such as --csv), checked before any work starts: not a folder,
    in a folder that exists and is writable, and not a read-only file. Returns it as a Path (~ expanded).
    Raises ValueError naming the option and the path."""
    p = Path(str(value)).expanduser()
    if str(value).strip() == "":
        raise ValueError(f"{name} is empty; give a file name")
    if p.is_dir():
        raise ValueError(f"{name} {value} is a folder; give a file name (e.g. {p / 'results.csv'})")
    folder = p.parent
    if not folder.exists():
        raise ValueError(f"{name} {value}: its folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise ValueError(f"{name} {value}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{name} {value} cannot be written: {'it is read-only' if p.exists() else f'{folder} is not writable'}")
    return p


