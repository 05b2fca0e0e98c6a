"""Per-token latency of layer-sliced SNLP against the sequential pipeline over the same ranks: measured
over a process group (`python -m snlp_lab.bench --distributed`, under torchrun) and modelled for P
devices from per-layer times and collective costs.

    torchrun --nproc_per_node 2 -m snlp_lab.bench --distributed --model cpu      # gloo on CPUs

`time_distributed` times, in one run, KV-cached decoding of the pipeline (`method="sequential"`) and of
each SNLP configuration (`snlp_lab.decoding.distributed.DistributedDecoder`), per token, with a barrier
around each timed pass so that the time is the slowest rank's. `collective_costs` measures what the
latency model needs from the group: the latency of one small all-gather and of one point-to-point
hop, and the bandwidth of both at the size of a state.

The latency model (`model_latency`) of one decode step at B = 1, for L layers of which the last n are
parallel, P ranks and K iterations, with t the time of one layer and of one batched call per unit it
holds (`t_batch(m) = m·t`: a decode step reads each layer's weights once, which bounds it on a GPU):

    pipeline:  t_0 + L·t + (P − 1)·(α_p2p + s/β_p2p)
    SNLP:      t_0 + (L − n)·t + K·(⌈n/P⌉·t + α_ag + (P − 1)·c/β_ag) + [P > 1]·(α_p2p + s/β_p2p)

where t_0 is the embedding and the head, s the bytes of one state, c the bytes one rank contributes
to an iteration's all-gather (`solvers.distributed`), and the last term sends the last state's
inputs to the head's rank (backout). The model leaves out what a real step adds on either side:
kernel-launch overhead, which batching the units' calls reduces (on one device too), and any overlap
of communication with computation.
"""
from __future__ import annotations

import math
import statistics
import time

import pandas as pd
import torch
import torch.distributed as dist

from ..decoding.distributed import DistributedDecoder
from ..solvers.distributed import global_rank, rank_and_size
from ..solvers.grammar import parse_config


def _barrier_time(fn, group) -> float:
    """Seconds of fn() between two barriers: the slowest rank's time."""
    dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    dist.barrier(group=group)
    return time.perf_counter() - t0


@torch.no_grad()
def time_distributed(model, configs, seq_len: int = 64, decode_tokens: int = 16, repeats: int = 5, warmup: int = 1,
                     seed: int = 0, group=None, log=None) -> pd.DataFrame | None:
    """Per-token KV-cached decode time of the pipeline and of every configuration (strings of
    `snlp_lab.parse_config`; "sequential" is the pipeline and is added first) over the ranks of `group`,
    interleaved round by round so that a slow spell of the machine hits every configuration alike.
    Every rank calls it with the same arguments. The prompt holds seq_len - decode_tokens random
    tokens; each round decodes decode_tokens fixed tokens after it. Returns on rank 0 a table with one
    row per configuration: ranks, K, n_par, decode_ms (median per token), decode_ms_min, speedup
    (pipeline ÷ configuration, same run) and the elements rank 0 contributes to each iteration's
    all-gather; None on the other ranks."""
    rank, P = rank_and_size(group)
    if not 1 <= decode_tokens < seq_len <= model.config.sequence_len:
        raise ValueError(f"need 1 <= decode_tokens < seq_len <= sequence_len={model.config.sequence_len}, got "
                         f"decode_tokens={decode_tokens}, seq_len={seq_len}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    cfgs = [parse_config(c) for c in configs]
    cfgs = [parse_config("sequential")] + [c for c in cfgs if not (c.method == "sequential" and c.chunks is None)]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, seq_len - decode_tokens), generator=g).to(device)
    fed = torch.randint(0, V, (1, decode_tokens), generator=g).to(device)
    # (jac sets exact Newton's products, which the distributed decoder refuses: not one of its options)
    decoders = [DistributedDecoder(model, group=group, **{k: v for k, v in c.decoder_kwargs().items() if k != "jac"})
                for c in cfgs]
    times = [[] for _ in cfgs]
    for round_ in range(warmup + repeats):
        for i, dec in enumerate(decoders):
            dec.prefill(prompt)
            t = _barrier_time(lambda: [dec.step(fed[:, j]) for j in range(decode_tokens)], group)
            if round_ >= warmup:
                times[i].append(1e3 * t / decode_tokens)
        if log and rank == 0:
            log(f"[bench --distributed] round {round_ + 1}/{warmup + repeats} done")
    if rank != 0:
        return None
    rows = []
    for c, dec, ts in zip(cfgs, decoders, times):
        rows.append({"config": c.text, "ranks": P, "K": None if c.method == "sequential" else c.iters,
                     "n_par": model.n_layer - dec.S, "decode_ms": statistics.median(ts), "decode_ms_min": min(ts),
                     "allgather_elements": dec.payload_elements if c.method != "sequential" else 0})
    df = pd.DataFrame(rows)
    df["speedup"] = df.decode_ms.iloc[0] / df.decode_ms
    return df


@torch.no_grad()
def local_step_ms(model, seq_len: int = 64, decode_tokens: int = 16, repeats: int = 5, seed: int = 0,
                  group=None) -> float | None:
    """Per-token time (ms, median) of single-process sequential decoding (`decoder.Decoder`) on rank 0
    while the other ranks wait: the per-layer time of the latency model on this machine (time / L).
    Same prompt and tokens as `time_distributed`. Rank 0 returns it, the others None."""
    from ..decoding.decoder import Decoder
    rank, _ = rank_and_size(group)
    ms = None
    if rank == 0:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        V = model.config.vocab_size
        prompt = torch.randint(0, V, (1, seq_len - decode_tokens), generator=g).to(device)
        fed = torch.randint(0, V, (1, decode_tokens), generator=g).to(device)
        dec, ts = Decoder(model, method="sequential", check_finite=False), []
        for _ in range(repeats + 1):
            dec.prefill(prompt)
            t0 = time.perf_counter()
            for j in range(decode_tokens):
                dec.step(fed[:, j])
            ts.append(1e3 * (time.perf_counter() - t0) / decode_tokens)
        ms = statistics.median(ts[1:])
    dist.barrier(group=group)
    return ms


def predicted_ms(table: pd.DataFrame, L: int, step_ms: float, costs: dict, element_bytes: int) -> pd.Series:
    """`model_latency` of every row of a `time_distributed` table, from this machine's single-process
    step time (t = step_ms / L) and measured `collective_costs`: the model checked against the run."""
    t = step_ms / 1e3 / L
    return table.apply(lambda r: 1e3 * model_latency(
        t, L, int(r.n_par), None if pd.isna(r.K) else int(r.K), int(r.ranks), costs["state_bytes"],
        r.allgather_elements * element_bytes, costs["alpha_ag"], costs["beta_ag"], costs["alpha_p2p"],
        costs["beta_p2p"]), axis=1)


@torch.no_grad()
def collective_costs(model, repeats: int = 20, group=None) -> dict | None:
    """The latency (seconds) and bandwidth (bytes/s) of one all-gather and of one point-to-point hop
    over `group`, at two sizes (4 bytes, and a decode step's state of the model at B = 1): the inputs
    of `model_latency`. Every rank calls it; rank 0 returns {"alpha_ag", "beta_ag", "alpha_p2p",
    "beta_p2p", "state_bytes"}, the others None. Needs 2 or more ranks."""
    rank, P = rank_and_size(group)
    if P < 2:
        raise ValueError("collective costs need a group of 2 or more ranks")
    p = next(model.parameters())
    D = model.config.n_embd * getattr(model.config, "n_streams", 1)
    out = {}
    for size in (1, D):
        x = p.new_zeros(size)
        parts = [torch.empty_like(x) for _ in range(P)]
        ag = statistics.median(_barrier_time(lambda: dist.all_gather(parts, x, group=group), group)
                               for _ in range(repeats))

        def hop():  # rank 0 to rank 1 and back: two hops
            if rank == 0:
                dist.send(x, global_rank(group, 1), group=group)
                dist.recv(x, global_rank(group, 1), group=group)
            elif rank == 1:
                dist.recv(x, global_rank(group, 0), group=group)
                dist.send(x, global_rank(group, 0), group=group)
        p2p = statistics.median(_barrier_time(hop, group) for _ in range(repeats)) / 2
        out[size] = (ag, p2p, x.numel() * x.element_size())
    if rank != 0:
        return None
    (ag1, p1, b1), (agD, pD, bD) = out[1], out[D]
    bw = lambda t1, tD: (bD - b1) / (tD - t1) if tD > t1 else math.inf  # bytes beyond the latency
    return {"alpha_ag": ag1, "beta_ag": bw(ag1, agD), "alpha_p2p": p1, "beta_p2p": bw(p1, pD), "state_bytes": bD}


def model_latency(t_layer: float, L: int, n_par: int, K: int | None, P: int, state_bytes: float,
                  contrib_bytes: float, alpha_ag: float, beta_ag: float, alpha_p2p: float, beta_p2p: float,
                  t_other: float = 0.0) -> float:
    """Modelled seconds of one decode step (module docstring): the pipeline when K is None, else SNLP
    with K iterations over the last n_par of L layers on P ranks. t_layer: seconds of one layer;
    contrib_bytes: what one rank contributes to an iteration's all-gather; alpha: latencies (s), beta:
    bandwidths (bytes/s); t_other: embedding and head."""
    hop = alpha_p2p + state_bytes / beta_p2p
    if K is None:
        return t_other + L * t_layer + (P - 1) * hop
    gather = (alpha_ag + (P - 1) * contrib_bytes / beta_ag) if P > 1 else 0.0
    return t_other + (L - n_par) * t_layer + K * (math.ceil(n_par / P) * t_layer + gather) + (hop if P > 1 else 0.0)
