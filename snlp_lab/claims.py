"""`python -m snlp_lab.claims`: rewrite the claims ledger from the tables of a report folder (the library:
`snlp_lab.lab.claims`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.cli import ArgumentParser, run_command
from .core.paths import repo_root
from .lab.claims import write_ledger
from .lab import claims as _lib


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(description=_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-dir", type=Path, default=(repo_root() or Path.cwd()) / "reports")
    ap.add_argument("--fig-dir", type=Path, default=None, help="default: figures/ beside the report folder")
    ap.add_argument("--profile", default=None,
                    help="the profile the tables come from; default: the last make-figures run's, else cpu")
    a = ap.parse_args(argv)
    profile = a.profile
    if profile is None:
        times = a.report_dir / "run_times.json"
        profile = json.loads(times.read_text())["profile"] if times.exists() else "cpu"
    write_ledger(a.report_dir, a.fig_dir, profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
