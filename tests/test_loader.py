"""One loader (`snlp_lab.load_model`) behind every entry point: a preset, a run folder of snlp_lab.train, a
nanochat checkpoint folder and a local Hugging Face folder, each through the API, the benchmark (library
and command), generate, evaluate, the notebooks (nb/speedup, nb/pretrained) and train's --init-from. Every
model that reads text reads it with its own tokenizer, or the error says that it has none."""
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

import snlp_lab
from snlp_lab import LoadedModel, load_model
from snlp_lab.bench import main as bench_main
from snlp_lab.data import PretrainedTokenizer, Tokenizer, encode_split
from snlp_lab.decoding.decoder import generate
from snlp_lab.evaluate import main as evaluate_main
from snlp_lab.generate import main as generate_main
from snlp_lab.lab import figures
from snlp_lab.lab.profiles import PROFILES
from snlp_lab.measurement import bench
from snlp_lab.models.build import build_model
from snlp_lab.models.checkpoint import TOKENIZER_JSON, save_checkpoint
from snlp_lab.models.config import PRESETS
from snlp_lab.models.loader import KINDS, model_info
from snlp_lab.models.nanochat import NanochatTokenizer
from snlp_lab.solvers.ppl import evaluate_ppl, evaluated_tokens

from conftest import randomize
from test_hf import make_folder
from test_nanochat import FIXTURES, ByteEncoding, reference, rel

TEXT = "def f(x):\n    return x + 1  # déjà vu\n"
WORDS = "def return import class self lambda while for in range print value key if else try with as pass".split()
FOLDER_KINDS = ("run", "nanochat", "hf")
SMOKE = PROFILES["smoke"]


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """A folder of each kind (the spec each entry point gets), the models saved in them, a corpus, and
    the same folders without a tokenizer."""
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i:02d}.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(20)) + "\n")
    # a run folder: our GPT and a tokenizer of its own (learned from other text than the corpus)
    torch.manual_seed(0)
    gpt = randomize(build_model("tiny", vocab_size=300)).eval()
    save_checkpoint(root / "run", gpt, step=7, train_config={"model": "tiny", "data": str(corpus), "seq_len": 16})
    src = [p.read_text() for p in sorted(Path(snlp_lab.__file__).parent.glob("*.py"))]
    Tokenizer.train(src, 300).save(root / "run" / TOKENIZER_JSON)
    # nanochat's layout: base_dir/<checkpoints>/model_<step>.pt + meta_<step>.json, base_dir/tokenizer/tokenizer.pkl
    shutil.copytree(FIXTURES / "plain", root / "base" / "plain")
    (root / "base" / "tokenizer").mkdir()
    (root / "base" / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(ByteEncoding()))
    hf = make_folder("llama", root / "hf")  # a tiny llama and its tokenizer, as save_pretrained writes them
    bare = root / "hf_bare"  # the same model without tokenizer files
    tf.AutoModelForCausalLM.from_pretrained(hf).save_pretrained(bare)
    return SimpleNamespace(root=root, corpus=corpus, gpt=gpt, spec={"preset": "tiny", "run": str(root / "run"),
                           "nanochat": str(root / "base" / "plain"), "hf": str(hf)},
                           untokenized={"preset": "tiny", "nanochat": str(FIXTURES / "plain"), "hf": str(bare)})


NAMES = {"preset": "tiny", "run": "tiny (trained, step 7)", "nanochat": "plain (nanochat, step 123)", "hf": "hf"}


def weights(f, kind):
    """How the benchmark names the weights of each kind."""
    return {"preset": "random (perturbed output projections)", "run": f"checkpoint {f.spec['run']}",
            "nanochat": f"nanochat checkpoint {f.spec['nanochat']}", "hf": f"Hugging Face folder {f.spec['hf']}"}[kind]


def ids(model, T=12, seed=1):
    return torch.randint(3, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the API
@pytest.mark.parametrize("kind", KINDS)
def test_load_model_gives_the_saved_model_and_its_tokenizer(f, kind):
    assert snlp_lab.load_model is load_model and {"load_model", "LoadedModel"} <= set(snlp_lab.__all__)
    torch.manual_seed(0)
    m = load_model(f.spec[kind])
    assert isinstance(m, LoadedModel) and (m.kind, m.source) == (kind, f.spec[kind]) and not m.model.training
    info = model_info(f.spec[kind])  # the same model, from the JSON files alone
    assert (info.kind, info.name, info.config.n_layer) == (kind, NAMES[kind], m.model.n_layer)
    with torch.no_grad():
        if kind == "preset":  # fresh random weights: build_model's, from torch's RNG
            torch.manual_seed(0)
            want = build_model("tiny")
            assert m.model.config == PRESETS["tiny"] and m.tokenizer is None and m.meta == {}
            assert all(torch.equal(a, b) for a, b in zip(m.model.state_dict().values(), want.state_dict().values()))
            return
        if kind == "run":
            x = ids(f.gpt)
            assert torch.equal(m.model(x), f.gpt(x)) and m.meta["step"] == 7 and m.meta["train_config"]["model"] == "tiny"
            assert isinstance(m.tokenizer, Tokenizer) and m.tokenizer.vocab_size <= 300
        elif kind == "nanochat":  # the logits the authors' code computed on this checkpoint
            ref = reference("plain")
            assert rel(m.model(ref["idx"]), ref["logits"]) < 1e-5 and m.meta == {}
            assert isinstance(m.tokenizer, NanochatTokenizer) and m.tokenizer.bos_id == 255
        else:
            x = ids(m.model)
            hf = tf.AutoModelForCausalLM.from_pretrained(f.spec["hf"], dtype=torch.float32).eval()
            torch.testing.assert_close(m.model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
            assert isinstance(m.tokenizer, PretrainedTokenizer) and m.meta == {}
    tok = m.require_tokenizer()
    assert tok.decode(tok.encode(TEXT)) == TEXT
    low = load_model(f.spec[kind], dtype="bfloat16")
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}


def test_what_is_not_a_model_is_one_line_naming_the_valid_kinds(f, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [("tinyy", "unknown model 'tinyy': neither a preset nor an existing folder"),
             (str(tmp_path / "nowhere"), f"{tmp_path / 'nowhere'} does not exist"),
             ("", "no model given"),
             (str(tmp_path / "empty"), "holds no model"),
             (str(next(Path(f.spec["run"]).glob("model_*.safetensors"))), "is a file; give the folder that holds it"),
             (str(Path(f.spec["nanochat"]) / "model_000123.pt"), "is a file; give the folder that holds it"),
             (str(Path(f.spec["hf"]) / "config.json"), "is a file; give the folder that holds it")]
    for spec, msg in cases:
        with pytest.raises(ValueError) as e:
            load_model(spec)
        text = str(e.value)
        assert msg in text and "\n" not in text, text
        assert all(name in text for name in PRESETS), text
        assert all(k in text for k in ("a preset", "a run folder", "nanochat checkpoint folder", "Hugging Face")), text


@pytest.mark.parametrize("kind", ["preset", "nanochat", "hf"])
def test_a_model_without_a_tokenizer_says_so(f, kind):
    m = load_model(f.untokenized[kind])
    assert m.tokenizer is None
    with pytest.raises(ValueError, match=f"^{re.escape(f.untokenized[kind])} has no tokenizer; .+"):
        m.require_tokenizer()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(f):
    m = load_model("tiny")
    m.tokenizer = load_model(f.spec["run"]).tokenizer  # up to 300 ids for a model of 64
    with pytest.raises(ValueError, match="more than the model's vocabulary of 64"):
        m.require_tokenizer()


# ------------------------------------------------------------------------------------------ bench
@pytest.mark.parametrize("kind", KINDS)
def test_bench_times_each_kind(f, kind, tmp_path, capsys):
    spec, L = f.spec[kind], model_info(f.spec[kind]).config.n_layer
    given = {"model": spec} if kind == "preset" else {"checkpoint": spec}
    s = bench.settings(**given, device="cpu", study=SMOKE.speedup)
    assert s["name"] == NAMES[kind] and s["checkpoint"] == given.get("checkpoint") and s["seq_lens"] == [16]
    if kind != "preset":  # the model timed is the one saved
        m = bench.bench_model(None, spec, torch.device("cpu"), torch.float32)[0]
        x = ids(m)
        with torch.no_grad():
            assert torch.equal(m(x), load_model(spec).model(x))
    # the command: settings, then run_bench
    flag = "--model" if kind == "preset" else "--checkpoint"
    assert bench_main([flag, spec, "--configs", "sequential", f"idn:K={L}:n={L}", "--seq-lens", "8", "--decode-tokens",
                       "2", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--csv", str(tmp_path / "b.csv")]) == 0
    assert f"weights: {weights(f, kind)}" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "b.csv")
    assert list(df.weights.unique()) == [weights(f, kind)] and list(df.model.unique()) == [NAMES[kind]]
    assert df.top1.iloc[-1] == 1.0  # K = n_par: the sequential logits of the same model


def test_bench_checkpoint_must_be_a_folder(f, capsys):
    with pytest.raises(ValueError, match="checkpoint 'tiny' names a preset, not a folder"):
        bench.settings(checkpoint="tiny", device="cpu")
    with pytest.raises(ValueError, match="does not match the checkpoint, a nanochat folder"):
        bench.settings("cpu", checkpoint=f.spec["nanochat"], device="cpu")
    assert bench_main(["--checkpoint", str(Path(f.spec["nanochat"]) / "model_000123.pt")]) == 2
    assert "is a file; give the folder that holds it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ generate, evaluate
@pytest.mark.parametrize("kind", KINDS)
def test_generate_writes_with_the_models_own_tokenizer(f, kind, capsys):
    args = ["--prompt", "def f(x):", "--max-new-tokens", "6", "--device", "cpu"]
    if kind == "preset":
        assert generate_main(["--checkpoint", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: tiny has no tokenizer; ") and err.count("\n") == 1
        return
    assert generate_main(["--checkpoint", f.spec[kind], *args]) == 0
    m = load_model(f.spec[kind])
    tok = m.tokenizer
    want = generate(m.model, torch.tensor([[tok.bos_id] + tok.encode("def f(x):")]), 6, method="sequential")
    assert capsys.readouterr().out == tok.decode(want[0, 1:]) + "\n"


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_reads_the_data_with_the_models_own_tokenizer(f, kind, capsys):
    args = ["--configs", "sequential", "--seq-len", "16", "--batch-size", "2", "--max-batches", "2", "--device", "cpu"]
    if kind == "preset":
        assert evaluate_main(["--checkpoint", "tiny", "--data", str(f.corpus), *args]) == 2
        assert "error: tiny has no tokenizer; " in capsys.readouterr().err
        return
    m = load_model(f.spec[kind])
    val = encode_split(str(f.corpus), m.tokenizer, "val")
    want = evaluate_ppl(m.model, val, 16, 2, 2)
    runs = [["--data", str(f.corpus)]] + ([[]] if kind == "run" else [])  # a run folder records its data
    for data in runs:
        assert evaluate_main(["--checkpoint", f.spec[kind], *data, *args]) == 0
        out = capsys.readouterr().out
        row = next(r.split("|") for r in out.splitlines() if r.startswith("| sequential"))
        assert float(row[2]) == pytest.approx(want, rel=1e-4) and int(row[3]) == evaluated_tokens(len(val), 16, 2, 2)
        assert f"({len(val):,} tokens with the model's own tokenizer)" in out
    if kind != "run":
        assert evaluate_main(["--checkpoint", f.spec[kind], *args]) == 2
        assert f"records no training data ({kind} folder); pass --data" in capsys.readouterr().err
    if kind != "run":  # the same model without its tokenizer
        assert evaluate_main(["--checkpoint", f.untokenized[kind], "--data", str(f.corpus), *args]) == 2
        assert "has no tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ notebooks
def notebook_code(name: str, **params) -> tuple[dict, str]:
    """The namespace after the parameters cell with `params` set, and the code of every later cell (from
    the jupytext .py, the source both notebook files share)."""
    import jupytext
    cells = [c for c in jupytext.read(figures.ROOT / "nb" / f"{name}.py").cells if c.cell_type == "code"]
    i = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    ns = {}
    exec(cells[i].source, ns)
    ns.update(params)
    return ns, "\n".join(c.source for c in cells[i + 1:])


@pytest.fixture
def out_dirs(tmp_path):
    return dict(fig_dir=str(tmp_path / "figures"), report_dir=str(tmp_path / "reports"))


@pytest.mark.parametrize("kind", ["run", "hf"])  # nanochat: through papermill below; a preset: test_notebooks
def test_speedup_notebook_times_each_kind(f, kind, out_dirs):
    L = model_info(f.spec[kind]).config.n_layer
    ns, code = notebook_code("speedup", profile="smoke", device="cpu", configs=["sequential", f"idn:K={L}:n={L}"],
                             checkpoint=f.spec[kind], **out_dirs)
    exec(code, ns)
    df = ns["df"]
    assert ns["S"]["name"] == NAMES[kind] and df.weights[0] == weights(f, kind) and df.top1.iloc[-1] == 1.0
    assert (Path(out_dirs["report_dir"]) / f"{ns['name']}.csv").is_file()


def test_speedup_notebook_through_papermill_with_a_nanochat_folder(tmp_path, monkeypatch):
    """What a user runs from the repository root, the path relative to it (the kernel runs in nb/)."""
    import papermill as pm
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(figures.ROOT), os.environ.get("PYTHONPATH")])))
    nb = figures.ROOT / "nb" / "speedup.ipynb"
    out = pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(nb.parent), kernel_name="python3",
                              progress_bar=False, parameters=dict(
                                  checkpoint="tests/fixtures/nanochat/plain", profile="smoke", device="cpu",
                                  configs=["sequential", "idn:K=6:n=6"], fig_dir=str(tmp_path / "figures"),
                                  report_dir=str(tmp_path / "reports")))
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                   for c in out.cells for o in c.get("outputs", []))
    assert f"weights: nanochat checkpoint {FIXTURES / 'plain'}" in text and NAMES["nanochat"] in text
    table = pd.read_csv(tmp_path / "reports" / "speedup_plain_trained.csv")
    assert list(table.config) == ["sequential", "idn:K=6:n=6"] and table.top1.tolist() == [1.0, 1.0]


@pytest.fixture
def stand_ins(monkeypatch):
    """The profile's own models and data stand-ins (small random models on random tokens): these tests
    are about the given model, not about training the profile's."""
    from snlp_lab.lab import experiments as E

    def trained(P, *args, **kwargs):
        torch.manual_seed(0)
        return randomize(build_model("tiny")).eval().requires_grad_(False)

    monkeypatch.setattr(E, "trained", trained)
    monkeypatch.setattr(E, "dataset", lambda P: SimpleNamespace(val=np.arange(1000, dtype=np.uint16) % 64))


@pytest.mark.parametrize("kind", KINDS)
def test_pretrained_notebook_scores_each_kind_on_its_own_tokens(f, kind, out_dirs, stand_ins):
    from snlp_lab.lab import experiments as E
    params = dict(profile="smoke", checkpoint=f.spec[kind], **out_dirs)
    if kind == "hf":
        params["hf_model"] = f.spec["hf"]
    ns, code = notebook_code("pretrained", **params)
    if kind == "preset":
        with pytest.raises(ValueError, match="^tiny has no tokenizer; a preset"):
            exec(code, ns)
        return
    exec(code, ns)
    m = load_model(f.spec[kind])
    own = encode_split(SMOKE.data, m.tokenizer, "val")  # the profile's corpus in the model's own tokens
    names = [f"checkpoint {Path(f.spec[kind]).name}"] + (["off-the-shelf hf"] if kind == "hf" else [])
    res = ns["res"]
    for name in names:
        assert np.array_equal(ns["data"][name].val, own)
        seq = res[(res.model == name) & (res.config == "sequential")].ppl.item()
        T = SMOKE.seq_len
        assert seq == pytest.approx(evaluate_ppl(m.model, own, T, E._eval_batch_size(SMOKE, T), SMOKE.eval_batches),
                                    rel=1e-6)
    assert (Path(out_dirs["report_dir"]) / "pretrained.csv").is_file()


def test_pretrained_notebook_refuses_a_folder_without_a_tokenizer(out_dirs, stand_ins):
    ns, code = notebook_code("pretrained", profile="smoke", checkpoint=str(FIXTURES / "plain"), **out_dirs)
    with pytest.raises(ValueError, match="plain has no tokenizer; nanochat keeps it in tokenizer/tokenizer.pkl"):
        exec(code, ns)


# ------------------------------------------------------------------------------------------ train --init-from
@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_train_init_from_starts_from_the_model_and_its_tokenizer(f, kind, tmp_path, monkeypatch):
    """With every learning rate 0, the run's weights are those of the model it started from, and it read
    the data with that model's tokenizer."""
    from snlp_lab.train import main as train_main
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    zero = [a for k in ("matrix", "embedding", "unembedding", "scalar") for a in (f"--{k}-lr", "0")]
    assert train_main(["--init-from", f.spec[kind], "--data", str(f.corpus), "--steps", "1", "--batch-size", "2",
                       "--seq-len", "16", *zero, "--eval-batches", "1", "--out", str(out), "--device", "cpu",
                       "--no-progress"]) == 0
    before, after = load_model(f.spec[kind]), load_model(str(out))
    # the smear and backout parameters train at a fixed rate of their own (nanochat's setup_optimizer);
    # everything else is where the starting model left it
    from snlp_lab.training.optim import SMEAR_PARAMS
    start, now = before.model.state_dict(), after.model.state_dict()
    assert set(start) == set(now)
    for k in start:
        if not k.endswith(SMEAR_PARAMS):
            torch.testing.assert_close(now[k], start[k], rtol=0, atol=0, msg=k)
    assert after.require_tokenizer().encode(TEXT) == before.require_tokenizer().encode(TEXT)


def test_train_init_from_names_what_it_cannot_start_from(tmp_path, capsys):
    from snlp_lab.train import main as train_main
    for spec, msg in (("tiny", "is a preset: train it from scratch with --model tiny"),
                      (str(tmp_path / "none"), "does not exist; valid: a preset")):
        assert train_main(["--init-from", spec, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
