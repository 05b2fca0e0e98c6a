"""`python -m snlp_lab.bench`: time the sequential forward against SNLP configurations (the library:
`snlp_lab.measurement.bench`)."""
from __future__ import annotations

import argparse
import sys

import torch

from .core.checks import check_output_file
from .core.cli import ArgumentParser, run_command
from .core.files import atomic_write
from .measurement.bench import run_bench, settings
from .measurement.limits import describe
from .measurement import bench as _lib


def main(argv=None) -> int:
    """The command line; bad input is one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m snlp_lab.bench", description=_lib.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="preset name (snlp_lab.PRESETS; random weights), or a run, nanochat or local Hugging Face "
                         "folder (snlp_lab.load_model); default cpu, or the checkpoint's")
    ap.add_argument("--configs", nargs="+", default=None, help="default: the model's (default_configs)")
    ap.add_argument("--seq-lens", nargs="+", type=int, default=None,
                    help="default: 128 (and 2048 on a GPU), at most the model's context")
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--compile", nargs="?", const=True, default=False,
                    help="torch.compile the block function (optionally a mode, e.g. reduce-overhead)")
    ap.add_argument("--checkpoint", default=None,
                    help="a run folder of snlp_lab.train, a nanochat checkpoint folder or a local Hugging Face "
                         "folder whose weights are timed (default: random weights)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on a CPU)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time replays of captured CUDA graphs, baseline and SNLP alike (GPU)")
    ap.add_argument("--limits", action="store_true",
                    help="measure the machine limits and add each pass's floor and x_floor (time / floor)")
    ap.add_argument("--csv", default=None, help="also write the table to this CSV file")
    a = ap.parse_args(argv)
    S = settings(a.model, a.device, None, a.seq_lens, a.configs, a.repeats, a.decode_tokens, a.warmup,
                 a.threads, a.checkpoint)
    csv = check_output_file("--csv", a.csv) if a.csv else None  # fail now, not after the run
    df = run_bench(S["model"], S["configs"], S["seq_lens"], S["decode_tokens"], S["repeats"], S["warmup"],
                   S["device"], getattr(torch, a.dtype) if a.dtype else None, a.compile, S["checkpoint"],
                   a.batch, a.seed, S["threads"], graphs=a.graphs, name=S["name"], limits=a.limits or None,
                   log=print)
    print("\n".join(f"- {n}" for n in df.attrs["notes"]))
    if df.attrs["limits"]:
        print(f"- machine limits: {describe(df.attrs['limits'])}")
    print()
    print(df.drop(columns=["model", "weights", "device", "dtype", "compile"]).to_markdown(index=False, floatfmt=".4g"))
    if csv:
        atomic_write(csv, lambda p: df.to_csv(p, index=False))
        print(f"wrote {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
