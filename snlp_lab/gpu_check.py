"""`python -m snlp_lab.gpu_check` (`make gpu-check`): verify and time SNLP on a GPU in one prepared run
(the library: `snlp_lab.lab.gpu_check`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.cli import ArgumentParser, run_command
from .lab.gpu_check import redraw, run
from .lab import gpu_check as _lib


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(description=_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code path on the CPU at toy sizes")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: a new scratch folder of this run; make gpu-check names reports/gpu)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--redraw", action="store_true",
                    help="only rewrite the tables, figures and README of the check in --out from its JSON")
    a = ap.parse_args(argv)
    if a.redraw:
        if a.out is None:
            raise ValueError("--redraw needs --out, the folder of an earlier check (e.g. reports/gpu)")
        out = a.out
        print(_lib.explained(redraw(out), ".2f").to_markdown(index=False, floatfmt=".2f"))
        return 0
    res = run(a.smoke, a.out, a.device)
    print()
    print(_lib.explained(res["summary"], ".2f").to_markdown(index=False, floatfmt=".2f"))
    bad = res["correctness"][~res["correctness"].ok]
    print(f"\ncorrectness: {len(res['correctness']) - len(bad)}/{len(res['correctness'])} cases pass"
          + ("" if bad.empty else "; FAILING: " + ", ".join(bad.case)))
    print(f"[gpu-check] wrote {res['out']}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
