"""The layer-sliced solve over a torch.distributed group (gloo, 2 and 3 CPU processes) against the
single-process solve: equal to float64 rounding for IDN, scaled IDN and HCN at K = 1 and 2, with and
without fused chunks and from both initial guesses; K = N gives the sequential trace on every rank
(finite termination across ranks); the pipeline baseline gives the sequential forward; bad layouts
are refused with the valid choices."""
import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import snlp_lab
from snlp_lab import solve
from snlp_lab.decoding.decoder import Decoder, generate
from snlp_lab.decoding.distributed import DistributedDecoder, generate_distributed
from snlp_lab.solvers.distributed import pipeline_forward, shard, solve_distributed, split_units

from conftest import randomize

# (name, model, solve options): the tiny preset has windows, value embeddings, smear and backout
# (backout reads layer 2, which lies in another rank's slice); the mHC models mix 4 streams
CASES = [
    ("idn K1", "tiny", dict(method="idn", iters=1, n_par=4)),
    ("idn K2 fwd", "tiny", dict(method="idn", iters=2, n_par=4, init="fwd")),
    ("idn K2 n3", "tiny", dict(method="idn", iters=2, n_par=3)),
    ("idn damped", "tiny", dict(method="idn", iters=2, n_par=4, kappa=0.3)),
    ("scaled-idn K2", "tiny", dict(method="scaled-idn", iters=2, n_par=4)),
    ("idn 2xF2 K1", "tiny", dict(method="idn", iters=1, chunks="2xF2")),
    ("idn 2xF2 K2", "tiny", dict(method="idn", iters=2, chunks="2xF2")),
    ("hcn K1", "mhc", dict(method="hcn", iters=1, n_par=4)),
    ("hcn K2 fwd", "mhc", dict(method="hcn", iters=2, n_par=4, init="fwd")),
    ("hcn dynamic K2", "mhc-dynamic", dict(method="hcn", iters=2, n_par=4)),
    ("hcn 2xF2 K2", "mhc", dict(method="hcn", iters=2, chunks="2xF2")),
]
# K = N: every unit exact, whatever the surrogate (DiagN's probes differ per rank: only this is exact)
TERMINATING = [
    ("idn K=N", "tiny", dict(method="idn", iters=4, n_par=4)),
    ("diagn K=N", "tiny", dict(method="diagn", iters=4, n_par=4, probes=2)),
    ("jacobi K=N", "tiny", dict(method="jacobi", iters=4, n_par=4)),
    ("hcn K=N", "mhc-dynamic", dict(method="hcn", iters=4, n_par=4)),
]


def build(kind: str):
    torch.manual_seed(0)
    kw = {"tiny": {}, "mhc": dict(x0ve=False, n_streams=4), "mhc-dynamic": dict(x0ve=False, n_streams=4, mhc_maps="sigmoid",
                                                                                mhc_dynamic=True)}[kind]
    return randomize(snlp_lab.build_model("tiny", **kw).double()).eval()


def sharded(model, kw: dict):
    """A copy of the model that keeps only this rank's weights for a run with options kw: a rank that
    read another's weights would fail (or, on an empty tensor, raise)."""
    return shard(copy.deepcopy(model), kw.get("n_par"), kw.get("chunks"))


def _errors(res, ref, S: int) -> dict:
    """Max abs differences of this rank's part of a distributed result against a single-process trace."""
    e = {"states": float((res.states - ref.trace[S + 1 + res.units.start:S + 1 + res.units.stop]).abs().max())}
    if res.prefix is not None:
        e["prefix"] = float((res.prefix - ref.trace[:S + 1]).abs().max())
    if res.logits is not None:
        e["logits"] = float((res.logits - ref.logits).abs().max())
    return e


def _worker(rank: int, P: int, store: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    got = {}
    for name, kind, kw in CASES:
        model = build(kind)
        ref = solve(model, idx, **kw)
        if ref.n_units < P:  # 2 chunks over 3 ranks: refused, see below
            continue
        res = solve_distributed(sharded(model, kw), idx, **kw)
        got[name] = _errors(res, ref, ref.n_seq)
        got[name]["payload"] = res.payload_elements
    for name, kind, kw in TERMINATING:
        model = build(kind)
        got[name] = _errors(solve_distributed(sharded(model, kw), idx, **kw), solve(model, idx, method="sequential"), 0)
    for name, kw in [("pipeline", {}), ("pipeline chunks", dict(chunks="2xF2" if P == 2 else "3xF1"))]:
        model = build("tiny")
        ref = solve(model, idx, method="sequential", **kw)
        got[name] = _errors(pipeline_forward(sharded(model, kw), idx, **kw), ref, ref.n_seq)
    # what a rank keeps: its blocks (rank 0 also the prefix's), the embedding on rank 0, the head on the last
    model = sharded(build("tiny"), dict(n_par=3))
    held = lambda m: sum(p.numel() for p in m.parameters())
    got["blocks held"] = [l for l, b in enumerate(model.blocks) if held(b)]
    got["embedding, head"] = [model.wte.weight.numel() > 0, model.lm_head.weight.numel() > 0]
    try:
        model.layers(0, 4, torch.zeros(4, 1, 2, 32, dtype=torch.float64), None)
    except ValueError as e:
        got["other layers"] = str(e)
    for name, kw in [("too many ranks", dict(method="idn", n_par=P - 1)),
                     ("newton", dict(method="newton", n_par=4)), ("sequential", dict(method="sequential"))]:
        try:
            solve_distributed(build("tiny"), idx, **kw)
            got[name] = "no error"
        except ValueError as e:
            got[name] = str(e)
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(got, f)


# KV-cached decoding: (name, model, decoder options); the reference is `Decoder` with the same options
DECODING = [
    ("pipeline", "tiny", dict(method="sequential")),
    ("idn K1 h0", "tiny", dict(method="idn", iters=1, n_par=4)),
    ("idn K2 fwd n3", "tiny", dict(method="idn", iters=2, n_par=3, init="fwd")),
    ("idn K1 warm", "tiny", dict(method="idn", iters=1, n_par=4, init="warm")),
    ("idn 2xF2 K1", "tiny", dict(method="idn", iters=1, chunks="2xF2")),
    ("hcn K2", "mhc", dict(method="hcn", iters=2, n_par=4)),
    ("hcn dynamic K1 warm", "mhc-dynamic", dict(method="hcn", iters=1, n_par=4, init="warm")),
]


def _decode_worker(rank: int, P: int, store: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P)
    g = torch.Generator().manual_seed(2)
    prompt, fed = torch.randint(0, 64, (2, 5), generator=g), torch.randint(0, 64, (2, 6), generator=g)
    got = {}
    for name, kind, kw in DECODING:
        if kw.get("chunks") and P > 2:
            continue
        model = build(kind)
        ref = Decoder(model, **kw)
        want = [ref.prefill(prompt)] + [ref.step(fed[:, i]) for i in range(fed.shape[1])]
        dec = DistributedDecoder(sharded(model, kw), **kw)
        have = [dec.prefill(prompt)] + [dec.step(fed[:, i]) for i in range(fed.shape[1])]
        if rank == P - 1:
            got[name] = max(float((a - b).abs().max()) for a, b in zip(have, want))
        else:
            got[name] = [h is None for h in have]
    model = build("tiny")
    for temperature in (0.0, 0.8):
        kw = dict(method="idn", iters=1, n_par=4, temperature=temperature, seed=3)
        got[f"generate T={temperature}"] = torch.equal(generate_distributed(model, prompt, 8, **kw),
                                                      generate(model, prompt, 8, **kw))
    dist.destroy_process_group()
    with open(f"{out}/decode{rank}.json", "w") as f:
        json.dump(got, f)


@pytest.mark.parametrize("P", [2, 3])
def test_distributed_decoding_equals_single_process_decoding(tmp_path, P):
    mp.spawn(_decode_worker, args=(P, str(tmp_path / "store"), str(tmp_path)), nprocs=P, join=True)
    ranks = [json.loads((tmp_path / f"decode{r}.json").read_text()) for r in range(P)]
    for name, _, kw in DECODING:
        if kw.get("chunks") and P > 2:
            continue
        assert ranks[-1][name] < 1e-12, name  # logits of the prompt and of every fed token
        assert all(all(none) for got in ranks[:-1] for none in [got[name]]), name  # logits on the last rank
    for got in ranks:
        assert got["generate T=0.0"] and got["generate T=0.8"]  # token for token, greedy and sampled


@pytest.mark.parametrize("P", [2, 3])
def test_distributed_solve_equals_the_single_process_solve(tmp_path, P):
    mp.spawn(_worker, args=(P, str(tmp_path / "store"), str(tmp_path)), nprocs=P, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(P)]
    for name, _, kw in CASES + TERMINATING:
        if name not in ranks[0]:
            assert P > 2 and "chunks" in kw  # more ranks than chunks: the too-many-ranks case below
            continue
        for r, got in enumerate(ranks):
            for part, err in got[name].items():
                if part != "payload":
                    assert err < 1e-12, (name, r, part, err)
        assert "logits" in ranks[-1][name] and "prefix" in ranks[0][name]
    for name in ("pipeline", "pipeline chunks"):
        assert all(err < 1e-12 for got in ranks for err in got[name].values()), name
    # per iteration a rank sends its last correction (B·T·D = 2·12·32) and its slice's operator:
    # a scalar for IDN, 4x4 stream matrices for static HCN, one per token for dynamic HCN
    B, T, D, n = 2, 12, 32, 4
    assert ranks[0]["idn K1"]["payload"] == B * T * D + 1
    assert ranks[0]["hcn K1"]["payload"] == B * T * n * D + n * n
    assert ranks[0]["hcn dynamic K2"]["payload"] == B * T * n * D + B * T * n * n
    # n_par = 3 of 4 layers: layer 0 is the prefix, on rank 0; the 3 units split as evenly as they go
    slices = {2: [[0, 1, 2], [3]], 3: [[0, 1], [2], [3]]}[P]
    assert [got["blocks held"] for got in ranks] == slices
    assert [got["embedding, head"] for got in ranks] == [[True, False]] + [[False, False]] * (P - 2) + [[False, True]]
    assert all("are not held by this model, which keeps layers" in got["other layers"] for got in ranks)
    for got in ranks:
        assert f"{P} ranks cannot each hold a slice of {P - 1} parallel units" in got["too many ranks"]
        assert "valid distributed methods: jacobi, idn" in got["newton"] and "pipeline_forward" in got["sequential"]


def test_units_split_evenly_and_contiguously():
    assert split_units(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert split_units(12, 4) == [range(3 * r, 3 * r + 3) for r in range(4)]
    with pytest.raises(ValueError, match="use at most 2 processes"):
        split_units(2, 3)


def test_a_solve_without_a_process_group_says_how_to_launch(tiny, idx):
    with pytest.raises(ValueError, match="launch with torchrun"):
        solve_distributed(tiny, idx)


# ------------------------------------------------------------------------------------------ latency
def test_latency_model_by_hand():
    from snlp_lab.measurement.distributed import model_latency
    t, a_ag, a_p2p, bw = 1e-3, 20e-6, 10e-6, 1e9
    costs = dict(state_bytes=1000, contrib_bytes=1000, alpha_ag=a_ag, beta_ag=bw, alpha_p2p=a_p2p, beta_p2p=bw)
    hop = a_p2p + 1000 / bw
    # the pipeline: every layer in turn, plus a hop between consecutive ranks
    assert model_latency(t, 32, 32, None, 4, **costs) == pytest.approx(32 * t + 3 * hop)
    # SNLP K = 2 on 4 ranks: 8 layers per rank and iteration, one all-gather each, and the head's hop
    assert model_latency(t, 32, 32, 2, 4, **costs) == pytest.approx(2 * (8 * t + a_ag + 3 * 1000 / bw) + hop)
    # a sequential prefix of 8 layers, uneven slices (24 units on 5 ranks: 5 per rank at most)
    assert model_latency(t, 32, 24, 1, 5, **costs) == pytest.approx(8 * t + 5 * t + a_ag + 4 * 1000 / bw + hop)
    # one rank: no communication at all
    assert model_latency(t, 32, 32, 1, 1, **costs) == pytest.approx(32 * t)
    # a cost per call: 32 calls in the pipeline, one per iteration for SNLP (and one per prefix layer)
    c = 50e-6
    assert model_latency(t, 32, 24, 2, 1, **costs, t_call=c) == pytest.approx(8 * (c + t) + 2 * (c + 24 * t))
    assert model_latency(t, 32, 32, None, 2, **costs, t_call=c) == pytest.approx(32 * (c + t) + hop)


def test_call_and_layer_costs_are_fitted_from_two_steps():
    from snlp_lab.measurement.distributed import fit_call_and_layer, model_latency
    c, t, L = 80e-6, 5e-6, 32
    seq = model_latency(t, L, L, None, 1, 0, 0, 0, 1, 0, 1, t_call=c)
    snlp = model_latency(t, L, 24, 2, 1, 0, 0, 0, 1, 0, 1, t_call=c)
    assert fit_call_and_layer(L, seq, 24, 2, snlp) == pytest.approx((c, t))
    with pytest.raises(ValueError, match="negative layer time"):
        fit_call_and_layer(L, seq, 24, 2, 9 * seq / L)  # 10 calls in the time of 9 single layers
    with pytest.raises(ValueError, match="n_par >= 2"):
        fit_call_and_layer(L, seq, 1, 1, seq)


def test_bench_distributed_under_torchrun(tmp_path):
    import subprocess
    import sys
    import pandas as pd
    csv = tmp_path / "dist.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "snlp_lab.bench",
           "--distributed", "--model", "tiny", "--seq-lens", "24", "--decode-tokens", "4", "--repeats", "2",
           "--warmup", "0", "--configs", "idn:K=1:n=4", "idn:K=2:n=4:fwd", "--csv", str(csv)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(csv)
    assert list(df.config) == ["sequential", "idn:K=1:n=4", "idn:K=2:n=4:fwd"] and (df.ranks == 2).all()
    assert df.speedup.iloc[0] == 1 and (df.decode_ms > 0).all() and df.predicted_ms.notna().all()
    assert list(df.allgather_elements) == [0, 32 + 1, 32 + 1]  # one token's correction (D = 32) + IDN's scalar
    assert f"wrote {csv}" in r.stdout
    plain = subprocess.run([sys.executable, "-m", "snlp_lab.bench", "--distributed", "--model", "tiny"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip() == (
        "error: --distributed runs under torchrun: torchrun --nproc_per_node P -m snlp_lab.bench --distributed ...")
