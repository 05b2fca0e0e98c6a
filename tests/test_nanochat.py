"""nanochat checkpoints and the paper's architecture against the reference implementation's outputs.

tests/fixtures/nanochat/ holds three tiny checkpoints written by the paper's code (nanochat-snlp) in
nanochat's format, with that code's outputs (README there): `plain` (no x0/VE; smear and backout),
`x0ve` (SSSL windows shorter than T, GQA), `mhc` (4 streams with value embeddings).
"""
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import snlp_lab
from snlp_lab import solve
from snlp_lab.models.checkpoint import load_checkpoint
from snlp_lab.decoding.decoder import Decoder
from snlp_lab.models.nanochat import load_nanochat, nanochat_config

FIXTURES = Path(__file__).parent / "fixtures" / "nanochat"
STREAMS = 4


def rel(x, ref):
    return float((x.detach().double() - ref.double()).abs().max() / ref.double().abs().max())


def reference(name):
    return load_file(str(FIXTURES / name / "reference.safetensors"))


def flat_streams(h):
    """Our stream states [B, T, n, D] in the reference layout [B·n, T, D] (B-major)."""
    B, T, n, D = h.shape
    return h.permute(0, 2, 1, 3).reshape(B * n, T, D)


def final_state(name, h):
    return flat_streams(h) if name == "mhc" else h


@pytest.mark.parametrize("name", ["plain", "x0ve", "mhc"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_load_reproduces_reference_forward(name, dtype, tol):
    ref = reference(name)
    m = load_nanochat(FIXTURES / name, dtype=dtype)
    assert not m.training and m.lm_head.weight.dtype == dtype
    with torch.no_grad():
        res = solve(m, ref["idx"], method="sequential")
        logits = m(ref["idx"])
    x0 = res.trace[0][:, :, 0] if name == "mhc" else res.trace[0]  # one copy of the streams
    assert rel(logits, ref["logits"]) < max(tol, 1e-6)  # the references are float32 logits
    assert rel(res.logits, ref["logits"]) < max(tol, 1e-6)
    assert rel(x0, ref["x0"]) < tol
    assert rel(final_state(name, res.trace[-1]), ref["h_L"]) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_idn_and_chunks_reproduce_reference_on_plain(dtype, tol):
    ref = reference("plain")
    m = load_nanochat(FIXTURES / "plain", dtype=dtype)
    cases = [(f"idn_{ref_init}_K{K}", dict(method="idn", iters=K, n_par=6, init=init))
             for init, ref_init in (("h0", "h0"), ("fwd", "batch_fwd")) for K in (1, 2)]
    cases.append(("chunkB_2xF2_h0_K1", dict(method="idn", iters=1, chunks="2xF2", init="h0")))
    with torch.no_grad():
        for key, kw in cases:
            res = solve(m, ref["idx"], **kw)
            assert rel(res.logits, ref[f"{key}_logits"]) < max(tol, 1e-6), key
            assert rel(res.trace[-1], ref[f"{key}_h_L"]) < tol, key
            assert rel(res.logits, ref["logits"]) > 0.01, key  # far from sequential: a real test


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_hcn_reproduces_reference_on_mhc(dtype, tol):
    ref = reference("mhc")
    m = load_nanochat(FIXTURES / "mhc", dtype=dtype)
    with torch.no_grad():
        for K in (1, 2):
            res = solve(m, ref["idx"], method="hcn", iters=K, n_par=4, init="h0")
            assert rel(res.logits, ref[f"hcn_h0_K{K}_logits"]) < max(tol, 1e-6)
            assert rel(flat_streams(res.trace[-1]), ref[f"hcn_h0_K{K}_h_L"]) < tol
            assert rel(res.logits, ref["logits"]) > 1e-3


def test_windows_honoured_in_every_path():
    """x0ve has SSSL windows (128) shorter than T = 160. K = n_par reproduces the windowed sequential
    trace in batched IDN, per-layer chunks and KV-cached decoding; the same model with full attention
    (what the paper's parallel layers compute) is a different function."""
    ref = reference("x0ve")
    m = load_nanochat(FIXTURES / "x0ve", dtype=torch.float64)
    idx = ref["idx"]
    L = m.n_layer
    with torch.no_grad():
        seq = solve(m, idx, method="sequential")
        assert rel(seq.trace[-1], ref["h_L"]) < 1e-12
        for kw in (dict(init="h0"), dict(init="fwd"), dict(chunks=f"{L}xF1")):
            res = solve(m, idx, method="idn", iters=L, n_par=L, **kw)
            assert rel(res.trace, seq.trace) < 1e-12, kw
            assert rel(res.logits, seq.logits) < 1e-6, kw
        dec = Decoder(m, method="idn", iters=L, n_par=L, init="h0")
        T0 = 140  # the prompt; then tokens one by one, past the window
        steps = [dec.prefill(idx[:, :T0])[:, -1]] + [dec.step(idx[:, t]) for t in range(T0, idx.shape[1] - 1)]
        assert rel(torch.stack(steps, 1), seq.logits[:, T0 - 1:-1]) < 1e-6
        full = nanochat_config(
            {**dict(sequence_len=256, vocab_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=32),
             "window_pattern": "L"})
        m_full = snlp_lab.build_model(full).double()
        m_full.load_state_dict(m.state_dict())
        assert rel(m_full(idx), ref["logits"]) > 1e-2  # windows matter on this fixture


def test_checkpoint_options_accept_a_nanochat_folder():
    ref = reference("plain")
    m = load_checkpoint(FIXTURES / "plain")  # what bench, the notebooks and --init-from call
    assert rel(m(ref["idx"]), ref["logits"]) < 1e-5
    target = snlp_lab.build_model(m.config)
    load_checkpoint(FIXTURES / "plain", target)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), m.state_dict().values()))
    with pytest.raises(ValueError, match="config fields differ: .*n_layer"):
        load_checkpoint(FIXTURES / "plain", snlp_lab.build_model(m.config, n_layer=5))


def copy_fixture(tmp_path, name="plain"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


class ByteEncoding:
    """Stands in for nanochat's tiktoken Encoding (tiktoken is not a dependency): UTF-8 bytes, BOS 255
    (the fixtures' vocabulary has 256 tokens; byte 255 never occurs in UTF-8)."""
    n_vocab = 256

    def encode_single_token(self, text):
        return {"<|bos|>": 255}[text]

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i != 255).decode("utf-8", errors="replace")


def test_steps_and_tokenizer(tmp_path):
    d = copy_fixture(tmp_path)
    state = torch.load(d / "model_000123.pt", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"] * 2
    torch.save(state, d / "model_000200.pt")
    shutil.copy(d / "meta_000123.json", d / "meta_000200.json")
    newest, old = load_nanochat(d), load_nanochat(d, step=123)
    assert torch.equal(newest.lm_head.weight, 2 * old.lm_head.weight)
    assert newest.tokenizer is None
    with pytest.raises(ValueError, match="no step 5 .*123, 200"):
        load_nanochat(d, step=5)
    (tmp_path / "tokenizer").mkdir()  # nanochat's base_dir/tokenizer/tokenizer.pkl, beside the checkpoints
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(ByteEncoding()))
    tok = load_nanochat(d).tokenizer
    assert tok.bos_id == 255 and tok.decode(tok.encode("déjà vu")) == "déjà vu"
    assert tok.encode_batch(["ab", "c"]) == [[97, 98], [99]]


def test_commands_take_a_nanochat_folder(tmp_path, capsys):
    from snlp_lab.evaluate import main as evaluate_main
    from snlp_lab.generate import main as generate_main
    from snlp_lab.decoding.decoder import generate
    d = copy_fixture(tmp_path)
    assert generate_main(["--checkpoint", str(d), "--prompt", "ab", "--max-new-tokens", "4"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(ByteEncoding()))
    assert generate_main(["--checkpoint", str(d), "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    model = load_nanochat(d)
    want = generate(model, torch.tensor([[255, 97, 98]]), 4, method="sequential")
    assert capsys.readouterr().out.strip() == model.tokenizer.decode(want[0, 1:]).strip()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "text" / "b.txt").write_text("class A:\n    pass\n" * 40)
    assert evaluate_main(["--checkpoint", str(d), "--configs", "sequential", "idn:K=6:n=6", "--data",
                              str(tmp_path / "text"), "--seq-len", "16", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| sequential") or line.startswith("| idn")]
    ppl = [float(r.split("|")[2]) for r in rows]
    assert len(ppl) == 2 and ppl[0] == pytest.approx(ppl[1], rel=1e-5)  # K = n_par: exact


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update({"transformer.h.0.attn.c_extra.weight": torch.zeros(2)}), "unknown key 'transformer.h.0.attn.c_extra"),
    (lambda s: s.pop("smear_gate.weight"), "missing key.*smear_gate.weight"),
    (lambda s: s.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(3, 32)}), "blocks.1.mlp.c_fc.weight.*shape"),
    (lambda s: s.update({"transformer.h.0.hc_attn.H_res_logits": torch.zeros(4, 4)}), "unknown key .*hc_attn.H_res_logits"),
])
def test_bad_keys_name_the_key(tmp_path, edit, match):
    d = copy_fixture(tmp_path)
    state = torch.load(d / "model_000123.pt", weights_only=True)
    edit(state)
    torch.save(state, d / "model_000123.pt")
    with pytest.raises(ValueError, match=match):
        load_nanochat(d)


def test_bad_mhc_keys_and_folders(tmp_path):
    d = copy_fixture(tmp_path, "mhc")
    state = torch.load(d / "model_000123.pt", weights_only=True)
    state["transformer.h.2.hc_mlp.H_pre_logits"] = torch.zeros(3)
    torch.save(state, d / "model_000123.pt")
    with pytest.raises(ValueError, match=r"transformer.h.2.hc_mlp.H_pre_logits.*shape \(3,\)"):
        load_nanochat(d)
    del state["transformer.h.2.hc_mlp.H_pre_logits"]
    torch.save(state, d / "model_000123.pt")
    with pytest.raises(ValueError, match="missing key 'transformer.h.2.hc_mlp.H_pre_logits'"):
        load_nanochat(d)
    with pytest.raises(ValueError, match="not a nanochat checkpoint folder"):
        load_nanochat(tmp_path)
