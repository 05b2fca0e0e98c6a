"""`python -m snlp_lab.figures` (`make figures`): run every notebook for a profile (the library:
`snlp_lab.lab.figures`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.cli import ArgumentParser, run_command
from .lab.profiles import PROFILES
from .lab.figures import ORDER, run_all
from .lab import figures as _lib


def _main(argv) -> int:
    ap = ArgumentParser(description=_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", choices=list(PROFILES))
    ap.add_argument("--out", type=Path, default=None,
                    help="write figures/ and reports/ under this folder (default: a new scratch folder of this run)")
    ap.add_argument("--publish", action="store_true",
                    help="write the profile's committed figures/ and reports/ (what `make figures` does)")
    ap.add_argument("--only", nargs="*", help=f"run only these notebooks (by name: {', '.join(ORDER)})")
    a = ap.parse_args(argv)
    dirs = {} if a.out is None else dict(fig_dir=a.out / "figures", report_dir=a.out / "reports")
    times = run_all(a.profile, only=a.only, publish=a.publish, **dirs)
    print(f"[figures] {len(times)} notebooks in {sum(times.values()):.0f}s")
    return 0


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
