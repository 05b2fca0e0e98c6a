"""The GPU study's code path on the CPU (`make gpu-study SMOKE=1`): every part runs and is timed, the
tables hold every configuration of both models with no NaN, a seed is never overwritten, a folder's
seeds add up, the notebook draws a study, and the claims ledger reads its tables."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from snlp_lab.lab import gpu_study
from snlp_lab.lab.claims.ledger import write_ledger
from snlp_lab.solvers.grammar import parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`make gpu-study SMOKE=1` as a user runs it, with the cache in a temporary folder."""
    cache = tmp_path_factory.mktemp("cache")
    r = subprocess.run(["make", "-s", "gpu-study", "SMOKE=1", f"GPU_PY={sys.executable}"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "SNLP_CACHE": str(cache)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = Path(re.findall(r"\[gpu-study\] wrote (\S+)$", r.stdout, re.M)[-1])
    assert out.is_relative_to(cache / "scratch")  # a scratch folder: never the committed reports/gpu/study
    return out


def test_every_part_ran_and_was_timed(smoke):
    rec = json.loads((smoke / "seeds" / "seed_0.json").read_text())
    assert rec["smoke"] is True and rec["seed"] == 0
    assert {"data", "probe", "train baseline", "train idn", "evaluate", "timing", "write", "total"} <= set(rec["seconds"])
    assert all(v >= 0 for v in rec["seconds"].values())
    assert rec["corpus"]["source"].startswith("python") and rec["corpus"]["files_hash"]
    assert rec["corpus"]["val_tokens"] > 0 and rec["corpus"]["train_tokens"] > rec["corpus"]["val_tokens"]
    sc = rec["scale"]
    assert sc["tokens_trained"] == sc["steps"] * sc["batch_size"] * sc["seq_len"]
    assert sc["regularizer"] == dict(reg="idn", lam=0.1, n_par_set=[1, 2, 3], stride=1)  # the paper's, at depth 4
    assert rec["probe"]["steps"] == gpu_study.PROBE_STEPS and rec["probe"]["step_seconds"] > 0
    for model in ("baseline", "idn"):  # a training curve with losses and evaluations
        curve = rec["training"][model]
        assert sum("loss" in r for r in curve) == sc["steps"] and any("val_ppl" in r for r in curve)
    study = json.loads((smoke / "study.json").read_text())
    assert study["seeds"] == [0] and study["smoke"] is True and study["seconds"]["0"]["write"] > 0


def test_tables_hold_every_configuration_of_both_models(smoke):
    for name in ("regularization_runs", "frontier_all", "decode", "mask_treatment", "ppl"):
        df = pd.read_csv(smoke / f"{name}.csv")
        assert len(df) and not df.select_dtypes("number").isna().any().any(), name
    configs = gpu_study.study_configs(4)
    f = pd.read_csv(smoke / "frontier_all.csv", keep_default_na=False)
    assert sorted(f.model_name.unique()) == ["gpu/idn", "gpu/none"]
    for _, d in f.groupby("model_name"):
        assert set(d.config) == set(configs) | {gpu_study._full_mask(gpu_study.headline_config(4))}
        seq = d[d.config == "sequential"].iloc[0]
        assert seq["ppl_change_%"] == 0 and seq.ppl == seq.seq_ppl
    # every speedup over the fastest sequential variant: sequential's own best variant is exactly 1
    assert f[f.config == "sequential"].speedup.tolist() == [1.0, 1.0]
    assert set(f.baseline) <= set(gpu_study.VARIANT_COLUMNS) and set(f.variant) <= set(gpu_study.VARIANT_COLUMNS)
    runs = pd.read_csv(smoke / "regularization_runs.csv")
    ppl = pd.read_csv(smoke / "ppl.csv")
    one = ppl[ppl.config == parse_config("idn:K=1:n=4:h0").text].set_index("model").ppl
    assert runs.set_index("reg").snlp_ppl.to_dict() == pytest.approx({"none": one["baseline"], "idn": one["idn"]})
    mask = pd.read_csv(smoke / "mask_treatment.csv")
    assert sorted(mask["mask"].unique()) == ["full", "windows"] and mask.config.nunique() == 1
    for f in ("README.md", "gpu_study_frontier.png", "gpu_study_training.png"):
        assert (smoke / f).stat().st_size > 1000


def test_a_seed_is_never_overwritten_and_seeds_add_up(smoke, tmp_path):
    before = (smoke / "seeds" / "seed_0.json").read_bytes()
    with pytest.raises(ValueError, match=r"seed 0 is already in .*choose another --seed"):
        gpu_study.run(seed=0, out=smoke, smoke=True, log=lambda s: None)
    assert (smoke / "seeds" / "seed_0.json").read_bytes() == before
    # a second seed beside the first (its record as a run would write it): the tables hold both
    folder = tmp_path / "study"
    shutil.copytree(smoke / "seeds", folder / "seeds")
    rec = json.loads(before)
    rec["seed"] = 1
    rec["ppl"] = [dict(r, ppl=r["ppl"] * 1.01) for r in rec["ppl"]]
    (folder / "seeds" / "seed_1.json").write_text(json.dumps(rec))
    summary = gpu_study.redraw(folder, log=lambda s: None)
    assert sorted(summary.seed.unique()) == [0, 1] and len(summary) == 4
    assert json.loads((folder / "study.json").read_text())["seeds"] == [0, 1]
    assert set(pd.read_csv(folder / "frontier_all.csv").seed) == {0}  # the first seed's models


def test_the_ledger_judges_b_c_g_on_the_study(smoke, tmp_path):
    folder = tmp_path / "reports" / "gpu" / "study"
    shutil.copytree(smoke, folder)
    (tmp_path / "figures").mkdir()
    write_ledger(tmp_path / "reports", out_dir=tmp_path / "smoke-ledger", log=lambda s: None)
    c = pd.read_csv(tmp_path / "smoke-ledger" / "claims.csv", keep_default_na=False).set_index("key")
    assert c.loc["g", "gpu_verdict"] == "smoke run: no verdict"
    study = json.loads((folder / "study.json").read_text())
    (folder / "study.json").write_text(json.dumps(dict(study, smoke=False)))  # as if a GPU had run it
    write_ledger(tmp_path / "reports", out_dir=tmp_path / "ledger", log=lambda s: None)
    c = pd.read_csv(tmp_path / "ledger" / "claims.csv", keep_default_na=False).set_index("key")
    for key in "bcg":
        assert c.loc[key, "gpu_verdict"] in ("holds", "holds weakly", "does not hold here"), c.loc[key]
        assert c.loc[key, "gpu_ours"].startswith("one seed: no interval")
    named = re.findall(r"over (\S+) sequential", c.loc["g", "gpu_ours"])  # each pick names its baseline
    baselines = set(pd.read_csv(folder / "frontier_all.csv").baseline) | set(pd.read_csv(folder / "decode.csv").baseline)
    assert named and set(named) <= baselines
    assert c.loc["a", "gpu_verdict"] == "—"


def test_the_notebook_draws_a_study(smoke, tmp_path):
    import papermill as pm
    out = tmp_path / "nb"
    pm.execute_notebook(str(ROOT / "nb" / "gpu_study.ipynb"), str(tmp_path / "run.ipynb"), cwd=str(ROOT),
                        parameters=dict(profile="smoke", report_dir=str(out), study_dir=str(smoke)), progress_bar=False)
    drawn = pd.read_csv(out / "gpu_study" / "frontier_all.csv")
    assert drawn.equals(pd.read_csv(smoke / "frontier_all.csv"))
    assert (out / "gpu_study" / "gpu_study_frontier.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--smoke", "--scale", "gpu"], "--smoke runs the smoke scale"),
    (["--scale", "huge"], "invalid choice"),
    (["--seed", "-1", "--smoke"], "seed must be an integer"),
    (["--redraw"], "--redraw needs --out"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "snlp_lab.gpu_study", *args], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "SNLP_CACHE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_full_run_needs_a_gpu(tmp_path):
    if gpu_study.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_study.run(seed=0, out=tmp_path, log=lambda s: None)
    assert not any(tmp_path.iterdir())  # refused before any work
