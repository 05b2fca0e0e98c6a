"""The claims ledger on hand-written tables: for every claim a case that holds, one that does not and one
with missing data, with the numbers it must report; the statistics against their formulas; the writer
and its command line, which never writes the committed reports/; and the ledger's imports, which hold no
training code."""
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from snlp_lab.lab import claims as C
import snlp_lab.claims as claims_cmd
from test_layout import GRAPH

ROOT = Path(__file__).resolve().parents[1]

S = C.Setting("a test", 4, 32, 10, 1000, "toy text", "cpu", finetune_steps=3)
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977987}  # Student-t 97.5% quantiles by degrees of freedom


def curves(jacobi_err, idn_ppl=(120.0, 95.0, 100.0), err_at_L=1e-7, models=("m1", "m2")):
    """convergence_curves: L = 3, Jacobi's error of h_L at k = 1, 2 given, exact at k = 3."""
    rows = []
    for m in models:
        for k in (1, 2, 3):
            rows.append(dict(model=m, method="jacobi", k=k, L=3, seq_ppl=100.0, ppl=300.0 if k < 3 else 100.0,
                             final_err=err_at_L if k == 3 else jacobi_err))
            rows.append(dict(model=m, method="idn", k=k, L=3, seq_ppl=100.0, ppl=idn_ppl[k - 1],
                             final_err=err_at_L if k == 3 else 1e-3))
    return pd.DataFrame(rows)


def runs(base_seq, reg_seq, base_snlp=None, reg_snlp=None, variants=("plain",), reg="idn"):
    """regularization_runs: one row per (variant, reg, seed)."""
    rows = []
    for v in variants:
        for name, seq, snlp in (("none", base_seq, base_snlp), (reg, reg_seq, reg_snlp)):
            for i, p in enumerate(seq):
                rows.append(dict(variant=v, reg=name, seed=i, seq_ppl=p, snlp=f"{reg} K=1 n=4",
                                 snlp_ppl=p if snlp is None else snlp[i]))
    return pd.DataFrame(rows)


def frontier(rows, model="plain/idn"):
    """frontier_all: (config, S, ppl, ppl_change_%, speedup) rows of one model, with its sequential row."""
    seq = dict(model_name=model, config="sequential", S=4, ppl=100.0, **{"ppl_change_%": 0.0}, speedup=1.0)
    return pd.DataFrame([seq] + [dict(model_name=model, config=c, S=s, ppl=100 * (1 + ch / 100),
                                      **{"ppl_change_%": ch}, speedup=sp) for c, s, ch, sp in rows])


def has_no_nan(c: C.Claim):
    text = " ".join(str(v) for v in vars(c).values())
    return not re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE)


# ------------------------------------------------------------------------------------------ statistics
def test_mean_ci_is_the_student_t_interval():
    e = C.mean_ci([1.0, 2.0, 1.5])
    half = T975[2] * 0.5 / math.sqrt(3)
    assert e.mean == pytest.approx(1.5) and (e.lo, e.hi) == pytest.approx((1.5 - half, 1.5 + half)) and e.n == 3
    assert e.text() == f"+1.5% [{1.5 - half:+.1f}, {1.5 + half:+.1f}] (n = 3 seeds)"
    one = C.mean_ci([4.0])
    assert not one.has_interval and one.text() == "+4.0%, no interval (n = 1 seed)"
    assert not one.below(5) and not one.above(0)  # a verdict that needs an interval does not get one
    same = C.mean_ci([2.0, 2.0])
    assert (same.lo, same.hi) == (2.0, 2.0)
    with pytest.raises(ValueError, match="at least one value"):
        C.mean_ci([])


def test_relative_change_is_welch_over_the_baseline_mean():
    e = C.relative_change([90.0, 91.0, 89.0], [100.0, 101.0, 99.0])
    half = T975[4] * math.sqrt(1 / 3 + 1 / 3)  # equal variances: Welch's df = 4
    assert e.mean == pytest.approx(-10.0) and e.n == (3, 3)
    assert (e.lo, e.hi) == pytest.approx((-10 - half, -10 + half), rel=1e-9)
    assert e.below(0) and not e.above(0)
    assert not C.diff_ci([1.0], [2.0, 3.0]).has_interval


def test_last_quarter_change():
    c = pd.DataFrame({"step": [100, 200, 300, 400], "val_ppl": [80.0, 60.0, 50.0, 45.0]})
    assert C.last_quarter_change(c) == pytest.approx(100 * (45 / 50 - 1))  # step 300 -> 400
    assert pd.isna(C.last_quarter_change(c.iloc[-1:]))  # one evaluation: no change to report


def test_before_warmdown_change_leaves_the_warm_down_out():
    # 800 steps, warm-down from step 640: the eighth before it is step 500 -> 600, 60 -> 57
    c = pd.DataFrame({"step": [100, 200, 300, 400, 500, 600, 700, 800],
                      "val_ppl": [90.0, 75.0, 66.0, 62.0, 60.0, 57.0, 45.0, 40.0],
                      "lr_mult": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.01]})
    assert C.before_warmdown_change(c) == pytest.approx(100 * (57 / 60 - 1))
    assert C.last_quarter_change(c) == pytest.approx(100 * (40 / 57 - 1))  # 600 -> 800, warm-down included
    assert pd.isna(C.before_warmdown_change(c.drop(columns="lr_mult")))  # a table without the column
    assert pd.isna(C.before_warmdown_change(c.assign(lr_mult=[0.5] * 7 + [0.1])))  # never at the peak rate


# ------------------------------------------------------------------------------------------ (a)
def test_a_jacobi_stalls():
    c = C.claim_a({"convergence_curves": curves(0.5)}, S)
    assert c.verdict == C.HOLDS and "m1 0.5, m2 0.5" in c.ours and "2 of 2 models" in c.ours
    assert C.claim_a({"convergence_curves": curves(float("nan"))}, S).verdict == C.HOLDS  # NaN: diverged
    no = C.claim_a({"convergence_curves": curves(0.01)}, S)
    assert no.verdict == C.NO and "0 of 2" in no.ours and no.differs
    gone = C.claim_a({}, S)
    assert gone.verdict == C.UNTESTABLE and "convergence_curves.csv is missing" in gone.rule and gone.ours == "—"
    assert all(map(has_no_nan, (c, no, gone)))


# ------------------------------------------------------------------------------------------ (b)
def test_b_one_iteration_close_to_sequential():
    t = {"regularization_runs": runs([100.0] * 3, [100.0] * 3, [200.0] * 3, [101.0, 102.0, 101.5])}
    c = C.claim_b(t, S)
    half = T975[2] * 0.5 / math.sqrt(3)
    assert c.verdict == C.HOLDS and f"K=1 +1.5% [{1.5 - half:+.1f}, {1.5 + half:+.1f}] (n = 3 seeds)" in c.ours
    assert "+1.5 points from the paper's ±0.0%" in c.differs
    far = C.claim_b({"regularization_runs": runs([100.0] * 3, [100.0] * 3, None, [130.0, 131.0, 129.0])}, S)
    assert far.verdict == C.NO and "+30.0%" in far.ours
    # one seed: no interval, at most "holds weakly"; two iterations close is enough for that too
    one = C.claim_b({"regularization_runs": runs([100.0], [100.0], None, [104.0])}, S)
    assert one.verdict == C.WEAK and "no interval" in one.ours
    k2 = {"regularization_runs": runs([100.0], [100.0], None, [130.0]),
          "frontier_all": frontier([("idn:K=2:n=4:h0", 0, 2.0, 0.8), ("idn:K=2:n=2:h0", 2, 0.1, 1.2)])}
    w = C.claim_b(k2, S)
    assert w.verdict == C.WEAK and "K=2 +2.0% (seed 0)" in w.ours
    gone = C.claim_b({"regularization_runs": runs([100.0], [100.0]).drop(columns="snlp_ppl")}, S)
    assert gone.verdict == C.UNTESTABLE and "lacks the column(s) snlp_ppl" in gone.rule


# ------------------------------------------------------------------------------------------ (c)
def test_c_regulariser_changes_sequential_ppl():
    c = C.claim_c({"regularization_runs": runs([100.0, 101.0, 99.0], [90.0, 91.0, 89.0])}, S)
    half = T975[4] * math.sqrt(2 / 3)
    assert c.verdict == C.HOLDS and f"plain/idn: -10.0% [{-10 - half:+.1f}, {-10 + half:+.1f}] (n = 3 + 3 seeds)" in c.ours
    assert "plain/idn -10.0% against the paper's -5.6% (0.5B w/o x0ve IDN): -4.4 points" in c.differs
    up = C.claim_c({"regularization_runs": runs([100.0, 101.0, 99.0], [110.0, 111.0, 109.0])}, S)
    assert up.verdict == C.NO and "1 higher" in up.rule
    unclear = C.claim_c({"regularization_runs": runs([100.0, 104.0, 96.0], [99.0, 103.0, 95.0])}, S)
    assert unclear.verdict == C.NO and "1 unclear" in unclear.rule and "1 of 1 inside ±2.4%" not in unclear.rule
    one = C.claim_c({"regularization_runs": runs([100.0], [90.0], variants=("plain", "x0ve"))}, S)
    assert one.verdict == C.WEAK and "2 lower by a change without interval" in one.rule  # one seed: at most weakly
    assert C.claim_c({"regularization_runs": runs([100.0], [110.0])}, S).verdict == C.NO
    nan = runs([100.0, 101.0], [90.0, float("nan")])
    gone = C.claim_c({"regularization_runs": nan}, S)
    assert gone.verdict == C.UNTESTABLE and "missing values in the column(s) seq_ppl" in gone.rule


def test_c_says_whether_the_curves_flattened_before_the_warm_down():
    def curve(v, seed, ppl):  # 800 steps, the last two evaluations in the warm-down
        return [dict(variant=v, reg="none", seed=seed, seq_len=128, step=k, val_ppl=p, lr_mult=m)
                for k, p, m in zip((200, 400, 500, 600, 700, 800), ppl, (1.0, 1.0, 1.0, 1.0, 0.7, 0.01))]
    flat = curve("plain", 0, (80.0, 61.0, 60.0, 59.4, 45.0, 40.0))  # 500 -> 600: -1.0%
    learning = curve("plain", 1, (80.0, 70.0, 60.0, 54.0, 45.0, 40.0))  # 500 -> 600: -10.0%
    t = {"regularization_runs": runs([100.0, 101.0, 99.0], [90.0, 91.0, 89.0])}
    one = C.claim_c({**t, "regularization_curves": pd.DataFrame(flat)}, S)
    assert ("changed by -1.0% to -1.0% (median -1.0%): 1 of 1 single runs within ±3%, 1 of 1 means over seeds, "
            "so the curves had flattened at the peak rate; "
            "over the last quarter of training, warm-down included, it changed by -32.7% to -32.7%") in one.differs
    two = C.claim_c({**t, "regularization_curves": pd.DataFrame(flat + learning)}, S)
    assert ("-10.0% to -1.0% (median -5.5%): 1 of 2 single runs within ±3%, 0 of 1 means over seeds, "
            "so some models were still learning") in two.differs
    # two seeds that wander either way: neither run is within ±3%, their mean is (the table's curve)
    up = curve("plain", 1, (80.0, 70.0, 60.0, 62.4, 45.0, 40.0))  # 500 -> 600: +4.0%
    down = curve("plain", 0, (80.0, 70.0, 60.0, 57.6, 45.0, 40.0))  # -4.0%
    wander = C.claim_c({**t, "regularization_curves": pd.DataFrame(up + down)}, S)
    assert "0 of 2 single runs within ±3%, 1 of 1 means over seeds, so the curves had flattened" in wander.differs
    old = C.claim_c({**t, "regularization_curves": pd.DataFrame(flat).drop(columns="lr_mult")}, S)
    assert "not followed to a plateau: over the last quarter" in old.differs  # a table from before lr_mult


def test_each_context_is_a_family_of_its_own():
    short = runs([100.0, 101.0, 99.0], [90.0, 91.0, 89.0], variants=("x0ve",)).assign(seq_len=128)
    long = runs([100.0, 101.0, 99.0], [110.0, 111.0, 109.0], variants=("x0ve",)).assign(seq_len=256)
    c = C.claim_c({"regularization_runs": pd.concat([short, long], ignore_index=True)}, S)
    assert "x0ve/idn: -10.0%" in c.ours and "x0ve (T=256)/idn: +10.0%" in c.ours
    assert c.verdict == C.NO and "1 of 2 families lower" in c.rule and "1 higher" in c.rule
    # the paper's v1 number (128-token contexts) is compared with the first context only
    assert "x0ve/idn -10.0% against the paper's -23.4%" in c.differs and "T=256)/idn +10.0% against" not in c.differs
    d = C.claim_d({"regularization_runs": pd.concat([short, long], ignore_index=True)}, S)
    assert "x0ve:" in d.ours and "x0ve (T=256):" in d.ours


# ------------------------------------------------------------------------------------------ (d)
def pretrained(base, tuned, scratch):
    rows = []
    for m, ch in (("baseline (no reg)", base), ("baseline + IDN fine-tune", tuned), ("IDN from scratch", scratch)):
        rows += [dict(model=m, config="sequential", n_par=0, K=0, ppl=100.0, **{"ppl_change_%": 0.0}),
                 dict(model=m, config="idn K=1 n=4 h0", n_par=4, K=1, ppl=100 + ch, **{"ppl_change_%": ch}),
                 dict(model=m, config="idn K=1 n=2 h0", n_par=2, K=1, ppl=100.0, **{"ppl_change_%": 0.0})]
    return pd.DataFrame(rows)


def test_d_baselines_less_amenable_and_fine_tuning_does_not_fix_it():
    r = runs([100.0] * 3, [100.0] * 3, [200.0, 210.0, 190.0], [101.0, 102.0, 103.0])
    c = C.claim_d({"regularization_runs": r, "pretrained": pretrained(100.0, 20.0, 1.0)}, S)
    assert c.verdict == C.HOLDS and "baseline minus idn-regularised one-step gap +98.0 points" in c.ours
    assert "fine-tuned for 3 steps +20.0%, regularised from scratch (10 steps) +1.0%: fine-tuning does not fix it" in c.ours
    fixed = C.claim_d({"regularization_runs": r, "pretrained": pretrained(100.0, 1.0, 3.0)}, S)
    assert fixed.verdict == C.NO and "fine-tuning fixes it" in fixed.ours
    part = C.claim_d({"regularization_runs": r}, S)  # no pretrained table: at most weakly
    assert part.verdict == C.WEAK and "fine-tuning: not measured" in part.ours
    same = C.claim_d({"regularization_runs": runs([100.0] * 3, [100.0] * 3, [101.0, 102.0, 103.0], [150.0, 151.0, 149.0]),
                      "pretrained": pretrained(100.0, 20.0, 1.0)}, S)
    assert same.verdict == C.NO
    gone = C.claim_d({"pretrained": pretrained(1.0, 1.0, 1.0)}, S)
    assert gone.verdict == C.UNTESTABLE and "regularization_runs.csv is missing" in gone.rule


# ------------------------------------------------------------------------------------------ (e)
def test_e_exact_at_n_par_and_not_monotone():
    c = C.claim_e({"convergence_curves": curves(0.5)}, S)
    # per model: Jacobi monotone (300, 300, 100), IDN not (120, 95, 100): 2 of 4 pairs, not more than half
    assert c.verdict == C.WEAK and "non-monotone in K for 2 of 4" in c.ours and "idn K=2, -5.0% against" in c.ours
    assert "-5.0% against sequential, +5.8 points from the paper's -10.8%" in c.differs
    one = C.claim_e({"convergence_curves": curves(0.5, models=("m1",)).query("method == 'idn'")}, S)
    assert one.verdict == C.HOLDS
    mono = C.claim_e({"convergence_curves": curves(0.5, idn_ppl=(120.0, 105.0, 100.0))}, S)
    assert mono.verdict == C.NO and "0 of 4" in mono.ours
    # a rise below PPL_RTOL is rounding, not a worse iterate
    tiny = C.claim_e({"convergence_curves": curves(0.5, idn_ppl=(120.0, 100.0, 100.0 * (1 + 1e-6)))}, S)
    assert tiny.verdict == C.NO
    inexact = C.claim_e({"convergence_curves": curves(0.5, err_at_L=0.3)}, S)
    assert inexact.verdict == C.NO and "exact (<= 0.0001) where finite: no" in inexact.rule
    # a float32 solve that overflowed before k = L is reported and caps the verdict at weakly
    d = curves(0.5, models=("m1",)).query("method == 'idn'")
    blown = pd.concat([d, d.assign(method="newton", final_err=float("inf"), ppl=float("inf"))], ignore_index=True)
    b = C.claim_e({"convergence_curves": blown}, S)
    assert b.verdict == C.WEAK and "1 solve(s) overflowed to non-finite values before K = L: m1 newton" in b.ours
    assert "largest error of h_L at K = L: 1e-07 (1 solve" in b.ours and "1 overflowed" in b.rule
    assert C.claim_e({}, S).verdict == C.UNTESTABLE


# ------------------------------------------------------------------------------------------ (f)
def mhc_pairs(hcn_change, idn_change=1.0):
    cfgs = [f"{{}}:K={k}:n=4:{init}" for k in (1, 2, 3) for init in ("h0", "fwd")]
    return frontier([(c.format("hcn"), 0, hcn_change, 1.5) for c in cfgs] +
                    [(c.format("idn"), 0, idn_change, 1.5) for c in cfgs], model="mhc/hcn")


def test_f_hcn_beats_idn_on_mhc():
    c = C.claim_f({"frontier_all": mhc_pairs(0.5)}, S)
    assert c.verdict == C.HOLDS and "lower PPL in 6, higher in 0, tied in 0 of 6" in c.ours and "p = 0.031" in c.ours
    assert C.claim_f({"frontier_all": mhc_pairs(2.0)}, S).verdict == C.NO
    three = mhc_pairs(0.5).query("config.str.endswith('h0')")
    assert C.claim_f({"frontier_all": three}, S).verdict == C.WEAK  # 3 wins of 3: p = 0.25
    ties = C.claim_f({"frontier_all": mhc_pairs(1.0)}, S)
    assert ties.verdict == C.UNTESTABLE and "tie" in ties.rule
    gone = C.claim_f({"frontier_all": frontier([("idn:K=1:n=4:h0", 0, 1.0, 2.0)])}, S)
    assert gone.verdict == C.UNTESTABLE and "no HCN configuration" in gone.rule
    j = pd.DataFrame(dict(variant=["mhc", "mhc"], surrogate=["hcn", "idn"], baseline_distance=[0.1, 0.3],
                          reg_distance=[0.05, 0.2]))
    assert "(mhc, baseline -> regularised): HCN 0.100 -> 0.050, IDN 0.300 -> 0.200" in C.claim_f({"frontier_all": mhc_pairs(0.5), "jacobians": j}, S).ours


# ------------------------------------------------------------------------------------------ (g)
def test_g_fused_speedup_at_equal_ppl():
    c = C.claim_g({"frontier_all": frontier([("idn:K=1:n=4:2xF2:h0", 0, 0.5, 1.5), ("idn:K=1:n=4:h0", 0, 8.0, 3.0)])}, S)
    assert c.verdict == C.HOLDS and "best fused at <= +1% PPL: 1.50x at +0.5% (prefill, plain/idn idn:K=1:n=4:2xF2:h0)" in c.ours
    assert "decode: not testable here" in c.ours and "is 1.58 times that" in c.differs and "On a CPU" in c.differs
    weak = C.claim_g({"frontier_all": frontier([("idn:K=1:n=4:2xF2:h0", 0, 0.5, 1.05), ("idn:K=2:n=4:h0", 0, 3.0, 1.3)])}, S)
    assert weak.verdict == C.WEAK
    no = C.claim_g({"frontier_all": frontier([("idn:K=1:n=4:2xF2:h0", 0, 9.0, 2.0), ("idn:K=2:n=4:h0", 0, 0.0, 0.9)])}, S)
    assert no.verdict == C.NO and "No fused configuration of ours keeps PPL within +1%" in no.differs
    baseline_only = C.claim_g({"frontier_all": frontier([("idn:K=1:n=4:2xF2:h0", 0, 0.5, 1.5)], model="plain/none")}, S)
    assert baseline_only.verdict == C.UNTESTABLE


def test_g_and_h_need_a_speedup_the_runs_noise_supports():
    """A median ratio >= 1.1x whose run's 95% lower bound is <= 1 is not faster: the noise explains it."""
    f = frontier([("idn:K=1:n=4:2xF2:h0", 0, 0.5, 1.5), ("idn:K=1:n=4:h0", 0, 0.2, 1.2)])
    f["speedup_lo"] = [1.0, 0.95, 1.05]
    c = C.claim_g({"frontier_all": f}, S)  # the 1.5x is noise; the 1.2x is not, and is picked
    assert c.verdict == C.WEAK and "1.20x (>= 1.05x) at +0.2% (prefill, plain/idn idn:K=1:n=4:h0)" in c.ours
    f["speedup_lo"] = [1.0, 0.95, 0.97]
    assert C.claim_g({"frontier_all": f}, S).verdict == C.NO
    f["speedup_lo"] = [1.0, 1.2, 0.97]
    assert C.claim_g({"frontier_all": f}, S).verdict == C.HOLDS
    h = spec().assign(speedup_lo=[0.98, 1.02, 0.8])
    c = C.claim_h({"speculative": h}, S)  # 1.3x with a lower bound below 1, and 1.1x above it
    assert c.verdict == C.HOLDS and "best at T = 0: 1.10x (>= 1.02x) (idn:K=1:n=4, B = 2" in c.ours
    assert C.claim_h({"speculative": h.assign(speedup_lo=[0.98, 0.99, 0.8])}, S).verdict == C.WEAK
    # an empty cell is a missing bound: the median ratio alone decides, and no "nan" is written
    c = C.claim_h({"speculative": h.assign(speedup_lo=[float("nan"), 0.99, 0.8])}, S)
    assert c.verdict == C.HOLDS and "best at T = 0: 1.30x (idn:K=1:n=4, B = 1" in c.ours and has_no_nan(c)


def test_g_judges_the_fastest_picks_timed_again():
    """With the notebooks' picks timed again, each best is the fastest as measured (noise bound or not),
    judged on its new timing; a pick without a new timing keeps its first one."""
    f = frontier([("idn:K=1:n=4:2xF2:h0", 0, 0.5, 1.5), ("idn:K=1:n=4:1xF4:h0", 0, 0.8, 1.3), ("idn:K=1:n=4:h0", 0, 3.0, 1.6)])
    f["speedup_lo"] = [1.0, 0.9, 1.2, 1.3]
    again = lambda *rows: pd.DataFrame([dict(pick=p, model_name="plain/idn", config=c, explored_speedup=0.0,
                                             speedup=sp, speedup_lo=lo) for p, c, sp, lo in rows])
    t = {"frontier_all": f, "frontier_confirm": again(("fused", "idn:K=1:n=4:2xF2:h0", 1.04, 0.95),
                                                      ("close", "idn:K=1:n=4:h0", 1.4, 1.2))}
    c = C.claim_g(t, S)  # the 1.5x fused pick (not the 1.3x one the noise supported) is 1.04x timed again
    assert c.verdict == C.WEAK and "1.50x (>= 0.90x) at +0.5% (prefill, plain/idn idn:K=1:n=4:2xF2:h0), timed " \
                                  "again: 1.04x (>= 0.95x)" in c.ours
    assert "at <= +5%: 1.60x (>= 1.30x) at +3.0% (prefill, plain/idn idn:K=1:n=4:h0), timed again: 1.40x (>= 1.20x)" in c.ours
    assert "best fused 1.04x (>= 0.95x) at <= +1%, the fastest as measured, timed again" in c.rule
    t["frontier_confirm"] = again(("fused", "idn:K=1:n=4:2xF2:h0", 1.2, 1.1))
    assert C.claim_g(t, S).verdict == C.HOLDS
    t["frontier_confirm"] = again(("fused", "idn:K=1:n=4:2xF2:h0", 1.0, 0.9), ("close", "idn:K=1:n=4:h0", 1.05, 0.9))
    assert C.claim_g(t, S).verdict == C.NO
    # the decode study's picks, matched by recipe and configuration
    dec = pd.DataFrame(dict(config=["sequential", "idn:K=1:n=4"], recipe="fwd", ppl=[100.0, 99.0], decode_speedup=[1.0, 2.0],
                            decode_speedup_lo=[1.0, 1.8], **{"ppl_change_base_%": [0.0, -1.0], "ppl_change_own_%": [0.0, -1.0]}))
    t["decode"] = dec
    t["decode_confirm"] = pd.DataFrame([dict(pick="close", recipe="fwd", config="idn:K=1:n=4", speedup=1.9, speedup_lo=1.7)])
    c = C.claim_g(t, S)
    assert c.verdict == C.WEAK and "2.00x (>= 1.80x) at -1.0% (decode, fwd idn:K=1:n=4), timed again: 1.90x (>= 1.70x)" in c.ours


@pytest.mark.parametrize("name", ["decode", "decode_goal_cpu"])
def test_g_reads_the_decode_study(name):
    dec = pd.DataFrame(dict(config=["sequential", "idn:K=1:n=4:1xF4", "idn:K=2:n=4", "idn:K=1:n=4:2xF2"],
                            recipe=["lam0.5"] * 3 + ["baseline"], ppl=[100.0, 100.5, 100.2, 100.0],
                            decode_speedup=[1.0, 2.2, 1.6, 3.0],
                            **{"ppl_change_base_%": [0.0, 0.5, 0.2, 0.0], "ppl_change_own_%": [0.0, 0.8, 0.1, 0.0]}))
    t = {"frontier_all": frontier([("idn:K=1:n=4:2xF2:h0", 0, 9.0, 2.0)]), name: dec}
    c = C.claim_g(t, S)
    assert c.verdict == C.HOLDS and f"2.20x at +0.8% (decode, lam0.5 idn:K=1:n=4:1xF4)" in c.ours
    assert f"decode from {name}.csv" in c.ours


# ------------------------------------------------------------------------------------------ (h)
def spec(identical="yes", speedups=(1.3, 1.1)):
    return pd.DataFrame(dict(draft="idn:K=1:n=4", temperature=[0.0, 0.0, 1.0], block=[1, 2, 2], alpha=[0.9, 0.8, 0.6],
                             speedup=[*speedups, 0.9], predicted=[1.4, 1.2, 1.0], identical=[identical, identical, "n/a"]))


def test_h_lossless_drafter():
    c = C.claim_h({"speculative": spec()}, S)
    assert c.verdict == C.HOLDS and "identical to sequential in 2 of 2" in c.ours and "1.30x (idn:K=1:n=4, B = 1" in c.ours
    assert "Measured 1.30x against the formula's 1.40x" in c.differs
    assert C.claim_h({"speculative": spec(speedups=(1.05, 1.0))}, S).verdict == C.WEAK
    assert C.claim_h({"speculative": spec(identical="no")}, S).verdict == C.NO
    assert C.claim_h({"speculative": spec(speedups=(0.8, 0.7))}, S).verdict == C.NO
    sampling = C.claim_h({"speculative": spec().iloc[2:]}, S)
    assert sampling.verdict == C.UNTESTABLE and "no temperature-0 row" in sampling.rule
    assert C.claim_h({}, S).verdict == C.UNTESTABLE


def test_h_judges_the_fastest_pick_timed_again():
    """With speculative_confirm, the verdict rests on the re-timed pick (the exploration's fastest greedy
    row), not on its exploration speedup, which the selection biases upward."""
    h = spec().assign(speedup_lo=[1.2, 1.05, 0.8])
    again = lambda speedup, lo, identical="yes": pd.DataFrame(dict(
        draft=["idn:K=1:n=4"], temperature=[0.0], block=[1], alpha=[0.9], speedup=[speedup], speedup_lo=[lo],
        predicted=[1.4], identical=[identical], explored_speedup=[1.3], picked_of=[2]))
    c = C.claim_h({"speculative": h, "speculative_confirm": again(1.04, 0.97)}, S)
    assert c.verdict == C.WEAK and "1.30x (>= 1.20x) (idn:K=1:n=4, B = 1" in c.ours
    assert "timed again on its own: 1.04x (>= 0.97x)" in c.ours and "identical to sequential in 3 of 3" in c.ours
    assert "the fastest of 2 greedy (drafter, B), timed again: 1.04x (>= 0.97x)" in c.rule
    assert C.claim_h({"speculative": h, "speculative_confirm": again(1.2, 1.1)}, S).verdict == C.HOLDS
    assert C.claim_h({"speculative": h, "speculative_confirm": again(0.98, 0.9)}, S).verdict == C.NO
    assert C.claim_h({"speculative": h, "speculative_confirm": again(1.2, 1.1, "no")}, S).verdict == C.NO


# ------------------------------------------------------------------------------------------ the ledger
def test_every_claim_is_in_the_ledger_and_missing_tables_are_not_testable():
    rows = C.ledger({}, C.Setting.of("smoke"))
    assert [c.key for c in rows] == list("abcdefgh")
    assert {c.verdict for c in rows} == {C.UNTESTABLE} and all(map(has_no_nan, rows))


def test_write_ledger_links_its_evidence(tmp_path, capsys):
    reports, figs = tmp_path / "reports", tmp_path / "figures"
    reports.mkdir(), figs.mkdir()
    curves(0.5).to_csv(reports / "convergence_curves.csv", index=False)
    spec().to_csv(reports / "speculative.csv", index=False)  # its 'n/a' must stay text
    (figs / "convergence_error.png").write_bytes(b"png")
    pd.DataFrame(dict(a=[1])).to_csv(reports / "claims.csv", index=False)  # the ledger's own: not an input
    path = C.write_ledger(reports, figs, "smoke")
    text = path.read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert len(rows) == 8 and "**holds**" in rows[0] and "[convergence_error.png](../figures/convergence_error.png)" in rows[0]
    assert "[convergence_curves](convergence_curves.csv)" in rows[0] and "`convergence_curves.csv` (" in text
    assert "**holds**" in rows[7] and "[speculative](speculative.csv)" in rows[7]
    assert not re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE)
    assert list(pd.read_csv(reports / "claims.csv").key) == list("abcdefgh")
    assert "[claims] wrote" in capsys.readouterr().out
    assert "This profile runs" not in text  # smoke runs every notebook
    # a profile of one notebook says so: its other claims have no table here, by design
    text = C.write_ledger(reports, figs, "long-x0ve").read_text()
    assert "This profile runs nb/regularization only (`Profile.notebooks`)" in text
    assert "our long-x0ve profile: 12 layers x 64 wide, 7200 steps" in text


def test_cli_bad_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))
    assert claims_cmd.main(["--report-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report folder") and len(err.strip().splitlines()) == 1
    assert claims_cmd.main(["--report-dir", str(tmp_path), "--profile", "huge"]) == 2
    assert "valid profiles: smoke, cpu, long, paper, long-x0ve" in capsys.readouterr().err
    assert claims_cmd.main(["--report-dir"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --report-dir: expected one argument")
    assert not (tmp_path / "cache" / "scratch").exists()  # bad input makes no scratch folder


def test_write_ledger_may_write_beside_the_tables_it_reads(tmp_path):
    """out_dir: the ledger goes there, its links lead back to the report and figure folders."""
    reports, figs, out = tmp_path / "reports", tmp_path / "figures", tmp_path / "elsewhere" / "ledger"
    reports.mkdir(), figs.mkdir()
    curves(0.5).to_csv(reports / "convergence_curves.csv", index=False)
    (figs / "convergence_error.png").write_bytes(b"png")
    path = C.write_ledger(reports, figs, "smoke", out_dir=out, log=lambda *_: None)
    assert path == out / "claims.md" and (out / "claims.csv").exists()
    assert sorted(p.name for p in reports.iterdir()) == ["convergence_curves.csv"]  # nothing written there
    text = path.read_text()
    assert "[convergence_curves](../../reports/convergence_curves.csv)" in text
    assert "[convergence_error.png](../../figures/convergence_error.png)" in text
    assert f"from the tables in `{reports.resolve()}`, profile `smoke`" in text


def test_cli_writes_a_scratch_folder_and_leaves_reports_alone(tmp_path, monkeypatch, capsys):
    """Without --out the command reads the repository's reports/ and writes a new scratch folder; the
    committed ledger is not touched (make figures rewrites it)."""
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path))
    reports = ROOT / "reports"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reports.rglob("*") if p.is_file()}
    assert claims_cmd.main([]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reports.rglob("*") if p.is_file()} == before
    (scratch,) = (tmp_path / "scratch").iterdir()
    assert scratch.name.endswith("-claims") and {p.name for p in scratch.iterdir()} == {"claims.md", "claims.csv"}
    assert f"[claims] wrote {scratch / 'claims.md'}" in capsys.readouterr().out
    text = (scratch / "claims.md").read_text()
    assert f"from the tables in `{reports.resolve()}`, profile `cpu`" in text and "**" in text
    # --out names the folder (the same ledger, its links relative to there); a second run without it gets
    # a folder of its own
    assert claims_cmd.main(["--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "claims.csv").read_text() == (scratch / "claims.csv").read_text()
    assert claims_cmd.main([]) == 0 and len(list((tmp_path / "scratch").iterdir())) == 2


# ------------------------------------------------------------------------------------------ the GPU study column
STUDY = dict(n_layer=16, n_embd=192, params=8_700_000, tokens=60_000_000, tokens_per_param=6.9, steps=900,
             sequence_len=512)


def gpu_study(folder: Path, base=(100.0,), reg=(98.0,), snlp=(101.0,), smoke=False, fused=(0.8, 1.3, 1.2),
              masks=(1.18, 1.31)) -> Path:
    """A GPU study folder as `make gpu-study` writes it (the tables the ledger reads, and study.json): the
    family "gpu", per seed a baseline (sequential PPL `base`) and an IDN model (`reg`, one IDN iteration
    over all 16 layers `snlp`); the first seed's configurations timed at T = 512 over the compiled+graphed
    sequential; the fused v2-shaped one at (PPL change, speedup, lower bound) `fused`, timed with windows
    on both sides and with the paper's full masks at `masks`."""
    folder.mkdir(parents=True)
    seeds = list(range(len(base)))
    rows = [dict(variant="gpu", reg=r, seed=i, seq_ppl=seq[i], snlp_ppl=one[i], params=STUDY["params"],
                 tokens=STUDY["tokens"], train_s=120.0)
            for r, seq, one in (("none", base, [5 * b for b in base]), ("idn", reg, snlp)) for i in seeds]
    pd.DataFrame(rows).to_csv(folder / "regularization_runs.csv", index=False)
    v2 = "idn:K=1:n=16:1xF16:h0"
    configs = [("sequential", 0.0, 1.0, 1.0), (v2, *fused), ("idn:K=2:n=16:h0", 0.5, 1.1, 0.95),
               ("idn:K=1:n=16:h0", 3.0, 1.25, 1.15)]
    f = [dict(model_name=m, seed=0, config=c, S=0 if c != "sequential" else 16, K=1, n_par=16, chunks="", init="h0",
              ppl=100 * (1 + ch / 100), seq_ppl=100.0, **{"ppl_change_%": ch if m == "gpu/idn" else 10 * ch},
              speedup=sp, speedup_lo=lo, baseline="compiled+graphed", x_floor=0.5, device="cuda", T=512)
         for m in ("gpu/none", "gpu/idn") for c, ch, sp, lo in configs]
    pd.DataFrame(f).to_csv(folder / "frontier_all.csv", index=False)
    pd.DataFrame([dict(config=c, recipe=r, decode_speedup=0.9 * sp, decode_speedup_lo=0.9 * lo,
                       **{"ppl_change_own_%": ch}, baseline="graphed") for r in ("baseline", "idn")
                  for c, ch, sp, lo in configs]).to_csv(folder / "decode.csv", index=False)
    pd.DataFrame([dict(model_name=m, seed=0, config=v2, T=512, mask=k, prefill_ms=10 / sp, speedup=sp, ppl=100.0,
                       **{"ppl_change_%": ch}) for m in ("gpu/none", "gpu/idn")
                  for k, sp, ch in (("windows", masks[0], 0.8), ("full", masks[1], 4.5))]
                 ).to_csv(folder / "mask_treatment.csv", index=False)
    (folder / "study.json").write_text(json.dumps(dict(
        seeds=seeds, smoke=smoke, device="NVIDIA H200", scale=STUDY,
        corpus=dict(source="python", files_hash="abc", train_tokens=9e7, val_tokens=1e6), seconds={})))
    return folder


def test_gpu_column_one_seed_judges_b_c_g_by_the_same_rules(tmp_path):
    col = C.gpu_column(gpu_study(tmp_path / "study"))
    assert col.state == "judged" and col.seeds == (0,) and set(col.entries) == {"b", "c", "g"}
    b, c, g = (col.entries[k] for k in "bcg")
    # (b): one IDN iteration 101 against sequential 98 is +3.1%; K=2 from frontier_all; one seed: at most weakly
    assert b.verdict == C.WEAK and b.ours == ("one seed: no interval; PPL change against own sequential: gpu/idn: "
                                              "K=1 +3.1%, no interval (n = 1 seed), K=2 +0.5% (seed 0)")
    assert "[" not in b.ours  # no interval with one seed
    assert c.verdict == C.WEAK and c.ours == ("one seed: no interval; sequential PPL change against the baseline: "
                                              "gpu/idn: -2.0%, no interval (n = 1 + 1 seeds)")
    assert g.verdict == C.HOLDS and g.ours.startswith(
        "one seed: no interval; best fused at <= +1% PPL: 1.30x (>= 1.20x) at +0.8% (prefill, gpu/idn "
        "idn:K=1:n=16:1xF16:h0, over compiled+graphed sequential)")
    assert "(decode, idn idn:K=1:n=16:1xF16:h0, over graphed sequential)" not in g.ours  # prefill is faster
    assert ("mask treatment (mask_treatment.csv): the paper's mask treatment gives 1.31x against 1.18x with windows "
            "honoured on both sides (gpu/idn idn:K=1:n=16:1xF16:h0, T = 512): 0.13 of the v2 number's 0.40 above 1, "
            "at +4.5% PPL against sequential with full masks and +0.8% with windows") in g.ours
    assert "GPU check" not in g.ours and "timed both ways" not in g.ours  # no check given; both models timed alike
    # the study's setting in the "why it may differ" text
    assert ("our GPU study: 16 layers x 192 wide (8.7e6 parameters), 900 steps, 6.0e7 training tokens (6.9 per "
            "parameter) of the corpus python at T = 512, on NVIDIA H200") in b.differs
    assert "our GPU study: 16 layers" in c.differs and "(8.4e1 times our training tokens)" in c.differs
    assert "our GPU study: 16 layers" in g.differs and "On a CPU" not in g.differs
    assert col.tables is not None and g.tables == ("frontier_all", "decode", "mask_treatment")


def test_gpu_column_two_seeds_show_an_interval(tmp_path):
    col = C.gpu_column(gpu_study(tmp_path / "study", base=(100.0, 102.0), reg=(98.0, 99.0), snlp=(101.0, 103.0)))
    b, c = col.entries["b"], col.entries["c"]
    gaps = [100 * (101 / 98 - 1), 100 * (103 / 99 - 1)]
    m, half = sum(gaps) / 2, T975[1] * abs(gaps[0] - gaps[1]) / 2  # t * s / sqrt(2), s = |a - b| / sqrt(2)
    assert col.seeds == (0, 1) and b.ours.startswith(f"2 seeds; PPL change against own sequential: gpu/idn: K=1 "
                                                     f"{m:+.1f}% [{m - half:+.1f}, {m + half:+.1f}] (n = 2 seeds)")
    assert C.ONE_SEED not in b.ours and b.verdict == C.WEAK  # the interval reaches above +5%
    rel = C.relative_change([98.0, 99.0], [100.0, 102.0])
    assert c.ours == (f"2 seeds; sequential PPL change against the baseline: gpu/idn: -2.5% [{rel.lo:+.1f}, "
                      f"{rel.hi:+.1f}] (n = 2 + 2 seeds)") and rel.has_interval
    assert c.verdict == C.NO and "1 unclear" in c.rule  # Welch's interval with 1 + 1 degrees of freedom spans 0


def test_gpu_column_refuses_smoke_and_says_not_run(tmp_path):
    smoke = C.gpu_column(gpu_study(tmp_path / "smoke", smoke=True))
    assert smoke.state == "smoke" and {e.verdict for e in smoke.entries.values()} == {C.GPU_SMOKE}
    assert {e.ours for e in smoke.entries.values()} == {"—"} and C.GPU_SMOKE == "smoke run: no verdict"
    gone = C.gpu_column(tmp_path / "absent")
    assert gone.state == "not run" and {e.verdict for e in gone.entries.values()} == {C.GPU_NOT_RUN}
    assert C.GPU_NOT_RUN == "not run (make gpu-study on a CUDA machine)" and gone.entries["g"].cell() == C.GPU_NOT_RUN
    broken = gpu_study(tmp_path / "broken")
    (broken / "study.json").unlink()
    b = C.gpu_column(broken)
    assert b.state == "incomplete" and b.entries["b"].verdict == C.UNTESTABLE and "study.json is missing" in b.entries["b"].rule
    (broken / "study.json").write_text(json.dumps(dict(seeds=[0], smoke=False, scale=dict(n_layer=16))))
    b = C.gpu_column(broken)
    assert b.entries["c"].verdict == C.UNTESTABLE and "scale lacks n_embd, steps, tokens" in b.entries["c"].rule


def test_gpu_column_reads_the_gpu_checks_mask_column(tmp_path):
    check = tmp_path / "gpu"
    study = gpu_study(check / "study")
    speed = pd.DataFrame(dict(model="0.5b-plain", config=["sequential", "idn:K=1:n=12:1xF12:h0"] * 2, T=2048,
                              mask=["windows", "windows", "full", "full"], prefill_speedup=[1.0, 1.2, 0.9, 1.36]))
    speed.drop(columns="mask").to_csv(check / "speed.csv", index=False)
    assert "GPU check" not in C.gpu_column(study, check).entries["g"].ours  # an older check: no mask column
    speed.to_csv(check / "speed.csv", index=False)
    g = C.gpu_column(study, check).entries["g"].ours
    assert g.endswith("GPU check (speed.csv): the paper's mask treatment gives 1.36x against 1.20x with windows "
                      "honoured on both sides (0.5b-plain idn:K=1:n=12:1xF12:h0, T = 2048): 0.16 of the v2 number's "
                      "0.40 above 1")  # sequential keeps its windows either way: not a pair
    # without the study, (g)'s entry still carries the check's numbers after "not run"
    alone = C.gpu_column(tmp_path / "absent", check).entries["g"]
    assert alone.verdict == C.GPU_NOT_RUN and alone.cell().startswith(C.GPU_NOT_RUN + "; GPU check (speed.csv): ")


def test_mask_share_picks_the_v2_shape_at_the_v2_length():
    rows = [dict(model_name="gpu/idn", config=c, T=T, mask=k, speedup=sp) for c, T, k, sp in (
        ("idn:K=2:n=16:4xF4:h0", 2048, "windows", 1.5), ("idn:K=2:n=16:4xF4:h0", 2048, "full", 1.9),
        ("idn:K=1:n=16:1xF16:h0", 512, "windows", 1.1), ("idn:K=1:n=16:1xF16:h0", 512, "full", 1.2),
        ("idn:K=1:n=16:1xF16:h0", 2048, "windows", 1.2), ("idn:K=1:n=16:1xF16:h0", 2048, "full", 1.5))]
    text = C.mask_share(pd.DataFrame(rows))
    assert text.startswith("the paper's mask treatment gives 1.50x against 1.20x with windows honoured on both sides "
                           "(gpu/idn idn:K=1:n=16:1xF16:h0, T = 2048): 0.30 of the v2 number's 0.40 above 1")
    assert text.endswith("over the 3 (model, configuration, T) timed both ways: 0.10 to 0.40")
    assert C.v2_shaped("idn:K=1:n=12:1xF12:h0") and not C.v2_shaped("idn:K=1:n=12:h0") and not C.v2_shaped("sequential")
    assert C.mask_share(pd.DataFrame(rows).query("mask == 'full'")) is None and C.mask_share(None) is None


def test_b_and_g_note_that_one_step_from_h0_is_layer_parallelism():
    for c in C.ledger({}, S):
        assert ("arXiv 2502.02790" in c.note and "1.05–1.20x with no retraining" in c.note
                and "exactly parallel residual branches" in c.note) == (c.key in "bg")


def test_write_ledger_has_a_gpu_study_column(tmp_path):
    reports, figs = tmp_path / "reports", tmp_path / "figures"
    reports.mkdir(), figs.mkdir()
    curves(0.5).to_csv(reports / "convergence_curves.csv", index=False)
    # no study folder: the column says so for (b), (c), (g); other rows have no GPU entry
    text = C.write_ledger(reports, figs, "smoke", log=lambda *_: None).read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert "| GPU study |" in text and "The GPU study column: not run (`gpu/study` does not exist" in text
    assert [r.count(C.GPU_NOT_RUN) for r in rows] == [0, 1, 1, 0, 0, 0, 1, 0]
    assert all(r.split(" | ")[5] == "—" for r in rows if C.GPU_NOT_RUN not in r)
    assert "- (b, both columns) One IDN iteration from h0 is exactly parallel residual branches" in text
    assert "- (g, both columns) " in text and text.count("2502.02790") == 2
    table = pd.read_csv(reports / "claims.csv", keep_default_na=False)
    assert list(table.gpu_verdict) == ["—", C.GPU_NOT_RUN, C.GPU_NOT_RUN] + ["—"] * 3 + [C.GPU_NOT_RUN, "—"]
    assert list(table.gpu_ours) == ["—"] * 8
    # a study of one seed, then of two: judged beside the CPU verdicts, linked, listed among the tables read
    gpu_study(reports / "gpu" / "study")
    text = C.write_ledger(reports, figs, "smoke", log=lambda *_: None).read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert "| **not testable here**: regularization_runs.csv is missing" in rows[1]
    assert "| **holds weakly**: one seed: no interval; PPL change against own sequential: gpu/idn: K=1 +3.1%" in rows[1]
    assert "GPU: [regularization_runs](gpu/study/regularization_runs.csv), [frontier_all](gpu/study/frontier_all.csv)" in rows[1]
    assert "| **holds**: one seed: no interval; best fused at <= +1% PPL: 1.30x (>= 1.20x) at +0.8% (prefill, gpu/idn " \
           "idn:K=1:n=16:1xF16:h0, over compiled+graphed sequential)" in rows[6]
    assert "0.13 of the v2 number's 0.40 above 1" in rows[6] and "[mask_treatment](gpu/study/mask_treatment.csv)" in rows[6]
    assert ("The GPU study column judges (b), (c), (g) by the same rules on the tables of `gpu/study` (`make gpu-study`, "
            "seeds 0): our GPU study: 16 layers x 192 wide") in text
    assert "- (b, GPU study) Our one-iteration changes (gpu +3.1%) lie +3.1 points from the paper's ±0.0%" in text
    assert "`gpu/study/regularization_runs.csv` (" in text and "`gpu/study/mask_treatment.csv` (" in text
    table = pd.read_csv(reports / "claims.csv", keep_default_na=False).set_index("key")
    assert list(table.gpu_verdict[list("bcg")]) == [C.WEAK, C.WEAK, C.HOLDS]
    assert table.gpu_ours["b"].startswith("one seed: no interval; ") and "over compiled+graphed" in table.gpu_ours["g"]
    assert "2502.02790" in table.note["b"] and table.note["a"] == "—"
    assert not re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE)
    shutil.rmtree(reports / "gpu")
    gpu_study(reports / "gpu" / "study", base=(100.0, 102.0), reg=(98.0, 99.0), snlp=(101.0, 103.0))
    text = C.write_ledger(reports, figs, "smoke", log=lambda *_: None).read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert "2 seeds; PPL change against own sequential: gpu/idn: K=1 +3.6% [" in rows[1] and C.ONE_SEED not in text
    assert "seeds 0, 1)" in text
    # a smoke study: no verdict
    shutil.rmtree(reports / "gpu")
    gpu_study(reports / "gpu" / "study", smoke=True)
    text = C.write_ledger(reports, figs, "smoke", log=lambda *_: None).read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert [r.count(f"| {C.GPU_SMOKE} |") for r in rows] == [0, 1, 1, 0, 0, 0, 1, 0]
    assert "holds a smoke run" in text and "(b, GPU study)" not in text


def test_cli_takes_the_gpu_study_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))
    reports = tmp_path / "reports"
    reports.mkdir()
    curves(0.5).to_csv(reports / "convergence_curves.csv", index=False)
    study = gpu_study(tmp_path / "elsewhere" / "study")
    out = tmp_path / "out"
    assert claims_cmd.main(["--report-dir", str(reports), "--out", str(out), "--profile", "smoke",
                            "--gpu-study", str(study)]) == 0
    table = pd.read_csv(out / "claims.csv", keep_default_na=False).set_index("key")
    assert table.gpu_verdict["g"] == C.HOLDS and "`../elsewhere/study` (`make gpu-study`" in (out / "claims.md").read_text()
    assert claims_cmd.main(["--report-dir", str(reports), "--out", str(out), "--profile", "smoke"]) == 0
    assert pd.read_csv(out / "claims.csv", keep_default_na=False).set_index("key").gpu_verdict["g"] == C.GPU_NOT_RUN


# ------------------------------------------------------------------------------------------ imports
def test_the_ledger_imports_no_training_code():
    """The ledger reads tables: nothing it imports, directly or not, is in snlp_lab.training (static
    import graph of tests/test_layout.py, imports inside functions included)."""
    mine = [m for m in GRAPH if m == "snlp_lab.lab.claims" or m.startswith("snlp_lab.lab.claims.")]
    assert {"snlp_lab.lab.claims.paper", "snlp_lab.lab.claims.stats", "snlp_lab.lab.claims.rules",
            "snlp_lab.lab.claims.ledger"} <= set(mine)
    seen, todo = set(mine), list(mine)
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    assert "snlp_lab.lab.profiles" in seen  # the graph does follow the ledger's imports
    assert sorted(m for m in seen if m.startswith("snlp_lab.training")) == []
    assert "snlp_lab.lab.experiments" not in seen  # which trains
