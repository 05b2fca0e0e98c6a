"""Checking a notebook's papermill parameters in its first cell, and where its outputs go.

papermill passes `-p name value` as a string or number, so a list parameter can arrive as a single
value (`-p configs idn:K=1:n=4`, `-p seq_lens 16`) or as a list written as a string
(`-p seq_lens "[16, 32]"`); `-y "seq_lens: [16, 32]"` passes a real list. `as_list` takes all three.
Every other check raises a `ValueError` that names the parameter and what it accepts, so a bad value
fails in the first cell, before any model is trained.

Outputs (`output_dirs`): relative paths are relative to the repository root, whatever the kernel's
working directory (JupyterLab runs in nb/, papermill where it is called). Without paths, only the
profiles that `make figures` runs write into the committed figures/ and reports/ (profile long:
figures/long/ and reports/long/); other runs (smoke,
or any run with a checkpoint or hand-picked settings) write to a scratch folder, so that a try-out
never overwrites the committed results.
"""
from __future__ import annotations

import argparse
import ast
import math
import sys
from pathlib import Path

from .paths import cache_dir, repo_root

# the profiles whose outputs are committed, and where: (figures, tables) relative to the repository root
MAKE_FIGURES_PROFILES = {"cpu": ("figures", "reports"), "paper": ("figures", "reports"),
                         "long": ("figures/long", "reports/long"),
                         "long-x0ve": ("figures/long-x0ve", "reports/long-x0ve")}


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad input is a ValueError, which every command prints as one `error: ...` line
    (exit status 2), with no usage block. --help still prints the help and exits 0."""

    def error(self, message):
        raise ValueError(message)


def run_command(main, argv=None) -> int:
    """main(argv), with a ValueError (bad options, files or data) printed as one `error: ...` line on
    stderr and exit status 2: a message, not a traceback."""
    try:
        return main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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


def output_dirs(profile: str, fig_dir=None, report_dir=None, scratch: bool = False, log=print) -> tuple[Path, Path]:
    """(figure folder, table folder) of a notebook run; see the module docstring. scratch=True sends a
    make-figures profile to the scratch folder too (a run with hand-picked settings). Prints the result."""
    root = repo_root()
    if fig_dir is None and report_dir is None and (profile not in MAKE_FIGURES_PROFILES or scratch or root is None):
        base = cache_dir() / "scratch" / profile
        dirs = base / "figures", base / "reports"
    else:
        def resolve(p, default):
            p = Path(p).expanduser() if p is not None else default
            return p if p.is_absolute() else (root or Path.cwd()) / p
        figs, tables = MAKE_FIGURES_PROFILES.get(profile, ("figures", "reports"))
        dirs = resolve(fig_dir, Path(figs)), resolve(report_dir, Path(tables))
    dirs = tuple(d.resolve() for d in dirs)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    log(f"[outputs] figures -> {dirs[0]}\n[outputs] tables  -> {dirs[1]}")
    return dirs
