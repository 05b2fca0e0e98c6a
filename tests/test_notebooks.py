"""Every notebook runs end to end with the smoke profile (what `make figures` runs, at toy size),
so notebooks cannot rot. Outputs go to a temporary folder; the committed figures are not touched."""
import math
import os
import re

import pandas as pd
import pytest

from snlp_lab.lab import figures
from snlp_lab.lab.profiles import PROFILES
from snlp_lab.lab.report import read_readings


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    old = os.environ.get("SNLP_CACHE")
    os.environ["SNLP_CACHE"] = str(out / "cache")  # trained toy models stay out of the user's cache
    try:
        times = figures.run_all("smoke", fig_dir=out / "figures", report_dir=out / "reports")
    finally:
        if old is None:
            os.environ.pop("SNLP_CACHE")
        else:
            os.environ["SNLP_CACHE"] = old
    return out, times


def test_every_notebook_ran(smoke_run):
    out, times = smoke_run
    assert set(times) == {p.stem for p in figures.notebooks()}
    assert {"regularization", "convergence", "jacobians", "frontier", "speedup", "pretrained", "speculative",
            "decode"} <= set(times)
    for name in times:
        assert (out / "reports" / f"{name}.ipynb").exists()


def test_outputs_exist_and_hold_numbers(smoke_run):
    out, _ = smoke_run
    readings = read_readings(out / "reports")
    assert {r["notebook"] for r in readings} >= {"regularization", "convergence", "jacobians", "frontier", "pretrained",
                                                  "speculative", "decode"}
    for r in readings:
        assert "nan" not in r["reading"].lower(), r
    for csv in (out / "reports").glob("*.csv"):
        df = pd.read_csv(csv)
        assert len(df), csv
        num = df.select_dtypes("number")
        assert not num.isna().any().any(), f"NaN in {csv.name}"
    for stem in ("regularization", "convergence_error", "convergence_ppl", "jacobian_sigma", "jacobian_distance",
                 "frontier", "pretrained", "speculative"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (out / "figures" / f"{stem}.pdf").exists()
    index = (out / "reports" / "README.md").read_text()
    assert "## convergence" in index and "frontier" in index


def test_regularization_runs_say_how_long_they_trained(smoke_run):
    out, _ = smoke_run
    runs = pd.read_csv(out / "reports" / "regularization_runs.csv")
    reading = next(e["reading"] for e in read_readings(out / "reports") if e["item"] == "regularization_runs")
    assert (runs.train_s > 0).all() and f"{runs.train_s.sum() / 3600:.2g} h of training in all" in reading
    assert "training time is in the tables' `train_s` columns" in (out / "reports" / "README.md").read_text()


def test_convergence_shows_finite_termination(smoke_run):
    out, _ = smoke_run
    curves = pd.read_csv(out / "reports" / "convergence_curves.csv")
    at_L = curves[curves.k == curves.L]
    assert (at_L.final_err < 1e-4).all()  # float32 models: exact up to rounding at K = L
    assert math.isfinite(curves.ppl.max())


def test_speedup_report_states_the_limits(smoke_run):
    from test_bench import assert_states_limits
    assert_states_limits(smoke_run[0] / "reports" / "speedup_cpu")


def test_g_picks_are_timed_again(smoke_run):
    """frontier_confirm and decode_confirm: each pick is the fastest of its kind as measured, timed again."""
    from snlp_lab.lab import experiments as E
    out, _ = smoke_run
    f = pd.read_csv(out / "reports" / "frontier_all.csv")
    f = f[(f.config != "sequential") & ~f.model_name.str.endswith("/none")].assign(change=lambda d: d["ppl_change_%"])
    again = pd.read_csv(out / "reports" / "frontier_confirm.csv")
    picks = E.speed_picks(f)
    assert list(zip(again.pick, again.model_name, again.config)) == list(zip(picks.pick, picks.model_name, picks.config))
    assert again.explored_speedup.tolist() == pytest.approx(picks.speedup.tolist())
    assert (again.speedup > 0).all() and (again.speedup_lo <= again.speedup).all()
    d = pd.read_csv(out / "reports" / "decode_confirm.csv")
    assert set(d.columns) >= {"pick", "recipe", "config", "explored_speedup", "speedup", "speedup_lo"}
    assert (d.speedup > 0).all() and (d.speedup_lo <= d.speedup).all() and (d.recipe != "baseline").all()
    index = (out / "reports" / "README.md").read_text()
    assert all(f"`{n}_confirm` ([table]({n}_confirm.md))" in index for n in ("frontier", "decode", "speculative"))


def test_speculative_is_lossless_and_measured(smoke_run):
    out, _ = smoke_run
    df = pd.read_csv(out / "reports" / "speculative.csv")
    assert set(df.temperature) == {0.0, 1.0} and (df[df.temperature == 0].identical == "yes").all()
    assert df.alpha.between(0, 1).all() and (df.speedup > 0).all() and (df.predicted > 0).all()
    again = pd.read_csv(out / "reports" / "speculative_confirm.csv")  # the fastest greedy pick, timed again
    pick = df[df.temperature == 0].loc[df[df.temperature == 0].speedup.idxmax()]
    assert len(again) == 1 and (again.draft[0], again.block[0]) == (pick.draft, pick.block)
    assert again.explored_speedup[0] == pytest.approx(pick.speedup) and again.identical[0] == "yes"


def test_claims_ledger_has_every_claim(smoke_run):
    out, _ = smoke_run
    text = (out / "reports" / "claims.md").read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| \([a-h]\) \|", l)]
    assert [r[3] for r in rows] == list("abcdefgh")
    assert not re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE)
    assert "[claims.md](claims.md)" in (out / "reports" / "README.md").read_text()
    ledger = pd.read_csv(out / "reports" / "claims.csv")
    # every table a claim reads was written (a claim may still be untestable for too few rows or seeds)
    assert not ledger.rule.str.contains("is missing|lacks the column|missing values").any(), ledger.rule.tolist()
    runs = pd.read_csv(out / "reports" / "regularization_runs.csv")
    assert {"variant", "reg", "seed", "seq_ppl", "snlp_ppl"} <= set(runs.columns)


def test_decode_study_covers_every_recipe(smoke_run):
    out, _ = smoke_run
    from snlp_lab.lab.profiles import PROFILES
    D = PROFILES["smoke"].decode
    df = pd.read_csv(out / "reports" / "decode.csv")
    assert set(df.recipe) == set(D.recipes) and set(df.config) == set(D.configs)
    seq = df[df.config == "sequential"]
    assert (seq.decode_speedup == 1).all() and (seq["ppl_change_own_%"] == 0).all()
    assert seq[seq.recipe == "baseline"]["ppl_change_base_%"].item() == 0
    assert (df.ppl > 1).all() and (df.decode_tok_s > 0).all()
    best = pd.read_csv(out / "reports" / "decode_recipes.csv")
    assert list(best.recipe) == list(D.recipes) and (best.train_s > 0).all()
    assert (out / "figures" / "decode.png").stat().st_size > 1000


def test_bad_profile_fails_fast(tmp_path):
    with pytest.raises(ValueError, match="valid profiles: smoke, cpu, long, paper, long-x0ve"):
        figures.run_all("huge", fig_dir=tmp_path, report_dir=tmp_path)


def test_bad_parameters_fail_in_the_first_cell(tmp_path):
    import papermill as pm
    nb = figures.ROOT / "nb" / "convergence.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match="valid profiles: smoke, cpu, long, paper, long-x0ve") as err:
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(nb.parent), kernel_name="python3",
                            parameters=dict(profile="huge", fig_dir=str(tmp_path), report_dir=str(tmp_path)),
                            progress_bar=False)
    assert err.value.exec_count <= 3  # markdown, parameters, injected parameters, then the first code cell


def settings_cells(path):
    """A notebook's parameters cell and the cell after it, which checks them and fills in the settings
    (from the jupytext .py, the source both files share)."""
    import jupytext
    cells = [c for c in jupytext.read(path.with_suffix(".py")).cells if c.cell_type == "code"]
    i = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    return cells[i].source, cells[i + 1].source


@pytest.fixture
def settings_only(monkeypatch):
    """Makes anything that loads data, trains or times a model fail (the settings cell must not), and
    restores the torch threads a settings cell sets."""
    import torch

    from snlp_lab.measurement import bench
    from snlp_lab.lab import experiments as E

    def refuse(*args, **kwargs):
        raise AssertionError("the settings cell loads data or a model")

    for name in ("dataset", "decode_dataset", "trained", "recipe_model", "train_all"):
        monkeypatch.setattr(E, name, refuse)
    monkeypatch.setattr(bench, "run_bench", refuse)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_notebook_settles_its_settings_for_every_profile(profile, tmp_path, settings_only):
    """The cell after the parameters checks them and fills in the profile's defaults for every profile
    (a notebook's own table of settings per profile once lacked `long`, and failed that run after
    hours of training), and loads nothing: data and models come in the cells after it."""
    for path in figures.notebooks(profile):  # what make figures runs for it
        params, settle = settings_cells(path)
        ns = {}
        exec(params, ns)
        ns.update(profile=profile, fig_dir=str(tmp_path / "figures"), report_dir=str(tmp_path / "reports"))
        exec(settle, ns)  # raises on a setting the profile lacks


def test_only_publish_writes_the_committed_results(tmp_path, monkeypatch, settings_only):
    """Every notebook's settings cell asks output_dirs for its folders with its `publish` parameter, which
    make figures alone sets: a run with the defaults writes a scratch folder of its own."""
    from snlp_lab.lab import outputs

    calls = []

    def output_dirs(profile, fig_dir=None, report_dir=None, publish=False, name="run", log=print):
        calls.append((profile, fig_dir, report_dir, publish, name))
        return tmp_path, tmp_path

    monkeypatch.setattr(outputs, "output_dirs", output_dirs)
    for path in figures.notebooks():
        source, settle = settings_cells(path)
        ns = {}
        exec(source, ns)
        assert ns["publish"] is False and ns["fig_dir"] is None and ns["report_dir"] is None, path.name
        exec(settle, ns)
        assert calls.pop() == ("cpu", None, None, False, path.stem), path.name
        ns["publish"] = True
        exec(settle, ns)
        assert calls.pop()[3] is True, path.name


@pytest.mark.parametrize("nb, bad, msg", [
    ("jacobians", dict(power_iters=0), "power_iters must be >= 1"),
    ("jacobians", dict(probes=2.5), "probes must be an integer"),
    ("pretrained", dict(checkpoint="/nonexistent"), "does not exist"),
    ("speedup", dict(seq_lens={"a": 1}), "-y"),
    ("speedup", dict(compile="fast"), "valid modes: default"),
    # these two once failed only after training, inside the decoding
    ("speculative", dict(temperatures=-1), "temperatures must be a finite number in"),
    ("speculative", dict(drafts="idn:n=9"), "n_par must be an integer in 1..4")])
def test_bad_notebook_parameters_fail_in_the_settings_cell(nb, bad, msg, tmp_path, settings_only):
    """The cell after the parameters rejects a bad value before any data or model is loaded (that this
    cell is the first code cell to run is test_bad_parameters_fail_in_the_first_cell's)."""
    source, settle = settings_cells(figures.ROOT / "nb" / f"{nb}.ipynb")
    ns = {}
    exec(source, ns)
    ns.update(profile="smoke", fig_dir=str(tmp_path), report_dir=str(tmp_path), **bad)
    with pytest.raises(ValueError, match=msg):
        exec(settle, ns)
