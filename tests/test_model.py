"""The model: shapes, presets, and the batched layer evaluation against plain references."""
import math

import pytest
import torch
import torch.nn.functional as F

import snlp_lab
from snlp_lab.models.model import rms_norm


def reference_forward(model, idx):
    """An independent, deliberately plain nanochat forward (explicit softmax attention, loops)."""
    cfg = model.config
    B, T = idx.shape
    hd, H, Hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    e = rms_norm(model.wte(idx))
    x0 = e.clone()
    if cfg.smear:
        for t in range(1, T):
            x0[:, t] = e[:, t] + model.smear_lambda * torch.sigmoid(e[:, t, :24] @ model.smear_gate.weight.T) * e[:, t - 1]
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = (pos[:, None].float() * inv[None]).double()
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(t):  # [B, T, h, hd]
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)

    h, states = x0, [x0]
    windows = cfg.window_sizes()
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # i - j
    for l, blk in enumerate(model.blocks):
        mask = (dist >= 0) & (dist <= windows[l])
        x = model.resid_lambdas[l] * h + model.x0_lambdas[l] * x0 if cfg.x0_lambdas else h
        a = rms_norm(x)
        q = (a @ blk.attn.c_q.weight.T).view(B, T, H, hd)
        k = (a @ blk.attn.c_k.weight.T).view(B, T, Hkv, hd)
        v = (a @ blk.attn.c_v.weight.T).view(B, T, Hkv, hd)
        if l in model.ve_layers:
            ve = model.value_embeds[str(l)](idx).view(B, T, Hkv, hd)
            gate = 3 * torch.sigmoid(a[..., :cfg.ve_gate_channels] @ blk.attn.ve_gate.weight.T)
            v = v + gate[..., None] * ve
        q, k = rms_norm(rope(q)) * cfg.qk_scale, rms_norm(rope(k)) * cfg.qk_scale
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        att = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, H * hd)
        x = x + y @ blk.attn.c_proj.weight.T
        x = x + F.relu(rms_norm(x) @ blk.mlp.c_fc.weight.T).square() @ blk.mlp.c_proj.weight.T
        h = x
        states.append(h)
    if cfg.backout:
        h = h - model.backout_lambda * states[cfg.n_layer // 2 + 1]
    logits = rms_norm(h) @ model.lm_head.weight.T
    return cfg.softcap * torch.tanh(logits / cfg.softcap)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_plain"])
def test_forward_matches_plain_reference(fixture, idx, request):
    model = request.getfixturevalue(fixture)
    torch.testing.assert_close(model(idx), reference_forward(model, idx).float(), rtol=1e-5, atol=1e-5)


def test_batched_layers_equal_one_at_a_time(tiny, idx):
    h0, ctx = tiny.embed(idx)
    g = torch.Generator().manual_seed(3)
    H = torch.randn(tiny.n_layer, *h0.shape, generator=g, dtype=torch.float64)
    for start, stop in [(0, 4), (1, 4), (2, 3)]:
        batched = tiny.layers(start, stop, H[start:stop], ctx)
        single = torch.stack([tiny.layer(l, H[l], ctx) for l in range(start, stop)])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the cached stack must equal the autograd one and follow weight updates
        torch.testing.assert_close(tiny.layers(0, 4, H, ctx), torch.stack([tiny.layer(l, H[l], ctx) for l in range(4)]))
        before = tiny.layers(0, 4, H, ctx)
        tiny.blocks[2].mlp.c_fc.weight.mul_(1.5)
        after = tiny.layers(0, 4, H, ctx)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2], after[2])


def test_fresh_model_layers_are_identity_with_x0(idx):
    """Zero-initialised output projections: at init Φ_l(h) = λh + μx0 exactly."""
    m = snlp_lab.build_model("tiny").double()
    h0, ctx = m.embed(idx)
    out = m.layer(1, h0, ctx)
    torch.testing.assert_close(out, m.resid_lambdas[1] * h0 + m.x0_lambdas[1] * ctx.x0)


def test_preset_shapes_and_parameter_counts():
    assert set(["0.5b", "0.5b-plain", "0.5b-mhc", "3b", "d20", "d20-v1", "tiny", "cpu", "cpu-plain"]) <= set(snlp_lab.PRESETS)
    with torch.device("meta"):
        d20 = snlp_lab.build_model("d20-v1")
        half = snlp_lab.build_model("0.5b")
        mhc = snlp_lab.build_model("0.5b-mhc")
    assert d20.num_params() == 560_988_160  # nanochat's first d20: "561M parameters"
    assert mhc.value_embeds and not hasattr(mhc, "x0_lambdas")  # the paper's mHC: VE, no x0 lambdas
    ve = sum(p.numel() for p in half.value_embeds.parameters())
    assert 530e6 < half.num_params() < 540e6 and ve > half.num_params() / 2
    c = snlp_lab.PRESETS["0.5b"]
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.vocab_size, c.sequence_len) == (32, 640, 5, 128, 32768, 2048)
    assert c.window_sizes() == [512, 512, 512, 2048] * 8  # SSSL, short = ceil(2048/4/128)·128
    assert (c.qk_scale, c.rope_base, c.smear, c.backout, c.init) == (1.2, 100000, True, True, "nanochat")


def test_overrides_and_bad_presets():
    m = snlp_lab.build_model("tiny", n_layer=6, n_kv_head=1)
    assert m.n_layer == 6 and m.blocks[0].attn.c_k.weight.shape[0] == m.config.head_dim
    with pytest.raises(ValueError, match="valid presets: .*0.5b"):
        snlp_lab.build_model("0.6b")
    with pytest.raises(ValueError, match="valid fields: .*n_layer"):
        snlp_lab.build_model("tiny", depth=3)
    with pytest.raises(ValueError, match="divisible"):
        snlp_lab.build_model("tiny", n_head=3)


def test_bad_tokens_and_lengths(tiny):
    with pytest.raises(ValueError, match="vocab"):
        tiny(torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match="vocab"):
        tiny(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence_len=32"):
        tiny(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny(torch.zeros(1, 3))


def test_loss_and_gradients_flow(tiny, idx):
    loss = tiny(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in tiny.named_parameters():
        assert p.grad is not None, name


def test_window_masks_need_no_host_copy():
    """Masks read the windows from a buffer on the model's device (a host-to-device copy is not allowed
    while a CUDA graph is captured); the buffer is not part of the checkpoint."""
    from snlp_lab.models.model import attention_mask
    m = snlp_lab.build_model("tiny").double()
    assert m.windows_dev.dtype == torch.long and "windows_dev" not in m.state_dict()
    W = m.stacked_weights(0, m.n_layer)
    assert W["window_dev"].device == m.lm_head.weight.device and torch.equal(W["window_dev"].cpu(), W["window"])
    copies = []
    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: copies.append(a) or to(self, *a, **k)
    try:
        got = attention_mask(W["window"], 3, 6, "cpu", 2, W["window_dev"])
    finally:
        torch.Tensor.to = to
    assert copies == [] and torch.equal(got, attention_mask(W["window"], 3, 6, "cpu", 2))
    assert got.shape == (m.n_layer * 2, 1, 3, 9) and not got.all()  # windows of 4 < 8 keys: some masked
