"""`make figures`: run every notebook in nb/ with papermill for a profile.

Each notebook takes the papermill parameters `profile`, `fig_dir`, `report_dir` and `publish`; it
writes its figures (PNG + PDF) to fig_dir and its tables (CSV + Markdown) to report_dir. The executed
copy of each notebook is saved to report_dir too. With --publish (`make figures` passes it), profiles
cpu and paper write the committed figures/ and reports/, long and long-x0ve subfolders of their own;
without it, --out or a new scratch folder of this run (`snlp_lab.lab.outputs`).

A profile may run some of the notebooks only (`Profile.notebooks`); the ledger's other claims then say
which table is missing.

After the notebooks the claims ledger (`snlp_lab.lab.claims`) is rewritten from the tables in report_dir
into report_dir: claims.md, linked from the index. A partial run (--only) rewrites it too, as the ledger
is a function of the tables alone and takes seconds; it then reads the new tables beside those of the last
full run, and it lists each table it read with its write time, so that a mixed ledger shows it.

    python -m snlp_lab.figures --profile cpu --publish  # make figures (about an hour on 2 cores)
    python -m snlp_lab.figures --profile cpu            # the same run into a scratch folder
    python -m snlp_lab.figures --profile smoke --out /tmp/x   # what the tests run
"""
from __future__ import annotations

import time
from pathlib import Path

from .claims import write_ledger
from .profiles import PROFILES
from .outputs import output_dirs
from .report import write_index, write_run_times

ORDER = ("regularization", "convergence", "jacobians", "frontier", "pretrained", "speedup", "speculative", "decode", "distributed", "gpu_study")
ROOT = Path(__file__).resolve().parents[2]  # the repository: nb/ beside the package


def notebooks(profile: str | None = None, nb_dir: Path = ROOT / "nb") -> list[Path]:
    """The notebooks to run, in dependency order (models trained by one are reused by the next): all of
    them, or those a profile names (`Profile.notebooks`, e.g. long-x0ve: the regularization study)."""
    found = {p.stem: p for p in nb_dir.glob("*.ipynb")}
    every = [found[n] for n in ORDER if n in found] + sorted(p for n, p in found.items() if n not in ORDER)
    own = PROFILES[profile].notebooks if profile is not None else ()
    return [p for p in every if p.stem in own] if own else every


def sync(nb_dir: Path = ROOT / "nb") -> None:
    """Bring every jupytext pair (.py:percent <-> .ipynb) up to date; the newer file wins."""
    from jupytext.cli import jupytext as jupytext_cli
    pairs = sorted(nb_dir.glob("*.py"))
    if pairs:
        jupytext_cli(["--sync", "--quiet", *map(str, pairs)])


def run_all(profile: str = "cpu", fig_dir: Path | None = None, report_dir: Path | None = None,
            only: list[str] | None = None, publish: bool = False, log=print) -> dict[str, float]:
    """Execute the notebooks; returns the wall time of each, in seconds. Outputs go where
    `snlp_lab.lab.outputs.output_dirs` says: publish=True (make figures) the profile's committed folders,
    else fig_dir/report_dir, else a new scratch folder of this run."""
    import papermill as pm

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    names = [nb.stem for nb in notebooks(profile)]
    unknown = [n for n in only or () if n not in names]
    if unknown:  # a typo would otherwise run nothing and still rewrite the ledger and the index
        raise ValueError(f"unknown notebook(s) {', '.join(map(repr, unknown))} for profile {profile}; valid: "
                         f"{', '.join(names)}")
    fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "figures", log=log)
    sync()
    times = {}
    for nb in notebooks(profile):
        if only and nb.stem not in only:
            continue
        t0 = time.perf_counter()
        log(f"[figures] {nb.stem} (profile={profile})")
        pm.execute_notebook(str(nb), str(report_dir / nb.name), cwd=str(nb.parent), kernel_name="python3",
                            parameters=dict(profile=profile, fig_dir=str(fig_dir), report_dir=str(report_dir),
                                            publish=publish),
                            progress_bar=False)
        times[nb.stem] = time.perf_counter() - t0
        log(f"[figures] {nb.stem} done in {times[nb.stem]:.0f}s")
    if not only:  # a partial run keeps the times of the last full one
        write_run_times(report_dir, profile, times)
    claims = write_ledger(report_dir, fig_dir, profile, log=log, out_dir=report_dir)
    write_index(report_dir, fig_dir)
    log(f"[figures] wrote {fig_dir} and {report_dir} (index: {report_dir / 'README.md'}, claims: {claims})")
    return times
