"""The GPU check's code path on the CPU (`make gpu-check SMOKE=1`): every part runs, the correctness
cases hold on the CPU too, and the report says what it measured."""
import json

import pandas as pd
import pytest
import torch

from snlp_lab.solvers.grammar import parse_config
from snlp_lab.measurement import bench
from snlp_lab.lab import gpu_check
import snlp_lab.gpu_check as gpu_check_cmd


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    return gpu_check.run(smoke=True, out=out, log=lambda s: None)


def test_correctness_cases_pass_on_cpu(smoke):
    corr = smoke["correctness"]
    assert smoke["ok"] and corr.ok.all(), corr[~corr.ok]
    # every method, chunks, decoding and the regularizer are covered
    cases = " ".join(corr.case)
    for what in ("jacobi", "idn", "scaled-idn", "diagn", "newton", "hcn", "2xF2", "decode", "regularizer"):
        assert what in cases
    assert (corr.err_fp32 < gpu_check.TOL_FP32).all() and (corr.err_bf16_autocast < gpu_check.TOL_BF16).all()
    assert (corr.err_bf16_autocast > corr.err_fp32).all()  # bf16 really ran in bf16


def test_report_files_and_numbers(smoke):
    out = smoke["out"]
    for f in ("README.md", "correctness.md", "speed.csv", "speed.md", "paper.md", "gpu_check.json",
              "speedup_gpu_0.5b-plain.png", "speedup_gpu_0.5b.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 100, f
    j = json.loads((out / "gpu_check.json").read_text())
    assert set(j["seconds"]) == {"correctness", "limits", "speed"}  # written by the report part itself
    assert j["environment"]["torch"] == torch.__version__ and j["smoke"] is True
    assert j["limits"]["copy_GB_s"] > 0 and j["limits"]["matmul_TFLOP_s"] > 0
    speed = pd.DataFrame(j["speed"])  # (speed.csv writes a variant not timed as text)
    extra = gpu_check.SIZES["smoke"]["extra_configs"]["0.5b-plain"][32]
    assert set(speed.config) == set(gpu_check.CONFIGS) | set(extra) and set(speed["T"]) == {16, 32}
    assert list(speed[speed.config.isin(extra)][["model", "T", "mask"]].itertuples(index=False)) == [("0.5b-plain", 32, "full")]
    # every speedup is over the fastest sequential variant of its run: the sequential row's best variant
    # is 1, none beats it, and the baseline columns name that variant
    for _, seq in speed[speed.config == "sequential"].iterrows():
        for kind in ("prefill", "decode"):
            cols = {v: c[2 if kind == "prefill" else 3] for v, c in gpu_check.VARIANT_COLS.items()}
            timed = {v: seq[c] for v, c in cols.items() if seq[c] is not None and not pd.isna(seq[c])}
            assert max(timed.values()) == pytest.approx(1.0) and timed[seq[f"{kind}_baseline"].split(" (")[0]] == 1.0
    # compiled and compiled+graphed where the plan says (the smoke: sequential, 0.5b-plain, T = 16), the
    # rest reported as not compiled, with the reason
    compiled = speed[speed.compiled == "{'backend': 'eager'}"]
    assert list(compiled[["model", "config", "T"]].itertuples(index=False)) == [("0.5b-plain", "sequential", 16)]
    assert (compiled.compile_s > 0).all() and (compiled.compiled_graph_err < 1e-6).all()
    assert (speed.drop(compiled.index).compiled == "not compiled (compile budget of 0 s spent)").all()
    assert speed.drop(compiled.index).prefill_compiled_graph_ms.isna().all() and (speed.drop(compiled.index).compile_s == 0).all()
    assert j["compile"]["spent_s"] == pytest.approx(compiled.compile_s.sum()) and j["compile"]["budget_s"] == 0
    assert (speed.graph_err < 1e-6).all()  # on a CPU the "graphed" functions recompute the same logits
    # what each pass reads and computes, its floor on the measured limits, each variant's time over it
    for col in bench.FLOOR_COLUMNS + bench.GRAPH_FLOOR_COLUMNS + ["prefill_MB_tok", "decode_MFLOP_tok"]:
        assert (speed[col] > 0).all(), col
    assert ((speed.prefill_graph_x_floor - speed.prefill_graph_ms / speed.prefill_floor_ms).abs() < 1e-9).all()
    assert (compiled.decode_compiled_graph_x_floor - 1e3 / compiled.decode_compiled_graph_tok_s
            / compiled.decode_floor_ms).abs().max() < 1e-9
    table = (out / "speed.md").read_text()
    assert "nan" not in table and gpu_check.NOT_TIMED in table
    readme = (out / "README.md").read_text()
    assert "Smoke run" in readme and "float32 matrix product" in readme and "x its floor" in readme
    assert "## Compiling" in readme and "0.5b-plain T=16 `sequential`" in readme and "not compiled (compile budget" in readme
    assert "The paper's mask treatment, 0.5b-plain, T = 32" in readme


def test_redraw_from_json(smoke, tmp_path):
    out = smoke["out"]
    (out / "speed.md").unlink()
    summary = gpu_check.redraw(out)
    assert (out / "speed.md").is_file() and len(summary) == len(pd.read_csv(out / "speed.csv"))
    with pytest.raises(ValueError, match="gpu_check.json is missing"):
        gpu_check.redraw(tmp_path)


def test_redraw_of_a_check_without_costs(smoke, tmp_path):
    """A check written before the per-token costs and x_floor columns (and the limits' device) redraws,
    with x_floor from its recorded times and floors."""
    j = json.loads((smoke["out"] / "gpu_check.json").read_text())
    new = [c for c in gpu_check.SPEED_COLS if c.endswith(("_tok", "x_floor"))]
    j["speed"] = [{k: v for k, v in r.items() if k not in new} for r in j["speed"]]
    j["limits"] = {k: j["limits"][k] for k in ("copy_GB_s", "matmul_TFLOP_s", "matmul_dtype")}
    (tmp_path / "gpu_check.json").write_text(json.dumps(j))
    gpu_check.redraw(tmp_path)
    assert "prefill_floor_ms" in (tmp_path / "speed.md").read_text()
    redrawn = pd.read_csv(tmp_path / "speed.csv")
    assert "prefill_MB_tok" not in redrawn and (redrawn.decode_graph_x_floor > 0).all()


def test_redraw_of_the_committed_record(tmp_path):
    """reports/gpu/gpu_check.json predates the compiled variants, the fastest-variant baselines and the
    per-token costs: it redraws, as what it measured (eager over eager, graphed over graphed)."""
    from snlp_lab.core.paths import repo_root
    (tmp_path / "gpu_check.json").write_bytes((repo_root() / "reports" / "gpu" / "gpu_check.json").read_bytes())
    summary = gpu_check.redraw(tmp_path)
    assert len(summary) == 28 and "prefill_compiled_speedup" not in summary
    readme = (tmp_path / "README.md").read_text()
    assert "eager over eager, graphed over graphed" in readme and "## Compiling" not in readme
    paper = pd.read_csv(tmp_path / "paper.csv")
    assert list(paper.columns) == ["model", "config", "T", "paper", "eager_over_eager", "eager", "graphed", "bound"]
    assert paper.eager_over_eager.tolist() == pytest.approx(paper.eager.tolist())  # the old record's speedups were eager over eager


def test_without_gpu_the_cli_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check_cmd.main([]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device")


def test_graphs_refuse_host_side_surrogates(tiny):
    idx = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="cannot be captured as a CUDA graph"):
        bench.graphed_runs(tiny, parse_config("diagn:K=1:n=4"), idx, 2, torch.device("cpu"))


def test_only_make_gpu_check_writes_the_committed_results(tmp_path, monkeypatch):
    """Without --out a check writes a new scratch folder of its own; the Makefile names reports/gpu."""
    from snlp_lab.core.paths import repo_root
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path))
    first, second = gpu_check.default_out(), gpu_check.default_out(smoke=True)
    assert first != second and all(p.is_relative_to(tmp_path / "scratch") for p in (first, second))
    assert "--out reports/gpu" in (repo_root() / "Makefile").read_text()
