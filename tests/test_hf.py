"""Off-the-shelf transformers decoders as layer stacks (`snlp_lab.hf`), with no network: tiny random
models of every supported family, built from their config classes and saved with `save_pretrained`."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

import snlp_lab
from snlp_lab import solve
from snlp_lab.measurement.bench import default_configs, run_bench
from snlp_lab.data import PretrainedTokenizer, load_corpus, prepare_data
from snlp_lab.decoding.decoder import Decoder, generate
from snlp_lab.models.hf import SUPPORTED, load_hf
from test_decode import idn_decode_without_cache  # the decoder's procedure written plainly, no cache

L, WINDOW, VOCAB = 4, 5, 320  # sequences in the tests are longer than the sliding window
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def tiny_config(family: str):
    """A 4-layer model of the family with each quirk switched on: sliding windows (Mistral on every
    layer, Qwen2 above max_window_layers, Gemma 2/3 on alternating layers), Gemma's embedding scale and
    extra norms, Gemma 2's attention and final logit soft-capping, Gemma 3's local rotary base, Qwen2's
    attention biases, Qwen3's and Gemma 3's QK norms, grouped-query attention everywhere."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    gemma = dict(kw, tie_word_embeddings=True, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW)
    return {
        "llama": lambda: tf.LlamaConfig(**kw),
        "mistral": lambda: tf.MistralConfig(**kw, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**kw, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        "qwen3": lambda: tf.Qwen3Config(**kw, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**dict(kw, tie_word_embeddings=True, head_dim=8)),
        "gemma2": lambda: tf.Gemma2Config(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**gemma, final_logit_softcapping=30.0, sliding_window_pattern=2,
                                                   rope_local_base_freq=100.0),
    }[family]()


def tiny_tokenizer(no_bos: bool = False):
    """A 300-token byte-level BPE learned from this package's source, as a transformers tokenizer
    (ids 0-2 are <pad>, <s>, </s>, matching the tiny configs). no_bos: like Qwen's, only an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in sorted(Path(snlp_lab.__file__).parent.glob("*.py"))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                      bos_token=None if no_bos else "<s>")


def make_folder(family: str, folder: Path, seed: int = 0) -> Path:
    cfg = tiny_config(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tiny_tokenizer(no_bos=family.startswith("qwen")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return make_folder(request.param, tmp_path_factory.mktemp(request.param))


def load(folder, dtype=torch.float64):
    return load_hf(folder, dtype=dtype).requires_grad_(False)


def ids(B=2, T=12, seed=1):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------ the layer maps
def test_every_supported_family_is_tested():
    assert set(FAMILIES) == set(SUPPORTED)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_sequential_logits_equal_transformers_forward(folder, dtype, tol):
    m = load(folder, dtype)
    idx = ids(T=20)
    ours, ref = m(idx), m.hf(idx).logits
    assert ours.dtype == dtype and rel(ours, ref) < tol
    # the trace ends in the state transformers' own model normalises for its head
    h = solve(m, idx, method="sequential").trace[-1]
    assert rel(m.hf.get_decoder().norm(h), m.hf.get_decoder()(idx).last_hidden_state) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batched_layers_equal_one_at_a_time(folder, dtype, tol):
    m = load(folder, dtype)
    idx = ids(T=10)
    g = torch.Generator().manual_seed(0)
    h0, ctx = m.embed(idx)
    H = h0 + torch.randn(L, *h0.shape, generator=g, dtype=dtype)  # a different input for every layer
    for a, b in ((0, L), (1, 3)):
        one = torch.stack([m.layer(l, H[l], ctx) for l in range(a, b)])
        assert rel(m.layers(a, b, H[a:b], ctx), one) < tol
    # with cached keys/values of the first 6 tokens, the last 4 give the full sequence's last rows
    out, (k, v) = m.layers(0, L, H[:, :, :6], m.embed(idx[:, :6])[1], return_kv=True)
    assert k.shape == (L, 2, m.config.n_kv_head, 6, m.config.head_dim)
    _, ctx_new = m.embed(idx[:, 6:], pos=6)
    rest = m.layers(0, L, H[:, :, 6:], ctx_new, past=(k, v))
    full = m.layers(0, L, H, ctx)
    # Gemma 2's eager attention takes its softmax in float32 (transformers' eager_attention_forward), so
    # float64 scores that differ in their last bit between the cached and the full call can round apart
    # there: float32 agreement is all that path can give
    tol = max(tol, 1e-6) if m.hf.config.model_type == "gemma2" else tol
    assert rel(torch.cat([out, rest], dim=2), full) < tol
    one = m.layers(2, 3, H[2:3, :, 6:], ctx_new, past=(k[2:3], v[2:3]))  # a single layer runs its module
    assert rel(one[0], full[2, :, 6:]) < tol


@pytest.mark.parametrize("method", ["idn", "diagn", "newton", "jacobi", "scaled-idn"])
def test_k_equals_n_par_reproduces_the_trace(folder, method):
    """Finite termination on transformers' layers: K = n_par iterations give the sequential trace."""
    m = load(folder)
    idx = ids()
    seq = solve(m, idx, method="sequential")
    for n in (L, 3):
        res = solve(m, idx, method=method, iters=n, n_par=n, init="h0")
        assert rel(res.trace, seq.trace) < 1e-10 and rel(res.logits, seq.logits) < 1e-10
    one = solve(m, idx, method=method, iters=1, n_par=L)  # one iteration is not the trace
    assert rel(one.trace[-1], seq.trace[-1]) > 1e-3


# ------------------------------------------------------------------------------------------ decoding
def test_greedy_decoding_equals_transformers_generate(folder):
    m = load(folder)
    prompt = ids(T=4)
    ref = m.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False, pad_token_id=0)
    assert torch.equal(generate(m, prompt, 8, method="sequential"), ref)
    assert torch.equal(generate(m, prompt, 8, method="idn", iters=L, n_par=L), ref)  # K = n_par
    assert torch.equal(generate(m, prompt, 8, method="newton", iters=2, n_par=2, init="warm"), ref)


@pytest.mark.parametrize("iters,n_par,init", [(1, 3, "h0"), (2, 4, "fwd"), (1, 4, "warm")])
def test_cached_decoding_equals_recomputation(folder, iters, n_par, init):
    m = load(folder)
    t = ids(T=11, seed=7)
    prompt, fed = t[:, :5], t[:, 5:]  # the last tokens attend across the sliding window
    dec = Decoder(m, method="idn", iters=iters, n_par=n_par, init=init)
    dec.prefill(prompt)
    got = torch.stack([dec.step(fed[:, i]) for i in range(fed.shape[1])], dim=1)
    ref = idn_decode_without_cache(m, prompt, fed, iters, n_par, None, init)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_fusion_is_refused(folder):
    m = load(folder)
    for call in (lambda: solve(m, ids(), method="idn", chunks="2xF2"), lambda: Decoder(m, chunks="2xF2")):
        with pytest.raises(ValueError, match="not supported on HFModel models .* use chunks=None"):
            call()


# ------------------------------------------------------------------------------------------ bench, PPL
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_folder("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small corpus: this package's source files, one document each."""
    out = tmp_path_factory.mktemp("text")
    for p in sorted(Path(snlp_lab.__file__).parent.glob("*.py")):
        (out / f"{p.stem}.txt").write_text(p.read_text())
    return out


def test_bench_runs_on_a_folder(llama):
    configs = default_configs(L, fusion=False) + [f"idn:K={L}:n={L}"]  # the defaults for a model without fusion
    df = run_bench(str(llama), configs=configs, seq_lens=[12], decode_tokens=3, repeats=1, warmup=0, device="cpu")
    assert list(df.config) == configs and not any("xF" in c for c in configs)
    assert df.weights[0] == f"Hugging Face folder {llama}" and (df.prefill_ms > 0).all()
    assert df.top1.iloc[-1] == 1.0  # K = n_par: the sequential logits
    with pytest.raises(ValueError, match="not supported on HFModel"):
        run_bench(str(llama), configs=["idn:K=1:n=4:2xF2"], seq_lens=[12], decode_tokens=3)


def test_validation_ppl_with_the_models_own_tokenizer(llama, text, tmp_path):
    ds = prepare_data(str(text), tokenizer=llama, cache=tmp_path, progress=False)
    assert isinstance(ds.tokenizer, PretrainedTokenizer) and ds.train.dtype.name == "uint16"
    assert ds.meta["pretrained_tokenizer"] == str(llama)
    # the validation stream is BOS + the first validation document in the model's own tokens, ...
    enc = tf.AutoTokenizer.from_pretrained(llama)
    doc = enc.encode(next(t for _, t in load_corpus(str(text)).docs("val")), add_special_tokens=False)
    assert ds.val[:1 + len(doc)].tolist() == [enc.bos_token_id] + doc
    # ... and its PPL is exp(CE) of transformers' logits on it
    m = load(llama, torch.float32)
    x = torch.from_numpy(ds.val[:17].astype("int64"))
    ce = torch.nn.functional.cross_entropy(m.hf(x[None, :16]).logits[0], x[1:17])
    assert snlp_lab.evaluate_ppl(m, ds.val, 16, 1, max_batches=1) == pytest.approx(ce.exp().item(), rel=1e-5)
    seq = snlp_lab.evaluate_ppl(m, ds.val, 16, 4, max_batches=2)
    # K = n_par is the sequential PPL; one IDN iteration is not: it lies outside the same rounding bound (how far
    # outside depends on the validation documents, i.e. on which files the package holds, so no more is asserted)
    assert snlp_lab.evaluate_ppl(m, ds.val, 16, 4, 2, method="idn", iters=L, n_par=L) == pytest.approx(seq, rel=1e-5)
    assert snlp_lab.evaluate_ppl(m, ds.val, 16, 4, 2, method="idn", iters=1, n_par=L) != pytest.approx(seq, rel=1e-5)
    again = prepare_data(str(text), tokenizer=llama, cache=tmp_path, progress=False)
    assert again.cached and again.path == ds.path


def test_a_tokenizer_without_bos_starts_documents_with_eos(tmp_path, text):
    folder = make_folder("qwen2", tmp_path / "qwen2")
    tok = PretrainedTokenizer(folder)
    assert tok.hf.bos_token_id is None and tok.bos_id == tok.hf.eos_token_id == 2
    ds = prepare_data(str(text), tokenizer=folder, cache=tmp_path / "cache", progress=False)
    assert ds.val[0] == 2 and (ds.train == 2).sum() == ds.meta["train_docs"]


# ------------------------------------------------------------------------------------------ fine-tuning
def test_fine_tuning_with_the_regularizer_loads_back_and_resumes(llama, text, tmp_path):
    import snlp_lab.training as T
    base = dict(init_from_hf=str(llama), data=str(text), seq_len=16, batch_size=4, steps=4, reg="idn", lam=1.0,
                n_par_set=(2, 4), warmup_frac=0.0, eval_batches=2, eval_snlp=f"idn:K=1:n={L}", progress=False)
    full = T.train(T.TrainConfig(**base, out=str(tmp_path / "full")))
    cfg = T.resolve(T.TrainConfig(**base))
    assert cfg.model == "hf" and cfg.vocab_size == VOCAB and cfg.matrix_lr == T.FINETUNE_LRS["matrix_lr"]
    lines = [m for m in full.metrics if "loss" in m]
    assert all(m["reg"] > 0 for m in lines)
    # what the regularizer penalises falls: one IDN step's relative distance from the sequential final
    # state, on fixed validation windows (per-batch training values are too noisy over 4 steps)
    ds = prepare_data(str(text), tokenizer=llama, cache=tmp_path / "cache", progress=False)
    idx = torch.as_tensor(ds.val[:4 * 16].astype("int64")).view(4, 16)

    def idn_error(m):
        with torch.no_grad():
            seq, idn = (solve(m.float().eval(), idx, method=k, iters=1, n_par=L).trace[-1] for k in ("sequential", "idn"))
        return float((idn - seq).norm() / seq.norm())

    assert idn_error(full.model) < 0.9 * idn_error(load_hf(llama, dtype=torch.float32))
    # the run folder's weights are a Hugging Face folder: load_hf and transformers read them
    back = load_hf(full.run_dir, dtype=torch.float32)
    assert sorted(p.name for p in full.run_dir.glob("hf_*")) == ["hf_0000004"]
    for (k, a), b in zip(full.model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert (full.run_dir / "hf_0000004" / "tokenizer.json").is_file()
    # resume: stop after 2 steps, continue to 4: the same losses, bitwise
    cut = T.TrainConfig(**base, out=str(tmp_path / "cut"))
    T.train(dataclasses.replace(cut, stop_at=2))
    second = T.train(dataclasses.replace(cut, resume=True))
    assert second.losses == full.losses
    # the SNLP-forward objective on the same loop: its first loss is the CE of one IDN iteration
    fwd = T.train(T.TrainConfig(**{**base, "reg": "none", "objective": "snlp-forward", "iters": 1, "n_par": L,
                                   "steps": 1}, out=str(tmp_path / "fwd")))
    x, y = next(snlp_lab.data.TokenStream(prepare_data(str(text), tokenizer=llama).train, 4, 16, seed=0))
    want = torch.nn.functional.cross_entropy(solve(load(llama, torch.float32), x, "idn", 1, L).logits.flatten(0, 1),
                                             y.flatten())
    assert fwd.losses[0] == pytest.approx(want.item(), rel=1e-5)


def test_fine_tuning_cli_errors(llama, text, capsys):
    import snlp_lab.train as train_cmd
    assert train_cmd.main(["--init-from-hf", str(llama), "--data", str(text), "--override", "n_layer=2"]) == 2
    assert "keeps its config" in capsys.readouterr().err
    assert train_cmd.main(["--init-from-hf", str(llama), "--data", str(text), "--vocab-size", "300"]) == 2
    assert "leave --vocab-size out" in capsys.readouterr().err
    assert train_cmd.main(["--init-from-hf", "/nonexistent", "--data", str(text)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad folders
def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_hf(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_hf(tmp_path / "empty")
    tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model, which is not a supported causal LM; supported model "
                                         "types: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text"):
        load_hf(tmp_path / "bert")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model, which is not a supported causal LM"):
        load_hf(tmp_path / "gpt2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="transformers cannot load"):
        load_hf(tmp_path / "broken")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid: None"):
        load_hf(tmp_path / "bert", dtype="fp8")


def test_bad_token_ids_and_lengths(llama):
    m = load(llama)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 320\)"):
        m.embed(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="longer than the model's context max_position_embeddings=64"):
        m.embed(torch.zeros(1, 65, dtype=torch.long))


# ------------------------------------------------------------------------------------------ notebook
def test_pretrained_notebook_with_an_off_the_shelf_model(llama, tmp_path, monkeypatch):
    """nb/pretrained with `-p hf_model PATH`: one-step SNLP on the folder's model next to our models."""
    import pandas as pd
    import papermill as pm
    from snlp_lab.lab.figures import ROOT
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "cache"))  # the toy models stay out of the user's cache
    nb = ROOT / "nb" / "pretrained.ipynb"
    pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(nb.parent), kernel_name="python3",
                        parameters=dict(profile="smoke", fig_dir=str(tmp_path / "fig"),
                                        report_dir=str(tmp_path / "rep"), hf_model=str(llama)), progress_bar=False)
    df = pd.read_csv(tmp_path / "rep" / "pretrained.csv")
    ours = df[df.model == f"off-the-shelf {llama.name}"].set_index("config")
    # sequential, then K = 1, 2 at n = L/2 = 2 and K = 1, 2, 4 at n = L = 4 (K <= n: K = n is exact)
    assert list(ours.index) == ["sequential"] + [f"idn K={K} n={n} h0" for n, K in [(2, 1), (2, 2), (4, 1), (4, 2),
                                                                                   (4, 4)]]
    assert ours.loc["sequential", "ppl"] > 1
    assert abs(ours.loc[f"idn K={L} n={L} h0", "ppl_change_%"]) < 1e-3  # K = n_par: sequential
    # one step is not exact: its change lies above the rounding that bounds K = n_par (the size of the
    # change depends on the smoke corpus, which is the package's own source, so no more is asserted)
    assert abs(ours.loc[f"idn K=1 n={L} h0", "ppl_change_%"]) > 1e-3
    assert f"off-the-shelf {llama.name})" in (tmp_path / "rep" / "readings.jsonl").read_text()
    with pytest.raises(pm.PapermillExecutionError, match="nothing does not exist; valid: a preset") as err:
        pm.execute_notebook(str(nb), str(tmp_path / "bad.ipynb"), cwd=str(nb.parent), kernel_name="python3",
                            parameters=dict(profile="smoke", fig_dir=str(tmp_path), report_dir=str(tmp_path),
                                            hf_model=str(tmp_path / "nothing")), progress_bar=False)
    assert err.value.exec_count <= 3  # the first code cell
