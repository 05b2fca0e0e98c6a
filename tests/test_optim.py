"""nanochat's Muon (snlp_lab.optim) against its formulas written out, on small float64 matrices."""
import copy

import numpy as np
import pytest
import torch

from snlp_lab.training.optim import POLAR_EXPRESS_COEFFS, NanochatMuon, polar_express

SHAPES = [(64, 16), (16, 64), (48, 40), (40, 48), (32, 32)]  # tall, wide, nearly square, square


def composite(s):
    """The scalar map of the five Polar Express steps: σ -> a σ + b σ³ + c σ⁵, composed."""
    for a, b, c in POLAR_EXPRESS_COEFFS:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def test_coefficients_target_the_band():
    """Over σ in [1e-3, 1] the composed map stays in [0.8589, 1.1411] (the band the optimizer's
    docstring states) and touches both ends."""
    s = composite(np.geomspace(1e-3, 1, 100_001))
    assert 0.85887 < s.min() < 0.8589 and 1.1411 < s.max() < 1.14113


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polar_express_singular_values_in_band(shape, dtype):
    """Random matrices: the output's singular values lie in the band, and its singular vectors are the
    input's (O = P diag(p(σ / (1.01‖G‖_F + 1e-6))) Qᵀ with p the composed map)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, *shape, generator=g, dtype=torch.float64)  # three matrices at once, as stacked
    O = polar_express(G.to(dtype)).double()
    s = torch.linalg.svdvals(O)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert s.min() > 0.85887 - tol and s.max() < 1.14113 + tol
    P, S, Qh = torch.linalg.svd(G, full_matrices=False)
    want = P @ torch.diag_embed(composite(S / (1.01 * G.norm(dim=(-2, -1), keepdim=True)[..., 0] + 1e-6))) @ Qh
    assert torch.allclose(O, want, atol=1e-10 if dtype == torch.float64 else 2e-5)
    with pytest.raises(ValueError, match="1..5"):
        polar_express(G, steps=6)


def reference_step(W, G, M, V, lr, momentum, beta2, wd):
    """One step of nanochat's Muon for one matrix, written out (float64); returns W, M, V after it and
    where the weight was decayed."""
    m, n = W.shape
    M = momentum * M + (1 - momentum) * G
    U = (1 - momentum) * G + momentum * M
    P, S, Qh = torch.linalg.svd(U, full_matrices=False)
    O = P @ torch.diag(composite(S / (1.01 * U.norm() + 1e-6))) @ Qh
    per_row = m >= n
    v = (O ** 2).mean(dim=1, keepdim=True) if per_row else (O ** 2).mean(dim=0, keepdim=True)
    V = beta2 * V + (1 - beta2) * v
    N = O / V.clamp_min(1e-10).sqrt()
    N = N * O.norm() / N.norm()
    eta = lr * max(1.0, m / n) ** 0.5
    same_sign = (N * W) >= 0
    return W - eta * N - eta * wd * W * same_sign, M, V, same_sign


def test_step_equals_the_formula():
    """Two steps on a tall, a wide and a second tall matrix (stacked with the first): momentum, Polar
    Express, second-moment normalisation per row (tall) or column (wide), cautious decay only where
    update and weight have the same sign, step lr·√max(1, m/n)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (3, 5), (6, 4)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]
    lr, momentum, beta2, wd = 0.1, 0.9, 0.9, 0.3
    opt = NanochatMuon(params, lr=lr, momentum=momentum, beta2=beta2, weight_decay=wd)
    second = lambda m, n: torch.zeros((m, 1) if m >= n else (1, n), dtype=torch.float64)  # per row / column
    ref = [(p.detach().clone(), torch.zeros_like(p), second(*p.shape)) for p in params]
    for _ in range(2):
        grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        opt.step()
        new = []
        for (W, M, V), G in zip(ref, grads):
            W2, M2, V2, decayed = reference_step(W, G, M, V, lr, momentum, beta2, wd)
            assert decayed.any() and not decayed.all()  # so that decaying everywhere or nowhere fails
            new.append((W2, M2, V2))
        ref = new
        for p, (W, M, V) in zip(params, ref):
            assert torch.allclose(p.detach(), W, rtol=0, atol=1e-12)
            assert torch.allclose(opt.state[p]["momentum_buffer"], M, atol=1e-12)
            assert torch.allclose(opt.state[p]["second_moment"], V, atol=1e-12)


def test_state_dict_round_trip():
    """A restored optimizer continues exactly like the original (resume)."""
    g = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = NanochatMuon([a], weight_decay=0.1), NanochatMuon([b], weight_decay=0.1)
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    a.grad = grads[0].clone()
    oa.step()
    b.data.copy_(a.data)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from a checkpoint file
    for G in grads[1:]:
        a.grad, b.grad = G.clone(), G.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def test_bad_values():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    for kw, msg in [({"momentum": 1.0}, "momentum"), ({"beta2": -0.1}, "beta2"), ({"lr": -1.0}, "lr"),
                    ({"ns_steps": 0}, "ns_steps")]:
        with pytest.raises(ValueError, match=msg):
            NanochatMuon([p], **kw)
    with pytest.raises(ValueError, match="matrices"):
        NanochatMuon([torch.nn.Parameter(torch.zeros(3))])
