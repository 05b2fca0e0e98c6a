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
parallel, P ranks and K iterations: a call of m layers at once takes t_c + m·t, a fixed cost per call
(kernel launches, Python) plus each layer's share (a decode step reads each layer's weights once):

    pipeline:  L·(t_c + t) + (P − 1)·(α_p2p + s/β_p2p)
    SNLP:      (L − n)·(t_c + t) + K·(t_c + ⌈n/P⌉·t + α_ag + (P − 1)·c/β_ag) + [P > 1]·(α_p2p + s/β_p2p)

where s is the bytes of one state, c the bytes one rank contributes to an iteration's all-gather
(`solvers.distributed`), and the last term sends the backout state to the head's rank. The embedding
and the head are folded into the layers. `fit_call_and_layer` gets t_c and t from two measured steps
(the sequential one and one SNLP configuration). The model leaves out any overlap of communication
with computation.
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
    row per configuration: ranks, K (0: the pipeline), n_par, decode_ms (median per token), decode_ms_min, speedup
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
        rows.append({"config": c.text, "ranks": P, "K": 0 if c.method == "sequential" else c.iters,
                     "n_par": model.n_layer - dec.S, "decode_ms": statistics.median(ts), "decode_ms_min": min(ts),
                     "allgather_elements": dec.payload_elements if c.method != "sequential" else 0})
    df = pd.DataFrame(rows)
    df["speedup"] = df.decode_ms.iloc[0] / df.decode_ms
    return df


ONE_PROCESS = ("sequential", "idn:K=1")  # the two single-process steps that fit t_call and t_layer


@torch.no_grad()
def local_step_ms(model, seq_len: int = 64, decode_tokens: int = 16, repeats: int = 5, seed: int = 0,
                  group=None) -> dict | None:
    """Per-token times (ms, medians) of single-process decoding (`decoder.Decoder`) on rank 0 while the
    other ranks wait: sequential, and IDN K = 1 over all layers (one call): what `fit_call_and_layer`
    needs on this machine. Same prompt and tokens as `time_distributed`. Rank 0 returns
    {"sequential": ms, "idn:K=1": ms}, the others None."""
    from ..decoding.decoder import Decoder
    rank, _ = rank_and_size(group)
    out = None
    if rank == 0:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        V = model.config.vocab_size
        prompt = torch.randint(0, V, (1, seq_len - decode_tokens), generator=g).to(device)
        fed = torch.randint(0, V, (1, decode_tokens), generator=g).to(device)
        decs = {c: Decoder(model, **parse_config(c).decoder_kwargs(), check_finite=False) for c in ONE_PROCESS}
        ts = {c: [] for c in ONE_PROCESS}
        for r in range(repeats + 1):  # interleaved; the first round warms up
            for c, dec in decs.items():
                dec.prefill(prompt)
                t0 = time.perf_counter()
                for j in range(decode_tokens):
                    dec.step(fed[:, j])
                if r:
                    ts[c].append(1e3 * (time.perf_counter() - t0) / decode_tokens)
        out = {c: statistics.median(v) for c, v in ts.items()}
    dist.barrier(group=group)
    return out


def predicted_ms(table: pd.DataFrame, L: int, local: dict, costs: dict, element_bytes: int) -> pd.Series:
    """`model_latency` of every row of a `time_distributed` table, with t_call and t_layer fitted to
    this machine's single-process steps (`local_step_ms`) and the group's measured `collective_costs`:
    the model checked against the run."""
    c, t = fit_call_and_layer(L, local["sequential"] / 1e3, L, 1, local["idn:K=1"] / 1e3)
    return table.apply(lambda r: 1e3 * model_latency(
        t, L, int(r.n_par), None if r.K == 0 else int(r.K), int(r.ranks), costs["state_bytes"],
        r.allgather_elements * element_bytes, costs["alpha_ag"], costs["beta_ag"], costs["alpha_p2p"],
        costs["beta_p2p"], t_call=c), axis=1)


@torch.no_grad()
def collective_costs(model, repeats: int = 50, group=None) -> dict | None:
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
        # `repeats` operations back to back between two barriers: the barriers' own cost is spread thin
        ag = _barrier_time(lambda: [dist.all_gather(parts, x, group=group) for _ in range(repeats)], group) / repeats

        def hop():  # rank 0 to rank 1 and back: two hops
            if rank == 0:
                dist.send(x, global_rank(group, 1), group=group)
                dist.recv(x, global_rank(group, 1), group=group)
            elif rank == 1:
                dist.recv(x, global_rank(group, 0), group=group)
                dist.send(x, global_rank(group, 0), group=group)
        p2p = _barrier_time(lambda: [hop() for _ in range(repeats)], group) / repeats / 2
        out[size] = (ag, p2p, x.numel() * x.element_size())
    if rank != 0:
        return None
    (ag1, p1, b1), (agD, pD, bD) = out[1], out[D]
    bw = lambda t1, tD: (bD - b1) / (tD - t1) if tD > t1 else math.inf  # bytes beyond the latency
    return {"alpha_ag": ag1, "beta_ag": bw(ag1, agD), "alpha_p2p": p1, "beta_p2p": bw(p1, pD), "state_bytes": bD}


def model_latency(t_layer: float, L: int, n_par: int, K: int | None, P: int, state_bytes: float,
                  contrib_bytes: float, alpha_ag: float, beta_ag: float, alpha_p2p: float, beta_p2p: float,
                  t_call: float = 0.0) -> float:
    """Modelled seconds of one decode step (module docstring): the pipeline when K is None, else SNLP
    with K iterations over the last n_par of L layers on P ranks. t_layer: seconds per layer in a call;
    t_call: seconds per call; contrib_bytes: what one rank contributes to an iteration's all-gather;
    alpha: latencies (s), beta: bandwidths (bytes/s)."""
    hop = alpha_p2p + state_bytes / beta_p2p
    if K is None:
        return L * (t_call + t_layer) + (P - 1) * hop
    gather = (alpha_ag + (P - 1) * contrib_bytes / beta_ag) if P > 1 else 0.0
    return ((L - n_par) * (t_call + t_layer) + K * (t_call + math.ceil(n_par / P) * t_layer + gather)
            + (hop if P > 1 else 0.0))


def fit_call_and_layer(L: int, seq_s: float, n_par: int, K: int, snlp_s: float) -> tuple[float, float]:
    """(t_call, t_layer) of `model_latency` on one device from the step time of the sequential forward
    (seq_s: L calls of one layer) and of SNLP with K iterations over n_par of the L layers (snlp_s).
    ValueError when n_par < 2 (one layer per call: the two costs cannot be told apart) or when the two
    timings give a negative time (they do not follow the model)."""
    if n_par < 2:
        raise ValueError(f"need n_par >= 2 to tell a call's cost from a layer's, got {n_par}")
    # seq_s = L (c + t);  snlp_s = (L - n)(c + t) + K (c + n t)
    per = seq_s / L  # c + t
    rest = (snlp_s - (L - n_par) * per) / K  # c + n t
    t = (rest - per) / (n_par - 1)
    c = per - t
    if t < 0 or c < 0:
        raise ValueError(f"the step times (sequential {seq_s:.3g} s, SNLP {snlp_s:.3g} s) give a negative "
                         f"{'layer' if t < 0 else 'call'} time: they do not follow the model")
    return c, t
