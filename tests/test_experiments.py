"""The experiment profiles' training helpers: other context lengths, parallel training, training curves, and
the options every profile hands to training (their config hashes name the cached runs)."""
import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import snlp_lab
from snlp_lab.lab import experiments as E
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.lab.profiles import PAPER_TRAINING, PROFILES, is_fused
from snlp_lab.models.config import get_config
from snlp_lab.training import PAPER_LRS, trained_run_dir
from snlp_lab.training.runs import cached_config

SMOKE = PROFILES["smoke"]
FIXTURES = Path(__file__).parent / "fixtures"


def test_another_context_trains_on_as_many_tokens_per_step():
    o = E.train_options(SMOKE, "x0ve", "idn", 1, 64)
    assert (o["batch_size"], o["seq_len"], o["sequence_len"]) == (2, 64, 64)  # 4 x 32 = 2 x 64 tokens
    assert E.train_options(SMOKE, "x0ve", "idn", 1)["batch_size"] * SMOKE.seq_len == 2 * 64
    assert "sequence_len" not in E.train_options(SMOKE, "x0ve", "idn", 1, 16)  # the preset's context holds it
    assert cached_config(**o).seq_len == 64  # resolves
    with pytest.raises(ValueError, match="seq_len=48 does not divide the profile's 128 tokens per step"):
        E.train_options(SMOKE, "x0ve", "idn", 1, 48)


@pytest.mark.parametrize("name", ["cpu", "long"])
def test_every_regularization_job_resolves(name):
    P = PROFILES[name]
    jobs = E.regularization_jobs(P)
    assert len(jobs) == len(set(jobs)) and {T for *_, T in jobs} == {P.seq_len, *P.contexts}
    for v, reg, seed, T in jobs:
        cfg = cached_config(**E.train_options(P, v, reg, seed, T))
        assert cfg.seq_len * cfg.batch_size == P.seq_len * P.batch_size and cfg.recipe == "paper"
    # every family has its baseline at every context it is trained at, over every seed
    for v, reg, seed, T in jobs:
        assert (v, "none", seed, T) in jobs


def test_a_variant_may_train_at_fewer_seeds():
    P = PROFILES["cpu"]  # mHC at seed 0 only: its seeds 1 and 2 did not fit the hour
    jobs = E.regularization_jobs(P)
    assert {s for v, _, s, _ in jobs if v == "mhc"} == {0} and {s for v, _, s, _ in jobs if v == "x0ve"} == {0, 1, 2}
    assert len(jobs) == 2 * 3 + 2 * 3 + 2 * 1 + 2 * 3  # plain, x0ve, mhc at T=128; x0ve at T=256
    assert P.describe()["seeds"] == "[0, 1, 2] (mhc: [0])" and PROFILES["long"].describe()["seeds"] == [0, 1, 2]


def test_parallel_training_equals_training_here(tmp_path, monkeypatch):
    P = dataclasses.replace(SMOKE, steps=3, eval_every=1)
    jobs = [("plain", "idn", 0, SMOKE.seq_len), ("x0ve", "none", 1, 64)]
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "two"))
    E.train_all(P, jobs)  # two spawned processes of one thread
    two = [E.trained(P, *j).state_dict() for j in jobs]
    curves = [E.training_curve(P, *j) for j in jobs]
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "one"))
    E.train_all(dataclasses.replace(P, train_workers=1), jobs)  # here, one after the other
    for j, sd in zip(jobs, two):
        one = E.trained(P, *j).state_dict()
        assert all(torch.equal(one[k], sd[k]) for k in sd), j
    # the curve: an evaluation every step, the last on the windows the notebooks' PPL uses
    ds = E.dataset(P)
    for j, c in zip(jobs, curves):
        assert list(c.step) == [1, 2, 3]
        assert c.val_ppl.iloc[-1] == pytest.approx(E.ppl(P, E.trained(P, *j), ds, seq_len=j[3]), rel=1e-6)


def test_training_curve_reads_the_learning_rate_of_each_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "run_folder", lambda *a, **k: tmp_path)
    lines = [{"step": 1, "loss": 5.0, "lr_mult": 1.0, "step_time": 0.5}, {"step": 1, "val_ppl": 80.0},
             {"step": 2, "loss": 4.0, "lr_mult": 0.25, "step_time": 0.5}, {"step": 2, "val_ppl": 70.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    c = E.training_curve(SMOKE, "plain")
    assert c.to_dict("list") == {"step": [1, 2], "val_ppl": [80.0, 70.0], "lr_mult": [1.0, 0.25]}


def test_long_profiles_publish_into_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("snlp_lab.lab.outputs.repo_root", lambda: tmp_path)
    quiet = dict(log=lambda *_: None)
    assert output_dirs("long", publish=True, **quiet) == (tmp_path / "figures/long", tmp_path / "reports/long")
    assert output_dirs("long-x0ve", publish=True, **quiet) == (tmp_path / "figures/long-x0ve",
                                                                 tmp_path / "reports/long-x0ve")
    assert output_dirs("cpu", publish=True, **quiet) == (tmp_path / "figures", tmp_path / "reports")


def test_curve_summary_averages_seeds():
    rows = [dict(variant="x", reg=r, seed=s, step=k, val_ppl=p, lr_mult=m)
            for r, s, curve in (("none", 0, (80, 60, 50, 45)), ("none", 1, (90, 70, 60, 54)), ("idn", 0, (80, 50, 40, 40)))
            for k, p, m in zip((100, 200, 300, 400), curve, (1.0, 1.0, 1.0, 0.5))]
    got = E.curve_summary(pd.DataFrame(rows), ["variant", "reg"]).set_index("reg")
    assert (got.halfway_step == 200).all()
    assert got.halfway_ppl.to_dict() == {"none": 65.0, "idn": 50.0}
    assert got["last_quarter_%"]["none"] == pytest.approx(100 * ((45 / 50 + 54 / 60) / 2 - 1))
    assert got["last_quarter_%"]["idn"] == pytest.approx(0.0)
    assert got["before_warmdown_%"]["none"] == pytest.approx(100 * ((50 / 60 + 60 / 70) / 2 - 1))  # 200 -> 300
    assert got["before_warmdown_%"]["idn"] == pytest.approx(100 * (40 / 50 - 1))
    one = E.curve_summary(pd.DataFrame(rows).query("step == 400"), ["variant", "reg"])
    assert one.halfway_ppl.isna().all() and one["last_quarter_%"].isna().all()  # a single evaluation


def test_speed_picks_are_the_fastest_as_measured_and_are_timed_again():
    d = pd.DataFrame(dict(config=["idn:K=1:n=4:2xF2:h0", "idn:K=1:n=4:1xF4:h0", "idn:K=1:n=4", "idn:K=2:n=4:2xF2"],
                          speedup=[1.5, 1.3, 1.6, 2.0], change=[0.5, 0.8, 3.0, 1.5]), index=[10, 11, 12, 13])
    p = E.speed_picks(d)
    assert list(zip(p.pick, p.config, p.picked_of)) == [("fused", "idn:K=1:n=4:2xF2:h0", 2), ("close", "idn:K=2:n=4:2xF2", 4)]
    assert list(p.index) == [10, 13]
    assert is_fused("idn:K=1:n=4:2xF2") and not is_fused("idn:K=1:n=4:4xF1") and not is_fused("idn:K=1:n=4")
    calls = []
    r = E.retimed(pd.concat([p, p.iloc[:1].assign(pick="again")]), lambda row: calls.append(row.config) or (1.1, 0.9))
    assert calls == ["idn:K=1:n=4:2xF2:h0", "idn:K=2:n=4:2xF2"]  # a row picked twice is timed once
    assert r.explored_speedup.tolist() == [1.5, 2.0, 1.5] and r.speedup.tolist() == [1.1] * 3 and r.speedup_lo.tolist() == [0.9] * 3
    assert E.retimed_reading(r.assign(model="m").iloc[:1], "model") == \
        "fused: m idn:K=1:n=4:2xF2:h0, x1.50 when picked (fastest of 2), x1.10 (>= x0.90) timed again"
    none = E.speed_picks(d.assign(change=9.0))
    assert none.empty and {"pick", "picked_of"} <= set(none.columns)
    assert "nothing to time again" in E.retimed_reading(E.retimed(none, None), "model")


def test_long_x0ve_trains_the_x0ve_comparison_of_long_three_times_longer():
    """long-x0ve is long's x0ve comparison at its first context, every option but the steps the same:
    its curves say how long that comparison takes to flatten."""
    L, X = PROFILES["long"], PROFILES["long-x0ve"]
    assert X.steps == 3 * L.steps and X.eval_every * 12 == X.steps and len(X.seeds) >= 3
    assert E.regularization_jobs(X) == [("x0ve", reg, s, X.seq_len) for reg in ("none", "idn") for s in X.seeds]
    for _, reg, seed, T in E.regularization_jobs(X):
        assert E.train_options(X, "x0ve", reg, seed, T) == {**E.train_options(L, "x0ve", reg, seed, T),
                                                             "steps": X.steps, "eval_every": X.eval_every}


def test_a_profile_may_run_some_notebooks_only(tmp_path):
    """make figures runs a profile's own notebooks (`Profile.notebooks`), in the order of all; --only
    names one of them or fails before anything runs, naming the valid ones."""
    from snlp_lab.lab import figures
    every = [p.stem for p in figures.notebooks()]
    assert every[0] == "regularization" and len(every) == len(figures.ORDER)
    assert [p.stem for p in figures.notebooks("cpu")] == every
    assert [p.stem for p in figures.notebooks("long-x0ve")] == ["regularization"]
    assert all(set(P.notebooks) <= set(every) for P in PROFILES.values())  # no typo drops a notebook
    with pytest.raises(ValueError, match="unknown notebook.*'decode' for profile long-x0ve; valid: regularization$"):
        figures.run_all("long-x0ve", fig_dir=tmp_path, report_dir=tmp_path, only=["decode"])
    assert not any(tmp_path.iterdir())  # nothing ran, no ledger written


def run_names(P, monkeypatch) -> dict:
    """job -> "<run folder name> options:<digest>" of every model the profile trains: the regularization
    study's jobs, the single-seed studies' models (seq_len None) and the decode study's recipes. The run
    folder is <preset>-<config hash> (`train.config_hash` of the options), the digest that of all the
    options (run options such as eval_every included). Not hashed, hence set aside: the device (the paper
    profile's cuda is not needed to name its runs) and the smoke profile's corpus, this package's own
    folder, which depends on the checkout. A recipe that fine-tunes another (idn+fwd) names its start by
    run folder; its own hash needs that checkpoint, so its options alone are compared."""
    monkeypatch.setattr(E, "recipe_model", lambda P, name: None)  # the fine-tune's start: named, not trained
    package = str(Path(snlp_lab.__file__).resolve().parent)
    P = dataclasses.replace(P, device="cpu")
    out = {}

    def add(key, opts):
        opts = {**opts, "data": "<package>" if opts["data"] == package else opts["data"]}
        name = "(fine-tune)"
        if "init_from" in opts:  # the start's folder name; its hash holds the corpus path where that is ours
            opts["init_from"] = "<start>" if opts["data"] == "<package>" else Path(opts["init_from"]).name
        else:
            name = trained_run_dir(**opts).name
        digest = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:12]
        out[key] = f"{name} options:{digest}"

    jobs = set(E.regularization_jobs(P)) | {(v, r, P.seeds[0], None) for v, r in E.model_pairs(P)}
    for j in jobs:
        add("/".join(map(str, j)), E.train_options(P, *j))
    if P.decode is not None:
        for r in E.decode_recipes(get_config(P.decode.preset, **P.decode.overrides).n_layer):
            add(f"recipe:{r}", E._recipe_options(P, r))
    return out


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_hands_training_the_options_it_always_did(name, monkeypatch, tmp_path):
    """The options of every profile's runs, and so the names of their cached runs, are those pinned in
    fixtures/profile_runs.json (written before the profiles left the training code): a change here would
    retrain every cached model, so it must be a decision, made by updating that file."""
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path))
    pinned = json.loads((FIXTURES / "profile_runs.json").read_text())[name]
    assert PROFILES[name].device == pinned.pop("device")
    assert run_names(PROFILES[name], monkeypatch) == pinned
    assert not (tmp_path / "runs").exists()  # named, nothing trained


def test_the_profiles_learning_rates_are_the_paper_recipes():
    """The profiles write out recipe paper's learning rates (at nanochat's reference batch) to need no
    training code; they must be the training code's own."""
    assert PAPER_TRAINING == dict(recipe="paper", **PAPER_LRS)
    assert all(P.training == PAPER_TRAINING for n, P in PROFILES.items() if n != "paper")


def test_experiments_is_the_home_of_every_name_used_from_it():
    """Notebooks and tests use `E.x` (experiments) only for what experiments defines: the profiles, the
    ledger's thresholds and statistics come from their own modules, not through it."""
    import ast
    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "snlp_lab" / "lab" / "experiments.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for x in n.targets for t in ast.walk(x)
                if isinstance(t, ast.Name)}
    for path in sorted(root.glob("nb/*.py")) + sorted(root.glob("tests/*.py")):
        used = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "E"}
        assert used <= defined, f"{path.name} uses E.{', E.'.join(sorted(used - defined))}"
