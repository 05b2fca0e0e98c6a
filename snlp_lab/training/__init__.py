"""Training: cross-entropy with the SNLP-aware regularizer, or on the SNLP forward; one process or torchrun.

    python -m snlp_lab.train --model cpu-plain --steps 600 --reg idn --lam 0.1 --n-par-set 4,8,12
    torchrun --nproc_per_node 2 -m snlp_lab.train --model cpu-plain --steps 600    # DDP, same numbers
    python -m snlp_lab.train --objective snlp-forward --iters 1 --n-par 12 --init-from RUN_DIR
    python -m snlp_lab.train --init-from-hf ~/models/Qwen2.5-0.5B --data DIR --reg idn --n-par-set 6,12,18

    result = train(TrainConfig(model="cpu-plain", steps=600, reg="idn"))      # in a notebook
    model = trained_model("cpu-plain", steps=600, reg="idn", lam=0.1)         # cached in its run folder

The parts, each importing only those before it:

    scaling, regularizer      nanochat's batch/lr/weight-decay scaling; the regularizer R (docs/design.md §1)
    config                    TrainConfig (every option, its flag and its part in the run's identity), resolve
    schedules                 lr factor, w(t), recipe "paper"'s Muon momentum and weight decay per step
    optim                     NanochatMuon, build_optimizers (Muon for the blocks' matrices, AdamW for the rest)
    loss                      SNLPLoss: CE + w(t)·λ·R, or the CE of the SNLP forward
    runs                      the config hash, run folders, the resume comparison, a cached run's config, its owner
    loop                      train (DDP, restore, evaluation, checkpoints, metrics.jsonl), trained_model

Loss (docs/design.md §1): objective "ce" is L = CE + w(t)·λ·R with R from `regularizer` (one structured
Newton iteration of surrogate `reg` from h0 on the last N layers, N in `n_par_set`, compared with the
sequential forward's states) and w(t) rising linearly from 0 to 1 over the first `warmup_frac` of the
steps. Objective "snlp-forward" is the CE of the K-iteration SNLP output (`snlp_lab.solvers.solver.solve`,
differentiable), from scratch or fine-tuning a checkpoint (`init_from`).

`init_from_hf` fine-tunes a transformers model from a local folder (`snlp_lab.models.hf.load_hf`) instead,
on the same loop, optimizers and checkpoints: --data is encoded with the model's own tokenizer, learning
rates default to fine-tuning values (`FINETUNE_LRS`), and the checkpoint's weights are a Hugging Face
folder (`hf_<step>/`, save_pretrained) that `load_hf(run_dir)` loads.

Optimizers as nanochat (`optim.build_optimizers`): Muon for the blocks' matrices (the nn.Linear weights
under `blocks`), AdamW for embeddings, lm head and everything else (resid/x0 lambdas, mHC mixing); AdamW
learning rates scale with (n_embd/768)^-0.5. Learning rate: linear warm-up, constant, linear warm-down
to `lr_final_frac`. Recipe "snlp" (the default) runs `torch.optim.Muon` without weight decay. Recipe
"paper" is nanochat-snlp's, the recipe of the paper's runs: nanochat's own Muon (`optim.NanochatMuon`:
Polar Express, second-moment normalisation, cautious weight decay decayed to 0 by a cosine) with its
momentum schedule, the AdamW groups' settings `optim.PAPER_ADAMW`, and the batch, learning rates and
weight decay that are not given computed by nanochat's scaling rules (`scaling`). docs/training.md maps each of
the paper's training flags to ours.
"""
from .config import (BATCH_SIZE, FINETUNE_LRS, LATER_DEFAULTS, NANOCHAT_LRS, OBJECTIVES, PAPER_LRS, RECIPES,
                     RUN_FIELDS, TrainConfig, model_config, parse_overrides, resolve)
from .loop import METRICS, TrainResult, train, trained_model
from .loss import SNLPLoss
from .optim import NanochatMuon, build_optimizers
from .runs import cached_config, comparable, config_hash, lock_owner, own_run, run_dir, run_lock, trained_run_dir
from .schedules import lr_multiplier, paper_muon_momentum, paper_weight_decay, reg_weight

__all__ = ["TrainConfig", "TrainResult", "train", "trained_model", "trained_run_dir", "resolve", "model_config",
           "parse_overrides", "config_hash", "run_dir", "cached_config", "comparable", "run_lock", "own_run",
           "lock_owner", "SNLPLoss",
           "NanochatMuon", "build_optimizers", "lr_multiplier", "paper_muon_momentum", "paper_weight_decay",
           "reg_weight", "BATCH_SIZE", "FINETUNE_LRS", "NANOCHAT_LRS", "PAPER_LRS", "OBJECTIVES", "RECIPES",
           "RUN_FIELDS", "LATER_DEFAULTS", "METRICS"]
