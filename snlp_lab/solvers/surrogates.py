"""The surrogates A_l for the layer Jacobians, and their registry (docs/design.md §1).

A surrogate solves the linear recurrence d_l = r_l + A_l d_{l-1} along depth that one structured Newton
iteration needs (`snlp_lab.solvers.solver.iterate`): a prefix sum for IDN, an elementwise scan for DiagN,
a scan of n×n stream-mixing matrices for HCN (mHC models), a JVP scan for exact Newton.

The built-in surrogates are registered here, beside the registry, so that every method name is known as
soon as the solvers are imported; `register_surrogate` adds a user's own.
"""
from __future__ import annotations

import math

import torch

from ..models.mhc import stream_mix
from .jacobian import JAC_PRODUCTS, MAX_PROBES, hutchinson_diag, hutchinson_probe

SURROGATES: dict[str, type] = {}  # name -> Surrogate class


def register_surrogate(name: str):
    """Class decorator: make a surrogate available as `solve(..., method=name)` and in configurations."""
    def deco(cls):
        SURROGATES[name] = cls
        cls.name = name
        return cls
    return deco


def methods() -> tuple[str, ...]:
    """"sequential" and every registered surrogate."""
    return ("sequential",) + tuple(SURROGATES)


class NonFiniteError(FloatingPointError):
    """A solve produced inf or NaN; raised rather than returning a silently broken trace."""


def non_finite(model, what: str, states: torch.Tensor | None = None) -> NonFiniteError:
    """The error for `what` (a solve, a decoding step) whose logits or states hold inf or NaN, saying
    where they come from: the model's own weights (a damaged or diverged checkpoint, naming the
    tensors), the states, or only the output head."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return NonFiniteError(f"{what} gives non-finite logits because the model's weights hold inf or NaN "
                              f"({', '.join(bad[:3])}{more}): the checkpoint is damaged or comes from a "
                              f"diverged run")
    if states is not None and not bool(torch.isfinite(states).all()):
        return NonFiniteError(f"{what} produced non-finite states (the iteration diverged, or the input "
                              f"overflowed); pass check_finite=False to inspect them")
    return NonFiniteError(f"{what} produced finite states but non-finite logits (the output head overflowed)")


# ------------------------------------------------------------------------------------------ surrogates
class Surrogate:
    """A_l for the parallel layers start..stop-1. Subclasses define `matvec` or override `scan`.

    `update(X, F)` is called once per iteration with the current inputs X[j] = h_{start+j-1}^k and the
    layer outputs F[j] = Φ_{start+j}(X[j]), so iterate-dependent surrogates can re-estimate themselves.
    """

    def __init__(self, model, start: int, stop: int, ctx, **opts):
        self.model, self.start, self.stop, self.ctx = model, start, stop, ctx

    def update(self, X: torch.Tensor, F: torch.Tensor) -> None:
        pass

    def matvec(self, j: int, d: torch.Tensor) -> torch.Tensor:
        """A_{start+j} d."""
        raise NotImplementedError

    def scan(self, r: torch.Tensor) -> torch.Tensor:
        """Solve d_j = r_j + A_{start+j} d_{j-1}, d_{-1} = 0, along the leading axis of r."""
        d = [r[0]]
        for j in range(1, r.shape[0]):
            d.append(r[j] + self.matvec(j, d[-1]))
        return torch.stack(d)

    # A_j as a tensor that can cross devices: what a layer-sliced solve (`solvers.distributed`) sends
    # so that later slices can carry an earlier slice's correction through it. A surrogate without
    # such a form (exact Newton: a Jacobian product) leaves `operator` undefined.
    def operator(self, j: int) -> torch.Tensor:
        """A_{start+j} in this surrogate's own form: a scalar, a diagonal [..., D] or stream matrices [..., n, n]."""
        raise NotImplementedError(f"{type(self).__name__} has no operator form")

    def apply(self, op: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """op d, for an operator of `operator`'s form (or a product of them, `compose`)."""
        return op * d

    def compose(self, later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        """The operator of `earlier`, then `later`."""
        return later * earlier


@register_surrogate("jacobi")
class Jacobi(Surrogate):
    """A = 0: plain Picard/Jacobi iteration (a shifted forward; unstable on trained models)."""

    def scan(self, r):
        return r

    def operator(self, j):
        return torch.zeros((), dtype=torch.float64)


@register_surrogate("idn")
class IdentityNewton(Surrogate):
    """A = (1 - κ) I. With κ = 0 the scan is a prefix sum over depth."""

    def __init__(self, model, start, stop, ctx, kappa: float = 0.0, **opts):
        super().__init__(model, start, stop, ctx)
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"kappa (IDN damping) must lie in [0, 1], got {kappa}")
        self.a = 1.0 - kappa

    def matvec(self, j, d):
        return self.a * d

    def scan(self, r):
        return torch.cumsum(r, dim=0) if self.a == 1.0 else super().scan(r)

    def operator(self, j):
        return torch.tensor(self.a, dtype=torch.float64)


@register_surrogate("scaled-idn")
class ScaledIdentityNewton(Surrogate):
    """A_l = λ_l I, the layer's residual lambda (nanochat resid_lambdas): exact when the branch is flat."""

    def __init__(self, model, start, stop, ctx, **opts):
        super().__init__(model, start, stop, ctx)
        self.lam = [model.resid_scale(l) for l in range(start, stop)]

    def matvec(self, j, d):
        return self.lam[j] * d

    def operator(self, j):
        return self.lam[j].detach()


@register_surrogate("diagn")
class DiagonalNewton(Surrogate):
    """A_l = diag(J_l) at the current iterate, Hutchinson estimate mean_z z ⊙ (J_l z), Rademacher z.

    All N layers' JVPs are one batched forward-mode call of `layers`. With fd_eps > 0 the products are
    the paper's finite differences instead (nanochat-snlp's `--diag-newton-jvp=fd`, used by its DiagN
    regularizer with ε = 0.01): z ⊙ (Φ(h + εz) − Φ(h)) / ε in at least float32, clamped to ±FD_CLAMP, without
    gradient (one batched forward of `layers`). Each probe z is drawn per layer, or with
    shared_probe=True once for all N layers (the paper's DiagN regularizer draws one z of h_S's shape).
    """
    FD_CLAMP = 2.0

    def __init__(self, model, start, stop, ctx, probes: int = 1, generator=None, fd_eps: float = 0.0,
                 shared_probe: bool = False, **opts):
        super().__init__(model, start, stop, ctx)
        if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= MAX_PROBES:
            raise ValueError(f"probes must be an integer in 1..{MAX_PROBES} (Rademacher probes per unit and "
                             f"iteration), got {probes!r}")
        if not (math.isfinite(fd_eps) and fd_eps >= 0):
            raise ValueError(f"fd_eps must be a finite number >= 0 (0: exact JVPs), got {fd_eps}")
        self.probes, self.generator, self.fd_eps, self.shared = probes, generator, fd_eps, shared_probe

    def update(self, X, F):
        f = lambda H: self.model.layers(self.start, self.stop, H, self.ctx)
        if self.fd_eps == 0:
            self.diag = hutchinson_diag(f, X, self.probes, self.generator, self.shared)
            return
        dtype = torch.promote_types(X.dtype, torch.float32)  # bf16 differences in fp32, as the paper
        with torch.no_grad():
            acc = torch.zeros_like(X, dtype=dtype)
            for _ in range(self.probes):
                z = hutchinson_probe(X, self.generator, self.shared)
                acc += z * (f(X + self.fd_eps * z).to(dtype) - F.to(dtype)) / self.fd_eps
            self.diag = (acc / self.probes).clamp(-self.FD_CLAMP, self.FD_CLAMP).to(X.dtype)

    def matvec(self, j, d):
        return self.diag[j] * d

    def operator(self, j):
        return self.diag[j]


@register_surrogate("newton")
class ExactNewton(Surrogate):
    """A_l = J_l exactly (DEER): each scan step is a Jacobian-vector product at the current iterate.

    `jac` picks how J v is formed: "jvp" (forward mode), "vjp" (reverse mode, J v as the VJP of the
    linear map u -> J^T u) or "fd" (central finite differences). Costs more than the sequential forward.
    """

    def __init__(self, model, start, stop, ctx, jac: str = "jvp", **opts):
        super().__init__(model, start, stop, ctx)
        if jac not in JAC_PRODUCTS:
            raise ValueError(f"unknown jac {jac!r}; valid: {', '.join(JAC_PRODUCTS)}")
        self.product = JAC_PRODUCTS[jac]

    def update(self, X, F):
        self.X = X

    def matvec(self, j, d):
        f = lambda h: self.model.layer(self.start + j, h, self.ctx)
        return self.product(f, self.X[j], d)


@register_surrogate("hcn")
class HCNewton(Surrogate):
    """A_l = H^res_mlp,l · H^res_attn,l ⊗ I_D (mHC models): the correction is a scan of n×n matrices over
    depth. Exact Newton when every branch is flat (e.g. zero output projections) and mixing is static.
    Dynamic mixing: the matrices at the current iterate, re-evaluated every iteration."""

    def __init__(self, model, start, stop, ctx, **opts):
        super().__init__(model, start, stop, ctx)
        if getattr(model, "res_matrices", None) is None:
            raise ValueError("method 'hcn' (HC Newton) needs an mHC model with residual streams "
                             "(n_streams > 1, e.g. preset 'cpu-mhc'); use 'idn' on plain models")
        self.dynamic = model.config.mhc_dynamic
        self.M = None if self.dynamic else model.res_matrices(start, stop)

    def update(self, X, F):
        if self.dynamic:
            self.M = self.model.res_matrices(self.start, self.stop, X, self.ctx)

    def matvec(self, j, d):
        return stream_mix(self.M[j], d)

    def operator(self, j):
        return self.M[j]

    def apply(self, op, d):
        return stream_mix(op, d)

    def compose(self, later, earlier):
        return stream_mix(later, earlier)
