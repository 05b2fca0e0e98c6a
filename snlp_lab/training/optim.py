"""A run's optimizers (`build_optimizers`, nanochat's split: Muon for the blocks' matrices, AdamW for the
rest) and nanochat's Muon, the variant the paper trained its blocks' matrices with (`--recipe paper` of
`python -m snlp_lab.train`).

Source: nanochat-snlp's `nanochat/optim.py` (`muon_step_fused`, `MuonAdamW._step_muon`), the optimizer
of the paper's `scripts/base_train.py` runs. For a matrix parameter W [m, n] with gradient G, one step:

1. Nesterov momentum, β = `momentum` (0.95, scheduled by the training script):
       M ← β·M + (1 − β)·G,     U = (1 − β)·G + β·M
2. Polar Express orthogonalisation (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932) instead of
   Newton–Schulz: X = U / (1.01·‖U‖_F + 1e-6), then five odd quintic steps X ← a·X + b·X³ + c·X⁵
   (X³ = X Xᵀ X, on the smaller Gram matrix), with the coefficients `POLAR_EXPRESS_COEFFS`. The result
   is O ≈ P Qᵀ for U = P Σ Qᵀ: each singular value σ/(1.01‖U‖_F) in [1e-3, 1] is mapped into
   [0.8589, 1.1411].
3. Second-moment normalisation (NorMuon, arXiv 2510.05491), β₂ = `beta2` (0.9): per row of O when
   m ≥ n, else per column, v = mean(O², over the other axis); V ← β₂·V + (1 − β₂)·v (V starts at 0,
   no bias correction); O ← O / √max(V, 1e-10), rescaled so that ‖O‖_F is unchanged.
4. Cautious weight decay with the shape-scaled step η = lr·√max(1, m/n):
       W ← W − η·O − η·λ·W ⊙ [O ⊙ W ≥ 0]
   (λ = `weight_decay`; the decay acts only where the update and the weight have the same sign).

nanochat orthogonalises in bfloat16 on a GPU and in float32 elsewhere; `ortho_dtype=None` does the
same (bfloat16 for CUDA parameters, the parameter's dtype otherwise). Steps 3 and 4 run in the
parameter's dtype here (nanochat-snlp keeps bfloat16 there too; later nanochat casts back first).
nanochat stacks the matrices of one shape and updates them at once; so does `step`, which gives the
same numbers as one matrix at a time (every operation above acts on each matrix alone).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations only: NanochatMuon stays importable on its own
    from .config import TrainConfig

# nanochat/optim.py `polar_express_coeffs`: (a, b, c) of each step, computed for 5 iterations with
# safety factor 2e-2 and cushion 2 (arXiv 2505.16932)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORM_MARGIN = 1.01  # nanochat: X / (‖X‖_F·1.01 + 1e-6), so every singular value starts at <= 1/1.01
NORM_EPS = 1e-6
V_FLOOR = 1e-10  # nanochat: clamp_min(1e-10) of the second moment and of the rescaled norm


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The orthogonal polar factor of G [..., m, n], approximately: P Qᵀ for G = P Σ Qᵀ, each singular
    value mapped into [0.8589, 1.1411] (module docstring, step 2). Computed in `dtype` (default G's) and
    returned in it. Raises ValueError unless 1 <= steps <= 5 (nanochat's coefficients are for five)."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {steps}")
    X = G.to(dtype or G.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NORM_MARGIN + NORM_EPS)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X.mT @ X if tall else X @ X.mT  # the smaller Gram matrix
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def normalize_second_moment(O: torch.Tensor, v_buffer: torch.Tensor, beta2: float) -> torch.Tensor:
    """Step 3 of the module docstring on O [..., m, n]: updates `v_buffer` ([..., m, 1] when m >= n,
    else [..., 1, n]) in place and returns O per row (column) divided by √V, with ‖O‖_F kept."""
    axis = -1 if O.size(-2) >= O.size(-1) else -2  # reduce over columns (per row) or over rows
    Of = O.to(torch.promote_types(O.dtype, torch.float32))  # squares of bfloat16 in float32 (nanochat)
    v = Of.square().mean(dim=axis, keepdim=True)
    v_buffer.lerp_(v.to(v_buffer.dtype), 1 - beta2)
    step = v_buffer.clamp_min(V_FLOOR).rsqrt().to(Of.dtype)
    norm = Of.norm(dim=(-2, -1), keepdim=True)
    new_norm = (Of * step).norm(dim=(-2, -1), keepdim=True)
    return O * (step * norm / new_norm.clamp_min(V_FLOOR)).to(O.dtype)


class NanochatMuon(torch.optim.Optimizer):
    """nanochat's Muon for 2-D parameters (module docstring): Nesterov momentum, Polar Express,
    second-moment normalisation and cautious weight decay, with the step lr·√max(1, rows/cols).

    params: matrices [m, n] (nn.Linear weights, out × in); lr: the step before the shape factor;
    momentum: β of the Nesterov momentum; beta2: of the second moment; weight_decay: λ of the
    cautious decay (decoupled: the decay per step is lr·√max(1, m/n)·λ); ns_steps: Polar Express steps
    (nanochat's name); ortho_dtype: the dtype of the orthogonalisation (None: bfloat16 for CUDA
    parameters, else theirs). Defaults are nanochat-snlp's `setup_optimizer` (its weight decay is set per step by
    the training script). Raises ValueError for a parameter that is not 2-D or a bad value.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, beta2: float = 0.9,
                 weight_decay: float = 0.0, ns_steps: int = 5, ortho_dtype: torch.dtype | None = None):
        for name, v in (("lr", lr), ("weight_decay", weight_decay)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in (("momentum", momentum), ("beta2", beta2)):
            if not 0 <= v < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {v}")
        if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"ns_steps must be in 1..{len(POLAR_EXPRESS_COEFFS)}, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ortho_dtype = ortho_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"NanochatMuon updates matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[torch.Size, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for ps in by_shape.values():
                self._step_stacked(group, ps)
        return loss

    def _step_stacked(self, group: dict, ps: list[torch.Tensor]) -> None:
        """One step for matrices of one shape, stacked [K, m, n] (nanochat's `muon_step_fused`)."""
        m, n = ps[0].shape
        for p in ps:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["second_moment"] = p.new_zeros((m, 1) if m >= n else (1, n))
        W = torch.stack(ps)
        M = torch.stack([self.state[p]["momentum_buffer"] for p in ps])
        V = torch.stack([self.state[p]["second_moment"] for p in ps])
        G = torch.stack([p.grad for p in ps]).to(W.dtype)
        beta = group["momentum"]
        M.lerp_(G, 1 - beta)
        U = G.lerp_(M, beta)  # Nesterov: (1 − β)·G + β·M
        dtype = self.ortho_dtype or (torch.bfloat16 if W.is_cuda else W.dtype)
        O = polar_express(U, group["ns_steps"], dtype).to(W.dtype)
        O = normalize_second_moment(O, V, group["beta2"])
        lr = group["lr"] * max(1.0, m / n) ** 0.5
        mask = (O * W) >= 0
        W.sub_(lr * O + lr * group["weight_decay"] * W * mask)
        torch._foreach_copy_(ps, list(W.unbind(0)))
        torch._foreach_copy_([self.state[p]["momentum_buffer"] for p in ps], list(M.unbind(0)))
        torch._foreach_copy_([self.state[p]["second_moment"] for p in ps], list(V.unbind(0)))


# ------------------------------------------------------------------------------------------ a run's optimizers
ADAMW_BETAS, ADAMW_EPS = (0.8, 0.95), 1e-10  # nanochat
SMEAR_LR = 0.2  # nanochat: smear gate, smear and backout lambdas (not scaled with the width)
SMEAR_PARAMS = ("smear_gate.weight", "smear_lambda", "backout_lambda")
MUON_MOMENTUM = 0.95  # recipe "paper" schedules it per step (`schedules.paper_muon_momentum`)
MUON_BETA2 = 0.9  # recipe "paper": NanochatMuon's second moment (nanochat-snlp setup_optimizer)
# recipe "paper": nanochat-snlp's setup_optimizer (nanochat/gpt.py), (betas, weight decay) per AdamW
# group; there value embeddings get half the embedding lr and mHC mixing a fixed lr
PAPER_ADAMW = {"embed": ((0.8, 0.995), 0.001), "value_embeds": ((0.8, 0.995), 0.01), "head": ((0.8, 0.96), 0.01),
               "scalar": ((0.8, 0.95), 0.0), "x0": ((0.96, 0.95), 0.0), "mhc": ((0.9, 0.999), 0.0),
               "resid": ((0.8, 0.95), 0.05), "smear": ((0.8, 0.95), 0.0)}
PAPER_MHC_LR = 0.01


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """[Muon for the blocks' nn.Linear weights, AdamW for the rest], nanochat's split (nanochat's
    `setup_optimizer` in nanochat/gpt.py); cfg is resolved (`config.resolve`: every lr set).

    AdamW groups (named by their "name"): embed, value_embeds, head, scalar, x0, resid, smear, mhc; the
    embedding and head learning rates scale with (n_embd/768)^-0.5, resid lambdas get scalar_lr/100 and
    the smear parameters SMEAR_LR. Recipe "snlp": torch.optim.Muon without weight decay; AdamW keeps value
    embeddings with the token embedding and x0 lambdas and mHC mixing with the scalars (one betas, no weight
    decay). Recipe "paper": NanochatMuon with cfg.weight_decay; AdamW gives each its own group, set as
    PAPER_ADAMW."""
    matrices = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    paper = cfg.recipe == "paper"
    muon, groups = [], {k: [] for k in PAPER_ADAMW}
    for name, p in model.named_parameters():
        if id(p) in matrices:
            muon.append(p)
        elif id(p) in embeddings:
            groups["value_embeds" if paper and name.startswith("value_embeds.") else "embed"].append(p)
        elif p is model.lm_head.weight:
            groups["head"].append(p)
        elif name == "resid_lambdas":
            groups["resid"].append(p)
        elif name in SMEAR_PARAMS:
            groups["smear"].append(p)
        elif paper and name == "x0_lambdas":
            groups["x0"].append(p)
        elif paper and name.startswith("mix."):
            groups["mhc"].append(p)
        else:  # (recipe "snlp": x0 lambdas, mHC mixing) anything a model variant adds
            groups["scalar"].append(p)
    scale = (model.config.n_embd / 768) ** -0.5
    lrs = {"embed": cfg.embedding_lr * scale, "value_embeds": cfg.embedding_lr * scale * 0.5,
           "head": cfg.unembedding_lr * scale, "scalar": cfg.scalar_lr, "x0": cfg.scalar_lr,
           "resid": cfg.scalar_lr * 0.01, "smear": SMEAR_LR, "mhc": PAPER_MHC_LR}
    adam_groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
    if paper:
        for g in adam_groups:
            g["betas"], g["weight_decay"] = PAPER_ADAMW[g["name"]]
        matrix_opt = NanochatMuon(muon, lr=cfg.matrix_lr, momentum=MUON_MOMENTUM, beta2=MUON_BETA2,
                                  weight_decay=cfg.weight_decay)
    else:
        matrix_opt = torch.optim.Muon(muon, lr=cfg.matrix_lr, momentum=MUON_MOMENTUM, weight_decay=0.0,
                                      adjust_lr_fn="original")
    return [matrix_opt, torch.optim.AdamW(adam_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)]
