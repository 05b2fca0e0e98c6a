"""The speed benchmark on the tiny model (seconds) and the speedup notebook in its smoke profile."""
from pathlib import Path

import pytest
import torch

from snlp_lab.solvers.grammar import parse_config
from snlp_lab.measurement import bench
import snlp_lab.bench as bench_cmd
from snlp_lab.measurement.limits import decode_cost, floor_seconds, prefill_cost

CONFIGS = ["sequential", "idn:K=1:n=4", "idn:K=2:n=4:2xF2:h0", "idn:K=1:n=3:fwd", "idn:K=4:n=4:warm"]
LIMITS = dict(copy_GB_s=1.0, matmul_TFLOP_s=1e-3, matmul_dtype="float32", device="cpu", threads=1)  # given, not measured


@pytest.fixture(scope="module")
def table():
    return bench.run_bench("tiny", CONFIGS, seq_lens=(12, 16), decode_tokens=3, repeats=2, warmup=0, device="cpu",
                           limits=LIMITS)


def test_speedup_interval_is_the_sign_test_interval():
    from scipy import stats
    from snlp_lab.measurement.timing import speedup_interval, speedup_lower_bound
    for n in (3, 5, 6, 10, 15, 20, 51):
        base, other = [float(i + 1) for i in range(n)], [1.0] * n  # ratios 1..n, sorted
        lo, hi = speedup_interval(base[::-1], other)
        k = int(lo)
        assert hi == n + 1 - k  # symmetric order statistics
        cover = lambda k: 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)
        # the narrowest interval of >= 95% coverage; below 6 rounds none reaches it and min..max is given
        assert k == 1 if n < 6 else (cover(k) >= 0.95 > cover(k + 1))
    assert speedup_interval([2.0, 2.0], [1.0, 1.0]) == (2.0, 2.0)
    # the interval is for the median of the per-round ratios; the speedup is the ratio of the medians,
    # here 1.8 while every ratio but one is 2: the bound is capped at the speedup it bounds
    other = [float(i) for i in range(1, 10)]
    base = [2 * o for o in other[:8]] + [9.0]
    assert speedup_interval(base, other) == (2.0, 2.0) and speedup_lower_bound(base, other) == pytest.approx(1.8)
    assert speedup_lower_bound([1.0, 1.1, 0.9, 1.0, 1.2], [1.0] * 5) == 0.9  # 5 rounds: the smallest ratio
    with pytest.raises(ValueError, match="equally long"):
        speedup_interval([1.0], [1.0, 2.0])


def test_table(table):
    assert list(table.columns) == bench.COLUMNS + bench.FLOOR_COLUMNS
    assert len(table) == 2 * len(CONFIGS) and list(table["config"][:5]) == CONFIGS
    assert table.select_dtypes("number").notna().all().all()
    for T, g in table.groupby("T"):
        seq = g.iloc[0]
        # speedups are ratios of the medians measured in the same run
        torch.testing.assert_close(list(g["prefill_speedup"]), list(seq.prefill_ms / g["prefill_ms"]))
        torch.testing.assert_close(list(g["decode_speedup"]), list(g["decode_tok_s"] / seq.decode_tok_s))
        assert seq.prefill_speedup == 1.0 and seq.decode_speedup == 1.0 and seq.top1 == 1.0
        assert seq.prefill_speedup_lo == 1.0 and seq.decode_speedup_lo == 1.0  # every round's ratio is 1
        # a lower bound: positive and at most the speedup it bounds
        for kind in ("prefill", "decode"):
            assert (g[f"{kind}_speedup_lo"] > 0).all() and (g[f"{kind}_speedup_lo"] <= g[f"{kind}_speedup"]).all()
    row = table[table["T"] == 12].set_index("config").loc[CONFIGS]
    assert list(row["bound"]) == [1.0, 4.0, 2.0, 4 / 3, 1.0]  # L / (S + K), +1 call for fwd
    assert list(row["S"]) == [4, 0, 0, 1, 0] and list(row["units"]) == [0, 4, 2, 3, 4]
    assert row.loc["idn:K=4:n=4:warm", "top1"] == 1.0  # K = N is the sequential forward
    assert row.loc["idn:K=1:n=4", "top1"] < 1.0  # perturbed random weights: a single iteration differs
    # one batched call of 4 layers issues fewer operators than 4 calls of one (and K = 4 more than K = 1)
    ops = row["decode_aten_ops"]
    assert ops["idn:K=1:n=4"] < ops["sequential"] < ops["idn:K=4:n=4:warm"] and row["decode_calls"].gt(0).all()
    assert (table["prefill_ms"] > 0).all() and (table["decode_tok_s"] > 0).all()
    assert any("random" in n for n in table.attrs["notes"])


def test_costs_and_floors(table):
    """Each row's bytes and FLOPs per token are its passes' (`snlp_lab.limits`), its floors those of the
    given limits, and x_floor the measured time over the floor."""
    m = bench.bench_model("tiny", None, torch.device("cpu"), torch.float32)[0]
    assert table.attrs["limits"] == LIMITS
    for r in table.itertuples():
        c = bench.prefill_config(parse_config(r.config))
        pre, steps = prefill_cost(m, c, r.T), [decode_cost(m, r.config, p) for p in range(r.T - 3, r.T)]
        assert r.prefill_MB_tok == pytest.approx(pre.bytes / r.T / 1e6)
        assert r.prefill_MFLOP_tok == pytest.approx(pre.flops / r.T / 1e6)
        assert r.decode_MB_tok == pytest.approx(sum(s.bytes for s in steps) / 3 / 1e6)
        assert r.decode_MFLOP_tok == pytest.approx(sum(s.flops for s in steps) / 3 / 1e6)
        assert r.prefill_floor_ms == pytest.approx(1e3 * floor_seconds(pre, LIMITS))
        assert r.decode_floor_ms == pytest.approx(1e3 * sum(floor_seconds(s, LIMITS) for s in steps) / 3)
        assert r.prefill_x_floor == pytest.approx(r.prefill_ms / r.prefill_floor_ms)
        assert r.decode_x_floor == pytest.approx(1e3 / r.decode_tok_s / r.decode_floor_ms)
    seq, k2 = (table[(table.config == c) & (table["T"] == 12)].iloc[0] for c in ("sequential", "idn:K=2:n=4:2xF2:h0"))
    assert k2.prefill_MFLOP_tok > 1.9 * seq.prefill_MFLOP_tok  # K = 2 evaluations of every layer (+ the head once)


@pytest.mark.parametrize("text,msg", [
    ("newtonish:K=2", "valid methods"), ("idn:K=2:n=4:zz", "cannot read 'zz'"), ("idn:4xG2", "cannot read"),
    ("idn:n=4:3xF2", "C·M must equal n_par"), ("", "a configuration must be"),
])
def test_bad_config_strings(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_config(text).check(4)


def test_parse_config():
    c = parse_config("idn:K=2:n=24:4xF6:h0")
    assert (c.method, c.iters, c.n_par, c.chunks, c.init) == ("idn", 2, 24, "4xF6", "h0")
    assert c.bound(32) == 32 / (8 + 2) and c.layout(32) == (8, 4)
    assert parse_config("idn:fwd:kappa=0.5:K=3").bound(12) == 12 / 4
    for text, twice in (("idn:K=1:K=2", "K"), ("idn:h0:fwd", "init"), ("idn:2xF2:1xF4", "chunks")):
        with pytest.raises(ValueError, match=f"gives {twice} twice"):  # the last once won silently
            parse_config(text)


def test_settings():
    s = bench.settings("0.5b", device="cpu")
    assert s["seq_lens"] == [128] and s["decode_tokens"] == 16 and s["threads"] == 1 and "idn:K=2:n=24:4xF6:h0" in s["configs"]
    assert s["repeats"] == 5 and bench.settings("cpu", device="cpu")["repeats"] == 15  # fewer for the 512-wide model
    assert bench.settings("cpu", device="cpu", repeats=2, seq_lens=[64])["repeats"] == 2
    for kw, msg in [(dict(model="1b"), "unknown model '1b': .*valid: a preset"),
                    (dict(model="cpu", configs=["idn:n=24"]), r"n_par must be an integer in 1\.\.12"),
                    (dict(model="cpu", seq_lens=[512]), "at most the sequence_len of model 'cpu'"), (dict(device="tpu"), "valid: auto"),
                    (dict(model="cpu-mhc", configs=["idn:n=12:2xF6"]), "not supported on mHC")]:
        with pytest.raises(ValueError, match=msg):
            bench.settings(**kw)


@pytest.mark.parametrize("profile", ["smoke", "cpu", "long", "paper"])
def test_every_profile_has_its_speedup_defaults(profile):
    """Each profile's benchmark defaults live in the profile (`Profile.speedup`), not in a table of
    profile names inside bench: smoke takes seconds, cpu and long time T = 128 on a CPU and T = 128 and
    2048 on a GPU, paper the 0.5B model at T = 128 and 2048 on either."""
    from snlp_lab.lab.profiles import PROFILES
    study = PROFILES[profile].speedup
    want = {"smoke": ([16], 4, 1, 0), "paper": ([128, 2048], 32, 10, 2)}.get(profile, ([128], 16, 15, 1))
    s = bench.settings(device="cpu", study=study)
    assert (s["seq_lens"], s["decode_tokens"], s["repeats"], s["warmup"]) == want
    assert s["model"] == ("0.5b-plain" if profile == "paper" else "cpu")
    gpu = study.defaults(torch.device("cuda"), 64)
    assert (gpu["seq_lens"], gpu["decode_tokens"], gpu["repeats"], gpu["warmup"]) == (
        ([16], 4, 1, 0) if profile == "smoke" else ([128, 2048], 32, 10, 2))


def test_bad_run_arguments():
    with pytest.raises(ValueError, match="sequence length 40"):
        bench.run_bench("tiny", ["sequential"], seq_lens=(40,), decode_tokens=3, device="cpu")
    with pytest.raises(ValueError, match="x.pt"):
        bench.run_bench("tiny", ["sequential"], seq_lens=(8,), decode_tokens=3, device="cpu", checkpoint="x.pt")


def test_cli_writes_csv(tmp_path, capsys):
    out = tmp_path / "b.csv"
    bench_cmd.main(["--model", "tiny", "--configs", "idn:K=1:n=4", "--seq-lens", "8", "--decode-tokens", "2",
                "--repeats", "1", "--warmup", "0", "--device", "cpu", "--csv", str(out)])
    text = capsys.readouterr().out
    assert "| config" in text and "random" in text
    assert out.read_text().splitlines()[0].startswith("model,weights,device")


def test_notebook_smoke(tmp_path):
    """nb/speedup.ipynb runs in its smoke profile and writes its figure and table."""
    import papermill as pm

    nb = Path(__file__).resolve().parent.parent / "nb" / "speedup.ipynb"
    fig_dir, report_dir = tmp_path / "figures", tmp_path / "reports"
    pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(nb.parent), kernel_name="python3",
                        parameters=dict(profile="smoke", fig_dir=str(fig_dir), report_dir=str(report_dir)),
                        progress_bar=False)
    for path in [fig_dir / "speedup_cpu.png", fig_dir / "speedup_cpu.pdf", report_dir / "speedup_cpu.csv",
                 report_dir / "speedup_cpu.md"]:
        assert path.exists() and path.stat().st_size > 0, path
    assert_states_limits(report_dir / "speedup_cpu")


def assert_states_limits(stem: Path) -> None:
    """A speedup report (stem.csv, stem.md) carries per-token costs, floors and x_floor, and states the
    machine limits measured in its run."""
    import pandas as pd
    df = pd.read_csv(stem.with_suffix(".csv"))
    for col in bench.FLOOR_COLUMNS + ["prefill_MB_tok", "prefill_MFLOP_tok", "decode_MB_tok", "decode_MFLOP_tok"]:
        assert (df[col] > 0).all(), col
    assert "**limits**: copy " in stem.with_suffix(".md").read_text()


def test_checkpoint(tmp_path):
    from snlp_lab.models import checkpoint as ckpt
    from snlp_lab import build_model
    ckpt.save_checkpoint(tmp_path, build_model("tiny"), step=1)
    df = bench.run_bench("tiny", ["idn:K=1:n=4"], seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0,
                         device="cpu", checkpoint=str(tmp_path))
    assert df["weights"][0] == f"checkpoint {tmp_path}" and not any("random" in n for n in df.attrs["notes"])


def test_mhc_model_per_layer():
    from snlp_lab import build_model
    m = build_model("tiny", x0ve=False, n_streams=2)
    df = bench.run_bench(m, ["sequential", "hcn:K=4:n=4", "idn:K=1:n=4"], seq_lens=(8,), decode_tokens=2,
                         repeats=1, warmup=0, device="cpu")
    assert list(df["top1"][:2]) == [1.0, 1.0] and len(df) == 3
    assert bench.settings("cpu-mhc", device="cpu")["configs"][3] == "hcn:K=2:n=12"


def test_baseline_first_and_caller_model_untouched(tiny):
    df = bench.run_bench(tiny, ["idn:K=1:n=4", "sequential"], seq_lens=(8,), decode_tokens=2, repeats=1,
                         warmup=0, device="cpu")
    assert list(df["config"]) == ["sequential", "idn:K=1:n=4"] and df["prefill_speedup"][0] == 1.0
    assert next(tiny.parameters()).dtype == torch.float64  # timed on a float32 copy


def test_compiled_bench_never_hits_the_recompile_limit(tiny):
    """More distinct shapes than dynamo's default limit of 8 graphs: every configuration runs compiled."""
    configs = ["sequential", "idn:K=1:n=1", "idn:K=1:n=2", "idn:K=1:n=3", "idn:K=1:n=4", "idn:K=1:n=4:2xF2:h0",
               "idn:K=1:n=4:1xF4:h0", "idn:K=1:n=2:1xF2:h0", "sequential:n=4:4xF1", "idn:K=2:n=3:fwd"]
    df = bench.run_bench(tiny, configs, seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0, device="cpu",
                         compile={"backend": "eager"})
    assert set(df["compile"]) == {"{'backend': 'eager'}"}, df["compile"].tolist()


def test_several_compile_settings_are_timed_in_one_run(tiny):
    """compile=[False, {...}]: a row per (configuration, setting), and every speedup divides by the fastest
    sequential decoder of the run, so exactly one sequential row per pass has speedup 1 and none exceeds it."""
    df = bench.run_bench(tiny, ["sequential", "idn:K=1:n=4"], seq_lens=(8,), decode_tokens=2, repeats=3, warmup=0,
                         device="cpu", compile=[False, {"backend": "eager"}])
    assert list(zip(df.config, df.compile)) == [("sequential", "False"), ("sequential", "{'backend': 'eager'}"),
                                                ("idn:K=1:n=4", "False"), ("idn:K=1:n=4", "{'backend': 'eager'}")]
    seq = df[df.config == "sequential"]
    for kind in ("prefill", "decode"):
        assert seq[f"{kind}_speedup"].max() == 1.0 and (seq[f"{kind}_speedup"] <= 1.0).all()
        assert (df[f"{kind}_speedup_lo"] <= df[f"{kind}_speedup"]).all() and (df[f"{kind}_speedup_lo"] > 0).all()
    fastest = 1e3 / seq.prefill_ms.min()
    assert df.prefill_speedup.tolist() == pytest.approx((1e3 / df.prefill_ms / fastest).tolist())
    with pytest.raises(ValueError, match="at least one"):
        bench.run_bench(tiny, ["sequential"], seq_lens=(8,), decode_tokens=2, device="cpu", compile=[])


def test_compile_failure_falls_back_and_says_so(tiny):
    df = bench.run_bench(tiny, ["sequential", "idn:K=1:n=4"], seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0,
                         device="cpu", compile={"backend": "no-such-backend"})
    assert all(c.startswith("eager (compile failed: ") for c in df["compile"]), df["compile"].tolist()
    assert df["decode_tok_s"].gt(0).all()


# ------------------------------------------------------------------------------------------ the four variants
# (configuration, pass) -> times of (eager, graphed, compiled, compiled+graphed), for the fake timings below
FAKE = {("sequential", "prefill"): (10.0, 8.0, 6.0, 5.0), ("sequential", "decode"): (10.0, 4.0, 6.0, 4.5),
        ("idn:K=1:n=4", "prefill"): (7.0, 5.0, 3.0, 2.5), ("idn:K=1:n=4", "decode"): (8.0, 2.0, 5.0, 2.0),
        ("idn:K=2:n=4:2xF2:h0", "prefill"): (9.0, 1.0, 9.0, 9.0), ("idn:K=2:n=4:2xF2:h0", "decode"): (9.0, 9.0, 9.0, 9.0),
        ("idn:K=1:n=3:fwd", "prefill"): (9.0, 9.0, 9.0, 9.0), ("idn:K=1:n=3:fwd", "decode"): (9.0, 1.5, 9.0, 9.0)}


@pytest.fixture
def fake_timings(monkeypatch):
    """run_bench with its passes stubbed out and each timed function taking FAKE's time: the column logic
    alone, in milliseconds. Returns the list of the compiled untimed passes, in order."""
    compiled = []

    def untimed(m, c, idx, decode_tokens, dev, compile):
        if compile:
            compiled.append(c.text)
        return torch.zeros(1, idx.shape[1], m.config.vocab_size)

    def times(fns, repeats, warmup, dev):
        out = {}
        for k in fns:  # (config, setting, graphed, pass) in the timing; (config, pass) in the ranking of "best"
            text, i, graphed, kind = k if len(k) == 4 else (k[0], 0, True, k[1])
            out[k] = [FAKE[(text, kind)][2 * i + graphed]] * repeats
        return out

    monkeypatch.setattr(bench, "_untimed_pass", untimed)
    monkeypatch.setattr(bench, "_step_ops", lambda *a: {"python": 1, "aten": 1})
    monkeypatch.setattr(bench, "_runs", lambda *a: {"prefill": None, "decode": None})
    monkeypatch.setattr(bench, "graphed_runs", lambda m, c, idx, *a: {
        "prefill": lambda: torch.zeros(1, idx.shape[1], m.config.vocab_size), "decode": None})
    monkeypatch.setattr(bench, "round_seconds", times)
    return compiled


def test_every_speedup_is_over_the_fastest_sequential_variant(tiny, fake_timings):
    """compile=[False, True] with graphs: four variants per configuration; each pass's baseline is the
    fastest of the sequential forward's four (prefill: compiled+graphed, 5; decode: graphed, 4), named
    in every row, and every speedup of every variant divides it."""
    df = bench.run_bench(tiny, ["sequential", "idn:K=1:n=4"], seq_lens=(8,), decode_tokens=2, repeats=3, warmup=0,
                         device="cpu", compile=[False, True], graphs=True, limits=LIMITS)
    assert set(df.prefill_baseline) == {"compiled+graphed"} and set(df.decode_baseline) == {"graphed"}
    assert list(zip(df.config, df.compile)) == [("sequential", "False"), ("sequential", "True"),
                                                ("idn:K=1:n=4", "False"), ("idn:K=1:n=4", "True")]
    for (cfg, i), r in zip([("sequential", 0), ("sequential", 1), ("idn:K=1:n=4", 0), ("idn:K=1:n=4", 1)],
                           df.itertuples()):
        pre, dec = FAKE[(cfg, "prefill")][2 * i:2 * i + 2], FAKE[(cfg, "decode")][2 * i:2 * i + 2]
        assert (r.prefill_speedup, r.prefill_graph_speedup) == pytest.approx((5 / pre[0], 5 / pre[1]))
        assert (r.decode_speedup, r.decode_graph_speedup) == pytest.approx((4 / dec[0], 4 / dec[1]))
        assert r.prefill_speedup_lo == pytest.approx(5 / pre[0])  # equal rounds: the bound is the ratio
        assert r.prefill_ms == pytest.approx(1e3 * pre[0]) and r.decode_graph_tok_s == pytest.approx(2 / dec[1])
        assert (r.compile_s > 0) == (i == 1) and r.compile_s >= 0
    wide = bench.by_variant(df)
    assert list(wide.config) == ["sequential", "idn:K=1:n=4"] and list(wide.compiled) == ["True", "True"]
    idn = wide.iloc[1]
    assert (idn.prefill_speedup, idn.prefill_graph_speedup, idn.prefill_compiled_speedup,
            idn.prefill_compiled_graph_speedup) == pytest.approx((5 / 7, 1.0, 5 / 3, 2.0))
    assert (idn.decode_speedup, idn.decode_graph_speedup, idn.decode_compiled_speedup,
            idn.decode_compiled_graph_speedup) == pytest.approx((0.5, 2.0, 0.8, 2.0))
    seq = wide.iloc[0]  # the baseline's own variants: the fastest is 1, the others below
    speeds = [seq[f"prefill{v}_speedup"] for v in ("", "_graph", "_compiled", "_compiled_graph")]
    assert max(speeds) == 1.0 and speeds == pytest.approx([0.5, 0.625, 5 / 6, 1.0])
    # each variant's time over the same floor
    for v in ("", "_graph", "_compiled", "_compiled_graph"):
        assert wide[f"prefill{v}_x_floor"].tolist() == pytest.approx((wide[f"prefill{v}_ms"] / wide.prefill_floor_ms).tolist())
        assert wide[f"decode{v}_x_floor"].tolist() == pytest.approx(
            (1e3 / wide[f"decode{v}_tok_s"] / wide.decode_floor_ms).tolist())


def test_compile_plan_and_budget(tiny, fake_timings):
    """compile_configs picks what is compiled (the baseline always first; "best" the fastest uncompiled
    configuration per pass by graphed time), compile_budget_s stops the rest; what was not compiled keeps
    its rows, with NaN times and the reason in `compile`."""
    cfgs = ["sequential", "idn:K=1:n=4", "idn:K=2:n=4:2xF2:h0", "idn:K=1:n=3:fwd"]
    run = lambda **kw: bench.run_bench(tiny, cfgs, seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0, device="cpu",
                                       compile=[False, True], graphs=True, **kw)
    df = run(compile_configs=["best"])
    # fastest graphed prefill: 2xF2 (1 ms); fastest graphed decode: fwd (1.5 ms)
    assert fake_timings == ["sequential", "idn:K=2:n=4:2xF2:h0", "idn:K=1:n=3:fwd"]
    skipped = df[df.compile.str.startswith("not compiled")]
    assert list(skipped.config) == ["idn:K=1:n=4"] and skipped.compile.iloc[0] == "not compiled (not in compile_configs)"
    assert skipped[["prefill_ms", "decode_tok_s", "prefill_graph_ms", "prefill_speedup"]].isna().all().all()
    wide = bench.by_variant(df)
    assert wide.set_index("config").compiled.to_dict() == {
        "sequential": "True", "idn:K=1:n=4": "not compiled (not in compile_configs)",
        "idn:K=2:n=4:2xF2:h0": "True", "idn:K=1:n=3:fwd": "True"}
    assert wide.prefill_compiled_ms.isna().tolist() == [False, True, False, False]
    fake_timings.clear()
    df = run(compile_budget_s=0)  # the baseline only: everything else waits for a budget that is spent
    assert fake_timings == ["sequential"]
    assert set(df[df.compile != "False"].compile[1:]) == {"not compiled (compile budget of 0 s spent)"}
    fake_timings.clear()
    run(compile_configs=["idn:K=1:n=4"], compile_budget_s=1e9)  # named first, the rest while the budget lasts
    assert fake_timings == ["sequential", "idn:K=1:n=4", "idn:K=2:n=4:2xF2:h0", "idn:K=1:n=3:fwd"]
    for kw, msg in [(dict(compile_configs=["idn:K=3:n=4"]), "not a configuration of the run"),
                    (dict(compile_budget_s=-1), "compile_budget_s must be"),
                    (dict(compile=True, compile_configs=["best"]), "needs the setting False"),
                    (dict(compile=False, compile_configs=["best"]), "needs a compile setting"),
                    (dict(compile=[False, "reduce-overhead"], graphs=True), "cannot capture; valid with graphs: True")]:
        with pytest.raises(ValueError, match=msg):
            bench.run_bench(tiny, cfgs, seq_lens=(8,), decode_tokens=2, repeats=1, warmup=0, device="cpu",
                            **{"compile": [False, True], **kw})


def test_compiled_and_graphed_on_cpu_equals_eager(tiny):
    """The four variants for real on a CPU (dynamo's eager backend: the same fullgraph traces, no code
    generation): on a CPU "graphed" runs uncaptured, so compiled+graphed computes the eager logits; the
    compiled decoders report their compile seconds; the baseline is the fastest sequential variant."""
    m = tiny.float()
    eager_backend = {"backend": "eager"}
    idx = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    for text in ("sequential", "idn:K=1:n=4:2xF2:h0", "idn:K=2:n=3:h0:fullmask"):
        c = parse_config(text)
        g = bench.graphed_runs(m, c, idx, 3, torch.device("cpu"), compile=eager_backend)
        ref = bench.Decoder(m, **c.decoder_kwargs()).prefill(idx, parallel=True)
        torch.testing.assert_close(g["prefill"](), ref, rtol=1e-5, atol=1e-5)
    df = bench.run_bench(m, ["sequential", "idn:K=1:n=4:2xF2:h0"], seq_lens=(10,), decode_tokens=3, repeats=3,
                         warmup=0, device="cpu", compile=[False, eager_backend], graphs=True)
    compiled = df.compile != "False"
    assert (df.compile_s[compiled] > 0).all() and (df.compile_s[~compiled] == 0).all()
    assert (df.graph_err < 1e-5).all()  # each replay computes its decoder's untimed logits
    assert (df[df.config == "sequential"].top1 == 1.0).all()
    wide = bench.by_variant(df)
    assert (wide.compiled_graph_err < 1e-5).all() and (wide.compile_s > 0).all()
    seq = df[df.config == "sequential"]
    for kind, rate in (("prefill", False), ("decode", True)):
        times = {(r.compile, g): (getattr(r, f"{kind}{g}_tok_s" if rate else f"{kind}{g}_ms"))
                 for r in seq.itertuples() for g in ("", "_graph")}
        best = (max if rate else min)(times, key=times.get)
        name = bench.variant_name(best[0] != "False" and eager_backend, best[1] == "_graph")
        assert set(df[f"{kind}_baseline"]) == {name}
        # the baseline's own speedup is 1 and no sequential variant beats it
        assert max(seq[f"{kind}_speedup"].max(), seq[f"{kind}_graph_speedup"].max()) == pytest.approx(1.0)


def test_cli_all_variants(tmp_path, capsys, fake_timings):
    out = tmp_path / "b.csv"
    bench_cmd.main(["--model", "tiny", "--configs", "idn:K=1:n=4", "--seq-lens", "8", "--decode-tokens", "2",
                    "--repeats", "1", "--warmup", "0", "--device", "cpu", "--all-variants", "--compile-configs",
                    "best", "--compile-budget", "0", "--csv", str(out)])
    text = capsys.readouterr().out
    assert "prefill_compiled_graph_ms" in text and "compiled+graphed" in text and "prefill_baseline" in text
    assert fake_timings == ["sequential", "idn:K=1:n=4"]
    assert "compile_s" in out.read_text().splitlines()[0]
    assert bench_cmd.main(["--model", "tiny", "--compile-budget", "5", "--device", "cpu"]) == 2
