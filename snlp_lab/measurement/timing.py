"""Wall-clock timing: one call, and interleaved medians of several (CUDA events on a GPU).

Every timing in snlp_lab is a median after warm-up, and a speedup is a ratio of two medians taken in
the same run (`median_seconds` interleaves the functions, so a drift in the machine's load hits them all
alike). `speedup_lower_bound` gives the speedup that the run's own noise still supports, from the
paired rounds.
"""
from __future__ import annotations

import math
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


def round_seconds(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[object, list[float]]:
    """Wall time of every fn in fns in each of `repeats` rounds after `warmup` rounds. The functions take
    turns (one run of each per round), so a drift in the machine's load hits them all alike, and the
    i-th times of two functions form a pair (`speedup_interval`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device))
    return times


def medians(times: dict) -> dict:
    """The median of each function's round times (`round_seconds`)."""
    return {k: statistics.median(v) for k, v in times.items()}


def median_seconds(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median wall time of every fn in fns over `repeats` interleaved rounds (`round_seconds`)."""
    return medians(round_seconds(fns, repeats, warmup, device))


def speedup_interval(base: list[float], other: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of the per-round speedups base_i / other_i
    (times of one `round_seconds` run): the sign-test interval, the k-th smallest and k-th largest ratio
    with k the largest for which P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. It needs no model of
    the noise; with n < 6 rounds it is the min and max (coverage 1 - 2^(1-n): 94% at 5, 75% at 3).
    Raises ValueError for an empty or unequal pair of lists."""
    if not base or len(base) != len(other):
        raise ValueError(f"need two equally long, non-empty lists of round times, got {len(base)} and {len(other)}")
    ratios = sorted(b / o for b, o in zip(base, other))
    n, k, tail = len(ratios), 1, 0.0
    while k < (n + 1) // 2:
        tail += math.comb(n, k - 1) / 2 ** n  # P(X <= k - 1)
        if tail + math.comb(n, k) / 2 ** n > (1 - confidence) / 2:
            break
        k += 1
    return ratios[k - 1], ratios[n - k]


def speedup_lower_bound(base: list[float], other: list[float], confidence: float = 0.95) -> float:
    """A lower bound on the speedup median(base) / median(other) (round times of one `round_seconds`
    run) that the run's own noise supports: the lower end of `speedup_interval`, capped at the speedup
    itself (that interval is for the median of the per-round ratios, which can exceed the ratio of
    medians). As a one-sided bound it errs with probability <= (1 - confidence) / 2 from 6 rounds on,
    2^-n below (3% at 5 rounds, 12.5% at 3)."""
    return min(speedup_interval(base, other, confidence)[0], statistics.median(base) / statistics.median(other))


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
