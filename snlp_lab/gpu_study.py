"""`python -m snlp_lab.gpu_study` (`make gpu-study`): trained models on one GPU, the strongest baseline, one
prepared run per seed (the library: `snlp_lab.lab.gpu_study`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.cli import ArgumentParser, run_command
from .lab import gpu_study as _lib


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(description=_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the pair's seed (weights, data order); a folder keeps "
                                                        "every seed run into it, and refuses one it has")
    ap.add_argument("--smoke", action="store_true", help="the same code path on the CPU at toy size")
    ap.add_argument("--scale", default=None, choices=[s for s in _lib.SCALES if s != "smoke"],
                    help="model and token budget (default gpu: one H100/H200 in about 9 minutes)")
    ap.add_argument("--data", default=None, help="the corpus: 'python' (default: the installed packages' source "
                                                 "and documentation), a folder of text files, or parquet shards")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: a new scratch folder of this run; make gpu-study names "
                         "reports/gpu/study)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--redraw", action="store_true",
                    help="only rewrite the tables, figures and README of the study in --out from its seed records")
    a = ap.parse_args(argv)
    if a.redraw:
        if a.out is None:
            raise ValueError("--redraw needs --out, the folder of an earlier study (e.g. reports/gpu/study)")
        print(_lib.redraw(a.out).to_markdown(index=False, floatfmt=".4g"))
        return 0
    res = _lib.run(a.seed, a.out, a.scale, a.smoke, a.device, a.data)
    print()
    print(res["summary"].to_markdown(index=False, floatfmt=".4g"))
    print(f"[gpu-study] wrote {res['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
