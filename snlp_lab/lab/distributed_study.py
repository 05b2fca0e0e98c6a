"""The GPU side of the distributed study (nb/distributed): the latency model of
`snlp_lab.measurement.distributed` fed with the per-layer decode time of the committed GPU check and
public NCCL figures, for P = 1, 2, 4 and 8 GPUs on the paper's `0.5b-plain` and `3b`.

The cost of a call of m layers, t_c + m·t, two ways, both from the committed GPU check's decode steps
of `0.5b-plain` at T = 128 and B = 1 (reports/gpu/gpu_check.json; the embedding and the head are
folded into the layers):

- "graphed": t_c and t fitted (`fit_call_and_layer`) to two steps replayed from CUDA graphs of eager
  kernels, as measured: the sequential one (32 calls) and `idn:K=2:n=24:h0` (8 + 2 calls);
- "floor": t_c = 0 and t the sequential step's bandwidth floor (its bytes at the measured copy rate)
  / 32, what a decoder at the memory bound would take.

`3b` reads about 10× the weight bytes per layer (a B = 1 decode step reads each layer's weights once):
its t is 0.5b-plain's plus the extra bytes at the floor's rate; t_c (launches) does not grow with the
width.
Collectives are NCCL within one NVLink/NVSwitch node: `NCCL_ALPHA` per small operation (all-gather
or one point-to-point hop) and `NCCL_BETA` bytes/s beyond it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.files import field, read_json
from ..core.paths import repo_root
from ..measurement.distributed import fit_call_and_layer, model_latency
from ..models.config import get_config

# Small-message latency of one NCCL collective within a node: all_reduce_perf on 8 NVLink-connected
# GPUs takes 12.5-16.7 us for messages of 4 B to 4 KB (nccl-tests output posted at
# https://github.com/deepseek-ai/DeepEP/issues/303); a decode step's messages are a few KB. Bandwidth: NVLink-4's 450 GB/s per direction, which
# nccl-tests' busbw reaches on 8x H100 SXM5 (460-480 GB/s at large sizes).
NCCL_ALPHA = 15e-6  # seconds
NCCL_BETA = 450e9  # bytes per second
BF16 = 2  # bytes per element: the paper's models decode in bf16
GPU_CHECK = Path("reports/gpu/gpu_check.json")
SCHEDULES = {"pipeline": None, "SNLP K=1": 1, "SNLP K=2": 2}


def layer_params(name: str) -> int:
    """Weights of one block of preset `name`: q and o (D² each), k and v (D·H_kv·hd each), the MLP (8 D²)."""
    c = get_config(name)
    return c.n_embd * (2 * c.n_embd + 2 * c.n_kv_head * c.head_dim) + 8 * c.n_embd ** 2


FIT_CONFIG = ("idn:K=2:n=24:h0", 24, 2)  # the committed check's configuration that fits t_c and t, its n and K


def gpu_step_ms(check: Path | None = None, model: str = "0.5b-plain", T: int = 128) -> dict:
    """Decode step times (ms) of `model` at T in the committed GPU check (default: the repository's
    reports/gpu/gpu_check.json): "sequential" and FIT_CONFIG's replayed from CUDA graphs, "floor" the
    sequential step's bandwidth floor; and "gpu", the GPU's name. ValueError naming the file when it
    holds no such rows."""
    path = check or (repo_root() or Path.cwd()) / GPU_CHECK
    what = "GPU check record"
    j = read_json(path, what, "run make gpu-check again")
    speed = pd.DataFrame(field(path, j, "speed", list, what))
    rows = speed[(speed.model == model) & (speed["T"] == T)].set_index("config")
    if not {"sequential", FIT_CONFIG[0]} <= set(rows.index) or "decode_graph_tok_s" not in rows:
        raise ValueError(f"{path} holds no graphed decode of {model} at T={T} for sequential and {FIT_CONFIG[0]}; "
                         f"run make gpu-check again")
    return {"sequential": 1e3 / rows.decode_graph_tok_s["sequential"],
            FIT_CONFIG[0]: 1e3 / rows.decode_graph_tok_s[FIT_CONFIG[0]],
            "floor": float(rows.decode_floor_ms["sequential"]),
            "gpu": field(path, j, "environment", dict, what).get("gpu", "?")}


def gpu_latency_table(check: Path | None = None, models=("0.5b-plain", "3b"), ranks=(1, 2, 4, 8)) -> pd.DataFrame:
    """Modelled per-token decode latency (ms, B = 1) of the pipeline and of SNLP K = 1 and 2 (all layers
    parallel, from h0) for each model, per-layer source ("graphed", "floor") and P in `ranks`; speedup:
    the pipeline's latency at the same P over the schedule's."""
    step = gpu_step_ms(check)
    L0 = get_config("0.5b-plain").n_layer
    floor = step["floor"] / 1e3 / L0
    graphed = fit_call_and_layer(L0, step["sequential"] / 1e3, FIT_CONFIG[1], FIT_CONFIG[2],
                                 step[FIT_CONFIG[0]] / 1e3)
    rows = []
    for name in models:
        c = get_config(name)
        L, extra = c.n_layer, (layer_params(name) / layer_params("0.5b-plain") - 1) * floor
        for source, (t_call, t) in (("graphed", graphed), ("floor", (0.0, floor))):
            t = t + extra
            for P in ranks:
                for schedule, K in SCHEDULES.items():
                    s = model_latency(t, L, L, K, P, state_bytes=c.n_embd * BF16, contrib_bytes=(c.n_embd + 1) * BF16,
                                      alpha_ag=NCCL_ALPHA, beta_ag=NCCL_BETA, alpha_p2p=NCCL_ALPHA, beta_p2p=NCCL_BETA,
                                      t_call=t_call)
                    rows.append({"model": name, "per_layer": source, "call_us": 1e6 * t_call, "layer_us": 1e6 * t,
                                 "P": P, "schedule": schedule, "latency_ms": 1e3 * s})
    df = pd.DataFrame(rows)
    pipe = df[df.schedule == "pipeline"].set_index(["model", "per_layer", "P"]).latency_ms
    df["speedup"] = [pipe[(r.model, r.per_layer, r.P)] / r.latency_ms for r in df.itertuples()]
    df.attrs["gpu"] = step["gpu"]
    return df
