"""The decode study (nb/decode): recipes as training options, the goal table and each recipe's best
trade-off, and decode speed against the best sequential decoder. No training here (the notebook smoke
run trains every recipe at toy size)."""
import json

import pandas as pd
import pytest
import torch

import snlp_lab
from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import PROFILES, get_profile
import snlp_lab.training as T
from snlp_lab.models.config import get_config
from snlp_lab.solvers.grammar import parse_config


def test_every_profile_recipe_is_a_valid_training_run():
    for P in PROFILES.values():
        D = P.decode
        if D is None:
            continue
        L = get_config(D.preset, **D.overrides).n_layer
        assert D.recipes[0] == "baseline" and D.configs[0] == "sequential"
        for c in D.configs:
            parse_config(c).check(L)
        recipes = E.decode_recipes(L)
        for name in D.recipes:
            r = recipes[name]
            over = tuple(f"{k}={v}" for k, v in D.overrides.items())
            cfg = T.resolve(T.TrainConfig(model=D.preset, override=over, steps=D.steps, **r.options))
            assert cfg.n_par_set is not None and (r.init_from is None or r.init_from in recipes)


def test_recipes_hold_what_they_say():
    r = E.decode_recipes(12)
    assert r["idn"].options == dict(reg="idn", lam=0.1, n_par_set=(4, 8, 12), stride=2)  # the regularization study's IDN
    assert r["idn-all"].options["n_par_set"] == (12,)
    assert r["fwd"].options == dict(objective="snlp-forward", method="idn", iters=1, n_par=12)
    assert r["idn+fwd"].init_from == "idn" and r["idn+fwd"].options == r["fwd"].options
    assert r["fwd-chunks"].options["chunks"] == "2xF6" and r["fwd-chunks"].options["iters"] == 2


def test_a_fine_tune_starts_from_its_parent_run(monkeypatch):
    P = get_profile("smoke")
    trained = []
    monkeypatch.setattr(E, "recipe_model", lambda P, name: trained.append(name))
    opts = E._recipe_options(P, "idn+fwd")
    assert trained == ["idn"] and opts["init_from"] == str(E.recipe_run_dir(P, "idn"))
    assert opts["steps"] == round(P.decode.steps / 3) and opts["objective"] == "snlp-forward"
    with pytest.raises(ValueError, match="valid recipes: baseline, idn"):
        E._recipe_options(P, "magic")


def goal_input():
    ppl = pd.DataFrame([("baseline", "sequential", 100.0), ("baseline", "a", 104.0), ("baseline", "b", 150.0),
                        ("r", "sequential", 95.0), ("r", "a", 101.0), ("r", "b", 104.5)],
                       columns=["recipe", "config", "ppl"])
    speed = pd.DataFrame({"config": ["sequential", "a", "b"], "decode_speedup": [1.0, 1.5, 2.5]})
    return E.decode_goal_table(ppl, speed)


def test_goal_table_changes_and_marks():
    t = goal_input().set_index(["recipe", "config"])
    assert t.loc[("r", "b"), "ppl_change_base_%"] == pytest.approx(4.5)
    assert t.loc[("r", "b"), "ppl_change_own_%"] == pytest.approx(100 * (104.5 / 95 - 1))  # 10%: no goal
    assert t.loc[("baseline", "a"), "ppl_change_own_%"] == pytest.approx(4.0)
    assert not t.goal.any()  # b is fast but 10% over its own sequential; a is within 5% but 1.5x
    ppl = goal_input()[["recipe", "config", "ppl"]]
    ppl.loc[(ppl.recipe == "r") & (ppl.config == "b"), "ppl"] = 99.0  # +4.2% over its own 95, -1% vs base
    t = E.decode_goal_table(ppl, pd.DataFrame({"config": ["sequential", "a", "b"], "decode_speedup": [1, 1.5, 2.5]}))
    assert t[t.goal][["recipe", "config"]].values.tolist() == [["r", "b"]]


def test_best_tradeoffs_per_recipe():
    best = E.best_tradeoffs(goal_input()).set_index("recipe")
    assert best.loc["baseline", "fastest_within_5pct"] == "a (1.50x, +4.0%)"
    assert best.loc["baseline", "best_ppl_at_2x"] == "b (2.50x, +50.0%)"
    assert best.loc["r", "fastest_within_5pct"] == "none"  # a: +6.3% over its own sequential
    assert best.loc["r", "best_ppl_at_2x"] == "b (2.50x, +10.0%)"
    assert (best.goal_met == "no").all()


def test_decode_speed_takes_the_best_decoder_per_configuration(monkeypatch):
    """Eager and compiled decoders in one bench run: each configuration keeps its faster decoder with that
    row's speedups (against the run's fastest sequential decoder) and its fastest prefill; a decoder that
    fell back to eager is not called compiled."""
    calls = []

    def fake_bench(model, configs, compile=False, **kw):
        calls.append(compile)
        tok_s = {("sequential", False): 100.0, ("x", False): 150.0, ("sequential", True): 120.0, ("x", True): 140.0,
                 ("y", False): 90.0, ("y", True): 130.0}
        lo = {("x", False): 1.1, ("x", True): 1.0, ("y", True): 0.9}
        return pd.DataFrame([dict(config=c, bound=2.0, decode_tok_s=tok_s[c, m], prefill_ms=20.0 if c == "sequential" else 10.0 + m,
                                  prefill_speedup=20.0 / (20.0 if c == "sequential" else 10.0 + m),
                                  decode_speedup=tok_s[c, m] / 120.0, decode_speedup_lo=lo.get((c, m), 0.5),
                                  compile="eager (compile failed: X)" if c == "y" and m else str(m))
                             for c in configs for m in compile])
    monkeypatch.setattr(E, "run_bench", fake_bench)
    s = E.decode_speed(None, ["sequential", "x", "y"], 32, 4, 1, compile_modes=(False, True)).set_index("config")
    assert calls == [[False, True]]  # one interleaved timing of both decoders
    assert s.loc["sequential", "decode_tok_s"] == 120 and s.loc["sequential", "compile"]
    assert s.loc["x", "decode_speedup"] == pytest.approx(150 / 120) and not s.loc["x", "compile"]
    assert s.loc["x", "decode_speedup_lo"] == 1.1 and s.loc["x", "prefill_speedup"] == pytest.approx(2.0)
    assert s.loc["y", "decode_tok_s"] == 130 and not s.loc["y", "compile"] and s.loc["y", "decode_speedup_lo"] == 0.9


def test_decode_speed_measures_a_model():
    torch.manual_seed(0)
    m = snlp_lab.build_model("tiny", vocab_size=64).eval()
    s = E.decode_speed(m, ["sequential", "idn:K=1:n=4"], 16, 4, 1).set_index("config")
    assert s.loc["sequential", "decode_speedup"] == 1.0 and s.loc["sequential", "prefill_speedup"] == 1.0
    assert s.loc["sequential", "decode_speedup_lo"] == 1.0 and s.loc["idn:K=1:n=4", "decode_speedup_lo"] > 0
    assert s.loc["idn:K=1:n=4", "decode_tok_s"] > 0 and s.loc["idn:K=1:n=4", "bound"] == 4.0


def test_train_seconds_sums_the_step_times(tmp_path):
    lines = [{"step": 1, "loss": 3.0, "step_time": 0.5}, {"step": 2, "loss": 2.0, "step_time": 0.25},
             {"step": 2, "val_ppl": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert E.train_seconds(tmp_path) == 0.75
