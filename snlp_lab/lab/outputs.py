"""Where a notebook run writes its figures and tables."""
from __future__ import annotations

import time
from pathlib import Path

from ..core.paths import cache_dir, repo_root

# the profiles whose outputs are committed, and where: (figures, tables) relative to the repository root
MAKE_FIGURES_PROFILES = {"cpu": ("figures", "reports"), "paper": ("figures", "reports"),
                         "long": ("figures/long", "reports/long"),
                         "long-x0ve": ("figures/long-x0ve", "reports/long-x0ve")}


def scratch_dir(name: str) -> Path:
    """A new folder of its own for one run: <cache>/scratch/<YYYYmmdd-HHMMSS>-<name>, with -2, -3, ...
    appended when a run of the same name started in the same second. Created; never reused."""
    base = cache_dir() / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    for i in range(1, 1000):
        path = base / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ValueError(f"cannot make a scratch folder for {name!r} in {base}: 999 runs started this second")


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
