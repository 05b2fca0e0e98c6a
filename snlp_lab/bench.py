"""`python -m snlp_lab.bench`: time the sequential forward against SNLP configurations (the library:
`snlp_lab.measurement.bench`)."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .core.checks import check_output_file
from .core.cli import ArgumentParser, run_command
from .core.files import atomic_write
from .measurement.bench import bench_model, by_variant, run_bench, settings
from .measurement.distributed import collective_costs, local_step_ms, predicted_ms, time_distributed
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
    ap.add_argument("--all-variants", action="store_true",
                    help="time eager, graphed, compiled (the --compile mode, default inductor's default) and "
                         "compiled+graphed, one row per configuration with the four side by side; every "
                         "speedup over the fastest sequential variant")
    ap.add_argument("--compile-configs", nargs="+", default=None,
                    help="with --all-variants or --compile: compile only these configurations ('best': the "
                         "fastest uncompiled one per pass; the sequential baseline always)")
    ap.add_argument("--compile-budget", type=float, default=None,
                    help="seconds of compiling allowed; configurations beyond --compile-configs compile only "
                         "while it lasts (their rows say when they did not)")
    ap.add_argument("--limits", action="store_true",
                    help="measure the machine limits and add each pass's floor and x_floor (time / floor)")
    ap.add_argument("--csv", default=None, help="also write the table to this CSV file")
    ap.add_argument("--distributed", action="store_true",
                    help="under torchrun: time KV-cached decoding of the pipeline and of SNLP over the process "
                         "group, each rank a slice of the layers (docs/distributed.md)")
    a = ap.parse_args(argv)
    if a.distributed:
        return _distributed(a)
    S = settings(a.model, a.device, None, a.seq_lens, a.configs, a.repeats, a.decode_tokens, a.warmup,
                 a.threads, a.checkpoint)
    csv = check_output_file("--csv", a.csv) if a.csv else None  # fail now, not after the run
    compile = [False, a.compile or True] if a.all_variants else a.compile
    if (a.compile_configs is not None or a.compile_budget is not None) and not compile:
        raise ValueError("--compile-configs and --compile-budget need --compile or --all-variants")
    df = run_bench(S["model"], S["configs"], S["seq_lens"], S["decode_tokens"], S["repeats"], S["warmup"],
                   S["device"], getattr(torch, a.dtype) if a.dtype else None, compile, S["checkpoint"],
                   a.batch, a.seed, S["threads"], graphs=a.graphs or a.all_variants, name=S["name"],
                   limits=a.limits or None, log=print, compile_configs=a.compile_configs,
                   compile_budget_s=a.compile_budget)
    print("\n".join(f"- {n}" for n in df.attrs["notes"]))
    if df.attrs["limits"]:
        print(f"- machine limits: {describe(df.attrs['limits'])}")
    print()
    shown = by_variant(df) if a.all_variants else df  # (the CSV keeps one row per compile setting)
    print(shown.drop(columns=[c for c in ("model", "weights", "device", "dtype", "compile") if c in shown])
          .to_markdown(index=False, floatfmt=".4g"))
    if csv:
        atomic_write(csv, lambda p: df.to_csv(p, index=False))
        print(f"wrote {csv}")
    return 0


def _distributed(a) -> int:
    """`--distributed`: every rank times the same decoders; rank 0 prints and writes the table."""
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise ValueError("--distributed runs under torchrun: torchrun --nproc_per_node P -m snlp_lab.bench "
                         "--distributed ...")
    for flag in ("compile", "graphs", "limits", "checkpoint", "all_variants", "compile_configs", "compile_budget"):
        if getattr(a, flag) not in (None, False):
            raise ValueError(f"--{flag.replace('_', '-')} is not offered with --distributed")
    cuda = a.device != "cpu" and torch.cuda.is_available()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, P = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(a.threads or 1)
        dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
        model, weights = bench_model(a.model or "cpu", None, device, dtype, a.seed)
        L = model.n_layer
        configs = a.configs or [f"idn:K=1:n={L}", f"idn:K=2:n={L}"]
        T = (a.seq_lens or [min(128, model.config.sequence_len)])[0]
        kw = dict(seq_len=T, decode_tokens=a.decode_tokens or 16, repeats=a.repeats or 5, seed=a.seed)
        csv = check_output_file("--csv", a.csv) if a.csv and rank == 0 else None
        df = time_distributed(model, configs, warmup=1 if a.warmup is None else a.warmup,
                              log=print if rank == 0 else None, **kw)
        local = local_step_ms(model, kw["seq_len"], kw["decode_tokens"], kw["repeats"], a.seed)
        costs = collective_costs(model) if P > 1 else None
        if rank == 0:
            df["one_process_seq_ms"], df["one_process_idn_ms"] = local["sequential"], local["idn:K=1"]
            if costs is not None:
                df["predicted_ms"] = predicted_ms(df, L, local, costs, torch.finfo(dtype).bits // 8)
                df["model_err_%"] = 100 * (df.predicted_ms / df.decode_ms - 1)
            print(f"- {weights}; {P} processes ({'NCCL' if cuda else 'gloo'}), {device.type}, {dtype}; "
                  f"prompt {T - kw['decode_tokens']} tokens, then {kw['decode_tokens']} decoded; speedup: pipeline "
                  f"÷ configuration, same run")
            if costs is not None:
                print(f"- collectives: all-gather {1e6 * costs['alpha_ag']:.0f} us + bytes / "
                      f"{costs['beta_ag'] / 1e9:.2f} GB/s, point-to-point {1e6 * costs['alpha_p2p']:.0f} us + bytes / "
                      f"{costs['beta_p2p'] / 1e9:.2f} GB/s (state: {costs['state_bytes']} bytes)")
            print()
            print(df.to_markdown(index=False, floatfmt=".4g"))
            if csv:
                atomic_write(csv, lambda p: df.to_csv(p, index=False))
                print(f"wrote {csv}")
    finally:
        if own:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
