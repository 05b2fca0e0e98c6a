"""Wall-clock timing: one call, and interleaved medians of several (CUDA events on a GPU).

Every timing in snlp_lab is a median after warm-up, and a speedup is a ratio of two medians taken in
the same run (`median_seconds` interleaves the functions, so a drift in the machine's load hits them all
alike).
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """Wall time of one call of fn() (CUDA events and synchronisation on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median wall time of every fn in fns over `repeats` runs after `warmup` runs. The functions take
    turns (one run of each per round), so a drift in the machine's load hits them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


MATMULS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear")


def count_ops(fn) -> dict:
    """What one call of fn() issues, counted as it runs (eager): "python" (calls into torch from Python,
    tensor attribute reads excluded: what a small-kernel CPU step pays Python and dispatch overhead
    for), "aten" (the ATen operators they dispatch to) and "matmuls" (those that are matrix products).
    Under torch.compile the compiled graphs are not broken down: count an eager run."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    n = dict(python=0, aten=0, matmuls=0)

    class Python(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") != "__get__":
                n["python"] += 1
            return func(*args, **(kwargs or {}))

    class Aten(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n["aten"] += 1
            n["matmuls"] += func.overloadpacket.__name__ in MATMULS
            return func(*args, **(kwargs or {}))

    with Python(), Aten():
        fn()
    return n
