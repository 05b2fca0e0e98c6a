"""Where a run writes its figures and tables: the one output rule.

The committed figures/ and reports/ hold the output of the last full `make figures`, and only make figures
writes them: it says so with `publish=True` (`python -m snlp_lab.figures --publish`, which the Makefile
passes). Every other run, whether papermill, nbconvert, JupyterLab's Run All or Python, writes into a new
scratch folder of its own (`scratch_dir`) under the cache (`snlp_lab.core.paths.cache_dir`), named by its
start time, notebook and profile, so that two runs never overwrite each other; the run prints where it
wrote (the first output of a notebook).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..core.checks import check_output_dir
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


def committed_dirs(profile: str) -> tuple[Path, Path]:
    """The committed (figures, tables) folders of a make-figures profile; ValueError for any other."""
    root = repo_root()
    if profile not in MAKE_FIGURES_PROFILES:
        raise ValueError(f"profile {profile!r} has no committed results; make figures publishes "
                         f"{', '.join(MAKE_FIGURES_PROFILES)}")
    if root is None:
        raise ValueError("the committed figures/ and reports/ belong to a source checkout; this package is installed")
    return tuple((root / d).resolve() for d in MAKE_FIGURES_PROFILES[profile])


def is_committed(path: Path) -> bool:
    """Whether `path` lies in the repository's committed figures/ or reports/."""
    root = repo_root()
    return root is not None and any(Path(path).resolve().is_relative_to((root / d).resolve())
                                    for d in ("figures", "reports"))


def output_dirs(profile: str, fig_dir=None, report_dir=None, publish: bool = False, name: str = "run",
                log=print) -> tuple[Path, Path]:
    """(figure folder, table folder) of a notebook run, created; prints them.

    - publish=True (make figures alone passes it): the profile's committed folders, unless fig_dir and
      report_dir name others.
    - fig_dir and/or report_dir given: those (a missing one is the same folder as the other); relative
      paths are relative to the repository root, whatever the working directory. The committed folders
      are refused without publish, so that no try-out overwrites make figures' results.
    - neither: a new scratch folder of this run, `scratch_dir(f"{name}-{profile}")`.
    """
    root = repo_root()

    def resolve(p):
        p = Path(p).expanduser()
        return (p if p.is_absolute() else (root or Path.cwd()) / p).resolve()

    if fig_dir is None and report_dir is None:
        if publish:
            dirs = committed_dirs(profile)
        else:
            base = scratch_dir(f"{name}-{profile}")
            dirs = base / "figures", base / "reports"
    else:
        fig_dir, report_dir = fig_dir if fig_dir is not None else report_dir, report_dir if report_dir is not None else fig_dir
        dirs = check_output_dir("fig_dir", resolve(fig_dir)), check_output_dir("report_dir", resolve(report_dir))
        if not publish and any(is_committed(d) for d in dirs):
            raise ValueError(f"{' and '.join(str(d) for d in dirs if is_committed(d))} holds the committed results, "
                             f"which only make figures writes; leave fig_dir and report_dir out (a scratch folder "
                             f"of this run) or name another folder")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    log(f"[outputs] figures -> {dirs[0]}\n[outputs] tables  -> {dirs[1]}")
    return dirs
