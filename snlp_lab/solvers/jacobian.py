"""Jacobian tools for one layer map f = Φ_l at an input h (any state shape).

The layer Jacobian J = ∂f/∂h acts on the whole state (attention mixes positions), so it is a
(B·T·D)² matrix: dense only for toy sizes, otherwise used through products J v (forward mode) and
J^T u (reverse mode). Surrogates A are given as functions v -> A v of the same shape.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Fn = Callable[[torch.Tensor], torch.Tensor]


def layer_fn(model, l: int, ctx) -> Fn:
    """h -> Φ_l(h) with the forward's context fixed."""
    return lambda h: model.layer(l, h, ctx)


def jvp(f: Fn, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v by forward-mode AD. The fused attention kernels have no forward-mode derivative, so
    attention runs on the math kernel here (same function, composed of differentiable ops)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, (h,), (v,))[1]


def vjp(f: Fn, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J^T u by reverse-mode AD."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.vjp(f, h)[1](u)[0]


def jvp_by_vjp(f: Fn, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v with reverse mode only: u -> J^T u is linear with matrix J^T, so its VJP with v is J v."""
    with sdpa_kernel(SDPBackend.MATH):  # double backward through attention needs the math kernel
        _, pull = torch.func.vjp(f, h)
        u0 = torch.zeros_like(h)
        return torch.func.vjp(lambda u: pull(u)[0], u0)[1](v)[0]


def jvp_fd(f: Fn, h: torch.Tensor, v: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """J v by central differences; the step is relative to |h| and |v| and the dtype's precision."""
    if eps is None:
        eps = torch.finfo(h.dtype).eps ** (1 / 3)
    vn = torch.linalg.vector_norm(v).clamp_min(1e-30)
    step = eps * max(float(torch.linalg.vector_norm(h.detach())), 1.0) / vn.detach()
    return (f(h + step * v) - f(h - step * v)) / (2 * step)


JAC_PRODUCTS = {"jvp": jvp, "vjp": jvp_by_vjp, "fd": jvp_fd}


def dense_jacobian(f: Fn, h: torch.Tensor) -> torch.Tensor:
    """The full Jacobian as an [n, n] matrix, n = h.numel() (small states only)."""
    n = h.numel()
    with sdpa_kernel(SDPBackend.MATH):  # vmap has no batching rule for the fused kernels' backward
        return torch.func.jacrev(lambda x: f(x.view_as(h)).reshape(-1))(h.reshape(-1)).reshape(n, n).detach()


# Upper bounds, so that a typo (probes=10**20) fails at once instead of running for ever: power
# iteration converges geometrically, and a Hutchinson estimate's error falls as 1/sqrt(probes)
MAX_POWER_ITERS = 10_000
MAX_PROBES = 10_000


def _check_count(name: str, value, maximum: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        rng = ">= 1" if maximum is None else f"in 1..{maximum}{why}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")


def hutchinson_probe(h: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False) -> torch.Tensor:
    """A Rademacher vector (entries ±1) shaped and typed like h. shared: one draw of h[0]'s shape,
    repeated along h's leading axis (the same probe for every layer of a stack [N, ...])."""
    z = 2 * torch.randint(0, 2, h.shape[1:] if shared else h.shape, generator=generator).to(h) - 1
    return z.expand_as(h) if shared else z


def hutchinson_diag(f: Fn, h: torch.Tensor, probes: int = 8, generator: torch.Generator | None = None,
                    shared: bool = False):
    """diag(J) ≈ mean_z z ⊙ (J z) over Rademacher probes z (unbiased; exact for a diagonal J);
    shared: as in `hutchinson_probe`."""
    _check_count("probes", probes, MAX_PROBES, " (Rademacher probes)")
    acc = torch.zeros_like(h)
    for _ in range(probes):
        z = hutchinson_probe(h, generator, shared)
        acc += z * jvp(f, h, z)
    return acc / probes


def sigma_max(f: Fn, h: torch.Tensor, iters: int = 30, generator: torch.Generator | None = None) -> float:
    """Largest singular value of J by power iteration on J^T J (one JVP and one VJP per step)."""
    _check_count("iters", iters, MAX_POWER_ITERS, " (power iterations)")
    v = torch.randn(h.shape, generator=generator).to(h)
    v = v / torch.linalg.vector_norm(v)
    with sdpa_kernel(SDPBackend.MATH):
        _, pull = torch.func.vjp(f, h)
    s = 0.0
    for _ in range(iters):
        with sdpa_kernel(SDPBackend.MATH):
            w = pull(jvp(f, h, v))[0]
        s = float(torch.linalg.vector_norm(w.detach())) ** 0.5
        v = w / torch.linalg.vector_norm(w).clamp_min(1e-30)
    return s


def surrogate_distance(f: Fn, h: torch.Tensor, A: Fn, probes: int = 8,
                       generator: torch.Generator | None = None) -> float:
    """Relative Frobenius distance ‖J − A‖_F / ‖J‖_F, estimated as E‖(J−A)z‖² / E‖Jz‖² with
    Rademacher z (E‖Mz‖² = ‖M‖_F² for any M)."""
    num = den = 0.0
    for _ in range(probes):
        z = hutchinson_probe(h, generator)
        jz = jvp(f, h, z)
        num += float(torch.linalg.vector_norm((jz - A(z)).detach()) ** 2)
        den += float(torch.linalg.vector_norm(jz.detach()) ** 2)
    return (num / max(den, 1e-300)) ** 0.5
