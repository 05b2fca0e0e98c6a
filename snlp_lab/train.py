"""`python -m snlp_lab.train`: train a model, one process or under torchrun (the library:
`snlp_lab.training`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .core.cli import ArgumentParser, run_command
from .solvers.grammar import INITS
from .solvers.surrogates import SURROGATES
from .training.regularizer import POSITIONS
from .training.train import (BATCH_SIZE, FINETUNE_LRS, NANOCHAT_LRS, OBJECTIVES, PAPER_LRS, RECIPES, TrainConfig,
                             train)
from .training import train as _lib


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,24, got {text!r}") from None


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except None: those options' help says what they default to."""

    def _get_help_string(self, action):
        return action.help or "" if action.default is None else super()._get_help_string(action)


def build_parser() -> ArgumentParser:
    """The command line: one option per TrainConfig field (--n-par-set for n_par_set, ...)."""
    D = TrainConfig()
    p = ArgumentParser(prog="python -m snlp_lab.train", description=_lib.__doc__.split("\n\n")[0],
                       formatter_class=_DefaultsHelp)
    a = p.add_argument
    a("--model", default=D.model, help="model preset (snlp_lab.config.PRESETS); not used with --init-from-hf")
    a("--override", action="append", default=[], metavar="KEY=VALUE",
      help="model config override, repeatable (e.g. --override n_layer=6)")
    a("--data", default=D.data, help="'stdlib', a folder of text files, or parquet shards")
    a("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    a("--steps", type=int, default=D.steps, help="optimizer steps")
    a("--batch-size", type=int, default=None,
      help=f"global batch in sequences, split over the processes (default {BATCH_SIZE}; --recipe paper: nanochat's "
           f"batch from the model's size, 2^round(log2(2^19·(D/D_ref)^0.383)) tokens / seq len, snlp_lab.scaling)")
    a("--seq-len", type=int, default=None, help="default: the model's sequence_len")
    a("--device-batch-size", type=int, default=None,
      help="sequences per forward/backward on each process; the gradient is accumulated over the batch "
           "(default: the whole batch at once)")
    a("--seed", type=int, default=D.seed, help="initial weights, data order and probes")
    lr = lambda k: (f"default {NANOCHAT_LRS[k]}, with --init-from-hf {FINETUNE_LRS[k]}, "
                    f"with --recipe paper {PAPER_LRS[k]}·√(batch tokens/2^19)")
    a("--matrix-lr", type=float, default=None, help=f"Muon, blocks' matrices ({lr('matrix_lr')})")
    a("--embedding-lr", type=float, default=None, help=f"AdamW, times (n_embd/768)^-0.5 ({lr('embedding_lr')})")
    a("--unembedding-lr", type=float, default=None, help=f"AdamW, times (n_embd/768)^-0.5 ({lr('unembedding_lr')})")
    a("--scalar-lr", type=float, default=None, help=f"AdamW, lambdas, norms, biases, mHC mixing ({lr('scalar_lr')})")
    a("--lr-warmup-frac", type=float, default=D.lr_warmup_frac, help="learning-rate warm-up, a fraction of the steps")
    a("--lr-warmdown-frac", type=float, default=D.lr_warmdown_frac, help="learning-rate warm-down, a fraction of the steps")
    a("--lr-final-frac", type=float, default=D.lr_final_frac, help="lr at the end of the warm-down, a fraction")
    a("--recipe", default=D.recipe, choices=RECIPES,
      help="snlp: torch.optim.Muon, AdamW with one betas and no weight decay; paper: nanochat-snlp's recipe "
           "(nanochat's Muon with cautious weight decay, its per-group AdamW settings, momentum and weight decay "
           "schedules, and the batch, lrs and weight decay not given scaled as its base_train does)")
    a("--weight-decay", type=float, default=None,
      help="--recipe paper: Muon's cautious weight decay at step 0, decayed to 0 by a cosine (default "
           "0.28·√(batch tokens/2^19)·D_ref/D, D = ratio × the model's block and head parameters, D_ref the same "
           "for its depth-12 reference)")
    a("--target-param-data-ratio", type=float, default=D.target_param_data_ratio,
      help="--recipe paper: tokens per scaling parameter, D above")
    a("--reg", default=D.reg, help=f"regularizer surrogate: none, {', '.join(SURROGATES)}")
    a("--lam", type=float, default=D.lam, help="regularizer weight λ")
    a("--n-par-set", type=_ints, default=None, help="n_par values 𝒩, e.g. 8,16,24 (default: depth/4, /2, 3/4)")
    a("--stride", type=int, default=D.stride, help="compare every s-th parallel layer plus the last; 0/1: all")
    a("--warmup-frac", type=float, default=D.warmup_frac, help="regularizer weight warm-up fraction")
    a("--detach-target", action="store_true", help="no gradient through the sequential target states")
    a("--reg-positions", default=D.reg_positions, choices=POSITIONS,
      help="compared layers: strided (every s-th plus the last) or paper (its idn_stride rule: 0 = the last only)")
    a("--reg-per-stream", action="store_true", help="norms per mHC stream (the paper's HCN term)")
    a("--reg-fd-eps", type=float, default=D.reg_fd_eps,
      help="--reg diagn: 0 = JVP products; > 0 = finite differences with this step, clamped to ±2 (paper: 0.01)")
    a("--reg-shared-probe", action="store_true",
      help="--reg diagn: one Rademacher probe for all N layers (the paper's), not one per layer")
    a("--objective", default=D.objective, choices=OBJECTIVES)
    a("--method", default=D.method, help="surrogate of the snlp-forward objective")
    a("--iters", type=int, default=D.iters, help="K, iterations of the snlp-forward objective")
    a("--n-par", type=int, default=None, help="parallel layers of the snlp-forward objective (default: all)")
    a("--chunks", default=None, metavar="CxFM",
      help="fused chunks of the snlp-forward objective, e.g. 4xF3 (C chunks of M layers; n_par defaults to C·M)")
    a("--init", default=D.init, help=f"initial guess of the snlp-forward objective: {', '.join(INITS)}")
    a("--init-from", default=None, metavar="CKPT", help="start from this checkpoint's weights (fine-tuning)")
    a("--init-from-hf", default=None, metavar="PATH",
      help="fine-tune the transformers causal LM in this local folder (its tokenizer encodes --data)")
    a("--out", default=None, help="run folder (default: cache_dir()/runs/<model>-<config hash>)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--eval-every", type=int, default=D.eval_every, help="0: only at the end")
    a("--eval-batches", type=int, default=D.eval_batches, help="validation batches per evaluation")
    a("--eval-snlp", default=D.eval_snlp, help="SNLP configs for validation PPL, e.g. 'idn:K=1:n=12,idn:K=2:n=12:4xF3'")
    a("--save-every", type=int, default=D.save_every, help="checkpoint every this many steps (and at the end)")
    a("--stop-at", type=int, default=None, help="stop after this step with a checkpoint (resume later)")
    a("--device", default=D.device, help="auto, cpu, cuda or cuda:N (under torchrun: cuda, one GPU per process)")
    a("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def config_from_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args["override"] = tuple(args["override"])
    return TrainConfig(**args)


def main(argv=None) -> int:
    """The command line; bad options or data are one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    res = train(config_from_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.evals[-1] if res.evals else {}
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
