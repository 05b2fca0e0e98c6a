"""`python -m snlp_lab.claims`: the claims ledger of a report folder's tables, written into another folder (the
library: `snlp_lab.lab.claims`). By default it reads the repository's reports/ (and its GPU study column
from reports/gpu/study, `make gpu-study`) and writes a new scratch folder, so that the committed ledger
changes only with `make figures`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.checks import check_output_dir
from .core.cli import ArgumentParser, run_command
from .core.files import read_json
from .core.paths import repo_root
from .lab.claims import check_inputs, write_ledger
from .lab import claims as _lib
from .lab.outputs import scratch_dir


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(description=_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-dir", type=Path, default=(repo_root() or Path.cwd()) / "reports",
                    help="the folder whose tables are read; default: the repository's reports/")
    ap.add_argument("--out", type=Path, default=None,
                    help="where claims.md and claims.csv are written (created if missing); default: a new scratch "
                         "folder, <cache>/scratch/<time>-claims")
    ap.add_argument("--fig-dir", type=Path, default=None, help="default: figures/ beside the report folder")
    ap.add_argument("--gpu-study", type=Path, default=None,
                    help="the GPU study's folder (make gpu-study) judged into the GPU study column; default: "
                         "gpu/study in the report folder (a missing folder reads 'not run')")
    ap.add_argument("--profile", default=None,
                    help="the profile the tables come from; default: the last make-figures run's, else cpu")
    a = ap.parse_args(argv)
    profile = a.profile
    if profile is None:
        times = a.report_dir / "run_times.json"
        profile = read_json(times, "record of notebook run times").get("profile", "cpu") if times.exists() else "cpu"
    check_inputs(a.report_dir, profile)  # before a scratch folder is made for nothing
    out = check_output_dir("--out", a.out) if a.out is not None else scratch_dir("claims")
    write_ledger(a.report_dir, a.fig_dir, profile, out_dir=out, gpu_study=a.gpu_study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
