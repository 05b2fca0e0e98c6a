"""nanochat's automatic batch size, learning-rate and weight-decay scaling, as the paper's runs used it
(nanochat-snlp `scripts/base_train.py`, its section "Scaling laws and muP extrapolations"; the recipe
"paper" of `python -m snlp_lab.train`).

With P the model's scaling parameters (`scaling_params`) and r the target tokens:params ratio
(`--target-param-data-ratio`, 12 in nanochat-snlp):

    D     = int(r·P)                                   the compute-optimal horizon in tokens
    D_ref = r·P_ref                                    the same for the depth-12 reference (`reference_config`)
    B     = 2^round(log2(B_ref·(D / D_ref)^0.383))     the batch in tokens, B_ref = 2^19
    lr    = lr_ref·√(B / B_ref)                        every learning rate (the AdamW ones and Muon's)
    λ     = λ_ref·√(B / B_ref)·D_ref / D               Muon's weight decay, λ_ref = 0.28

B_ref = 2^19 is the batch nanochat measured as optimal at depth 12; the exponent 0.383 is from
"Power Lines" (arXiv 2505.13738); λ keeps B/(η·λ·D) constant (arXiv 2405.13698). B is computed only
when no batch is given; the learning rates and λ scale with a given batch as well. D depends on the
model alone: in base_train `--num-iterations` sets the number of steps but leaves D, B and λ as they are.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..models.build import build_model
from ..models.config import GPTConfig

B_REF = 2 ** 19  # tokens; nanochat: the optimal batch of its depth-12 reference model
BATCH_EXPONENT = 0.383  # B_opt ∝ D^0.383 (Power Lines)
REFERENCE_DEPTH = 12  # nanochat's muP-style reference model, d12
TARGET_PARAM_DATA_RATIO = 12.0  # nanochat-snlp base_train --target-param-data-ratio default
WEIGHT_DECAY = 0.28  # nanochat-snlp base_train --weight-decay default (λ_ref)


def scaling_params(cfg: GPTConfig) -> int:
    """P: the parameters of the blocks and of the lm head (nanochat's `num_scaling_params()`
    "transformer_matrices" + "lm_head"). nanochat keeps mHC mixing in its blocks, we keep it in `mix`;
    it is counted. Counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(cfg)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    mix = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mix."))
    return blocks + mix + model.lm_head.weight.numel()


def reference_config(cfg: GPTConfig) -> GPTConfig:
    """nanochat's reference model for cfg: depth 12 at the same aspect ratio and head dim, so
    n_embd = ceil(12·a / head_dim)·head_dim and n_head = n_kv_head = n_embd / head_dim (base_train's
    `build_model_meta(12)`). The aspect ratio a is n_embd / n_layer: nanochat's --aspect-ratio for the
    paper's presets (20 for 0.5b, 64 for 3b)."""
    hd = cfg.head_dim
    n_embd = math.ceil(REFERENCE_DEPTH * cfg.n_embd / cfg.n_layer / hd) * hd
    return dataclasses.replace(cfg, n_layer=REFERENCE_DEPTH, n_embd=n_embd, n_head=n_embd // hd,
                               n_kv_head=n_embd // hd)


@dataclass(frozen=True)
class Scaling:
    """The numbers of the module docstring for one model."""
    tokens: int  # D, the horizon in tokens
    reference_tokens: float  # D_ref
    batch_tokens: int  # B: the given batch, else the computed one
    lr_scale: float  # √(B / B_ref)
    weight_decay: float  # λ


def nanochat_scaling(cfg: GPTConfig, ratio: float = TARGET_PARAM_DATA_RATIO, batch_tokens: int | None = None,
                     weight_decay: float = WEIGHT_DECAY) -> Scaling:
    """D, D_ref, B, √(B/B_ref) and λ of the module docstring for a model config; batch_tokens: the given
    batch (None: computed). Raises ValueError for a ratio or batch <= 0."""
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"target_param_data_ratio must be a finite number > 0, got {ratio}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"the batch must hold at least one token, got {batch_tokens}")
    tokens = int(ratio * scaling_params(cfg))
    ref = ratio * scaling_params(reference_config(cfg))
    if batch_tokens is None:
        batch_tokens = 2 ** round(math.log2(B_REF * (tokens / ref) ** BATCH_EXPONENT))
    return Scaling(tokens, ref, batch_tokens, (batch_tokens / B_REF) ** 0.5,
                   weight_decay * (batch_tokens / B_REF) ** 0.5 * ref / tokens)
