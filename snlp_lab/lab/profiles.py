"""Experiment profiles: which models the notebooks train, how long, how much they are evaluated, and the
settings of each study. `smoke` is what the test suite runs (seconds), `cpu` is the default `make figures`
(its time is in reports/run_times.json, most of it the regularization study's training runs), `long` what
did not fit that (the same comparisons, mHC at three seeds, 2400 steps: hours), `long-x0ve` long's x0ve
comparison trained 3x longer again, `paper` the paper's sizes on a GPU (docs/design.md §4).

Every notebook starts with `P = profiles.get_profile(profile)`; the steps that train, evaluate and time
the profile's models are in `snlp_lab.lab.experiments`. This module imports no training code, so the
claims ledger (`snlp_lab.lab.claims`) can read a profile's setting without it: a profile holds the
options it hands to training (`Profile.training`, `TrainConfig` fields), not the training itself. The
speedup benchmark's settings are a `measurement.bench.SpeedupStudy`, the benchmark's own type (it also
runs without a profile).

Also here: what "equal" and "close" PPL mean (`EQUAL_PPL_PCT`, `CLOSE_PPL_PCT`: a change against the
model's own sequential PPL, in %) and which configurations are fused (`is_fused`), shared by the notebooks'
picks (`experiments.speed_picks`) and the ledger's claim (g).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..measurement.bench import SpeedupStudy
from ..solvers.grammar import parse_chunks, parse_config


@dataclass(frozen=True)
class Variant:
    """A model family of the experiments: a preset, overrides, and the regularizers trained on it."""
    preset: str
    overrides: dict = field(default_factory=dict)
    regs: tuple = ("none", "idn", "diagn")
    label: str = ""
    seeds: tuple | None = None  # the regularization study's seeds for this family; None: the profile's

    def study_seeds(self, P: "Profile") -> tuple:
        """The seeds the regularization study trains this family at (the single-seed studies use P.seeds[0])."""
        return self.seeds or P.seeds

    @property
    def reg(self) -> str:
        """The variant's main regularizer (IDN; HCN on mHC): the one the single-model studies use."""
        return self.regs[1]


@dataclass(frozen=True)
class DecodeStudy:
    """The decode study of a profile: the model every training recipe trains (a preset at full size,
    unlike the profile's 64-wide variants), how long, how it is evaluated, and which recipes
    (`decode_recipes`) and SNLP configurations the profile's run covers."""
    preset: str
    steps: int
    batch_size: int
    seq_len: int
    vocab_size: int
    recipes: tuple  # recipe names, "baseline" first: every ΔPPL is also taken against its sequential PPL
    configs: tuple  # configuration strings (`snlp_lab.solvers.grammar`), "sequential" first
    eval_batches: int  # validation windows: eval_batches x the profile's eval_batch_size x seq_len tokens
    decode_tokens: int = 32  # timed KV-cached decode steps per repeat (after a prefill of seq_len - decode_tokens)
    overrides: dict = field(default_factory=dict)
    # decoders timed per configuration, the best kept (`decode_speed`): the goal is measured against the
    # best of eager and compiled sequential decoding (the smoke profile skips compiling: seconds matter)
    decoders: tuple = ("eager", "compiled")


@dataclass(frozen=True)
class SpeculativeStudy:
    """The speculative-decoding study of a profile (nb/speculative): draft block sizes, and prompts of
    `prompt_len` tokens (windows spread over the validation split) each continued by `max_new_tokens`,
    timed as the median of `repeats` runs. The defaults are the cpu profile's."""
    blocks: tuple = (1, 2, 4, 6, 8)  # draft tokens per round
    n_prompts: int = 4
    prompt_len: int = 32
    max_new_tokens: int = 64
    repeats: int = 5  # 5 rounds: the speedups' lower bounds (speedup_lo) hold one-sided at 97%


@dataclass(frozen=True)
class Profile:
    """The settings of one run of the notebooks: the model families (`variants`, their presets at the
    profile's overrides), how they train (steps of batch_size x seq_len tokens, a BPE vocabulary of
    vocab_size, the regularizer's λ = lam, n_par set and stride, `training`: further `TrainConfig`
    options), how they are evaluated (eval_batches x eval_batch_size validation windows of seq_len
    tokens) and timed (bench_repeats), and the settings of the studies with their own models."""
    name: str
    variants: dict  # name -> Variant
    steps: int
    batch_size: int
    seq_len: int
    vocab_size: int
    seeds: tuple
    lam: float
    n_par_set: tuple  # the regularizer's set of n_par values (𝒩)
    stride: int
    eval_batches: int  # validation windows of seq_len used for PPL
    eval_batch_size: int
    device: str = "cpu"
    finetune_steps: int = 0
    bench_repeats: int = 5
    data: str = "stdlib"  # a corpus for snlp_lab.data.load_corpus
    threads: int | None = None  # torch CPU threads; None: torch's default
    decode: DecodeStudy | None = None  # the decode study (nb/decode)
    speculative: SpeculativeStudy = SpeculativeStudy()  # the speculative-decoding study (nb/speculative)
    speedup: SpeedupStudy = SpeedupStudy()  # the speedup benchmark's defaults (nb/speedup, `bench.settings`)
    training: dict = field(default_factory=dict)  # TrainConfig options of every run (optimizer recipe, lrs)
    eval_every: int = 0  # validation every this many training steps: the training curves (0: at the end only)
    contexts: tuple = ()  # further context lengths of the regularization study (the same tokens per step)
    context_variants: tuple = ()  # the variants trained at those contexts too
    train_workers: int = 1  # training runs at once in `train_all` (processes of one thread each when > 1)
    notebooks: tuple = ()  # the notebooks `make figures` runs for this profile (by name); empty: all of nb/

    def describe(self, variant: str | None = None) -> dict:
        """The facts every table states: model, data, steps, seeds, device."""
        data = "Python standard library source ('stdlib')" if self.data == "stdlib" else self.data
        own = {k: list(v.seeds) for k, v in self.variants.items() if v.seeds}  # e.g. "[0, 1, 2] (mhc: [0])"
        seeds = f"{list(self.seeds)} ({', '.join(f'{k}: {s}' for k, s in own.items())})" if own else list(self.seeds)
        d = {"profile": self.name, "data": data,
             "training": f"{self.steps} steps x {self.batch_size} x {self.seq_len} tokens, BPE vocab {self.vocab_size}",
             "regularizer": f"lambda={self.lam}, n_par set={list(self.n_par_set)}, stride={self.stride}",
             "seeds": seeds, "device": f"{self.device} ({platform.processor() or platform.machine()}, "
                                       f"{torch.get_num_threads()} threads), torch {torch.__version__}",
             "evaluation": f"{self.eval_batches} x {self.eval_batch_size} validation windows of {self.seq_len} tokens"
                           + (" (the same tokens at the other contexts)" if self.contexts else "")}
        if self.training:
            d["optimizer"] = ", ".join(f"{k}={v}" for k, v in self.training.items())
        if variant is not None:
            v = self.variants[variant]
            d["model"] = f"{v.preset} {v.overrides or ''}".strip()
        return d


def _cpu_variants(regs: tuple = ("none", "idn", "diagn"), mhc_seeds: tuple | None = None, **ov) -> dict:
    return {"plain": Variant("cpu-plain", dict(ov), regs=regs, label="plain (w/o x0ve)"),
            "x0ve": Variant("cpu", dict(ov), regs=regs, label="x0 + value embeddings"),
            "mhc": Variant("cpu-mhc", dict(ov), regs=("none", "hcn"), label="mHC, 4 streams", seeds=mhc_seeds)}


# The CPU profiles train with the paper's optimizer (recipe "paper": nanochat-snlp's NanochatMuon and AdamW
# groups, weight decay by nanochat's rule). Its learning rates stay at nanochat's reference batch of 2^19
# tokens: scaled by sqrt(B / 2^19) to our 1024-token batches they would be 22x smaller (Muon 0.0009),
# too small to learn in hundreds of steps. (torch.optim.Muon, recipe "snlp", is also much slower here: its
# Newton-Schulz iterations run in bfloat16, which these CPUs emulate; docs/training.md, "On a CPU".) The
# rates are recipe paper's own at that batch, `snlp_lab.training.config.PAPER_LRS`, written out so that a profile
# needs no training code (tests/test_experiments.py checks that they are the same).
PAPER_TRAINING = dict(recipe="paper", matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5)


# The configurations that decode fastest on the 12-layer cpu-plain (reports/decode.md): K=1 or 2 over the
# last 12, 10 or 8 layers, and fused chunks with K = 1 or 2; h0 unless fwd is named.
DECODE_CONFIGS = ("sequential", "idn:K=1:n=12", "idn:K=1:n=12:fwd", "idn:K=2:n=12", "idn:K=1:n=10", "idn:K=1:n=8",
                  "idn:K=1:n=12:1xF12", "idn:K=1:n=12:2xF6", "idn:K=2:n=12:2xF6", "idn:K=1:n=12:2xF6:fwd",
                  "idn:K=1:n=12:3xF4", "idn:K=2:n=12:3xF4", "idn:K=1:n=12:4xF3", "idn:K=2:n=12:4xF3",
                  "idn:K=1:n=12:4xF3:fwd")


def _cpu_plain_decode(recipes: tuple) -> DecodeStudy:
    # the cpu-plain preset at full size (12 x 128), 300 steps
    return DecodeStudy("cpu-plain", steps=300, batch_size=4, seq_len=128, vocab_size=4096, recipes=recipes,
                       configs=DECODE_CONFIGS, eval_batches=8)


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", {"plain": Variant("tiny", dict(x0ve=False, vocab_size=512), label="tiny plain"),
                               "x0ve": Variant("tiny", dict(vocab_size=512), label="tiny x0ve"),
                               "mhc": Variant("tiny", dict(x0ve=False, vocab_size=512, n_streams=2),
                                              regs=("none", "hcn"), label="tiny mHC")},
                     steps=6, batch_size=4, seq_len=32, vocab_size=512, seeds=(0,), lam=0.1, n_par_set=(2, 4),
                     stride=1, eval_batches=2, eval_batch_size=2, finetune_steps=3, bench_repeats=2,
                     data=str(Path(__file__).resolve().parents[1]),  # this package's own source: tiny, fast
                     threads=1,  # toy matrices: threads only add synchronisation
                     training=PAPER_TRAINING, eval_every=2, contexts=(64,), context_variants=("x0ve",),
                     train_workers=2,  # the code path of the cpu profile's parallel training
                     decode=DecodeStudy("tiny", steps=6, batch_size=4, seq_len=32, vocab_size=512,
                                        recipes=("baseline", "idn", "idn-all", "fwd", "idn+fwd", "fwd-chunks"),
                                        configs=("sequential", "idn:K=1:n=4", "idn:K=2:n=4", "idn:K=1:n=3",
                                                 "idn:K=1:n=4:2xF2", "idn:K=2:n=4:2xF2"),
                                        eval_batches=2, decode_tokens=4, overrides=dict(x0ve=False),
                                        decoders=("eager",)),
                     speculative=SpeculativeStudy(blocks=(1, 2, 4), n_prompts=2, prompt_len=8, max_new_tokens=12,
                                                  repeats=1),
                     speedup=SpeedupStudy(seq_lens=(16,), decode_tokens=4, repeats=1, big_repeats=1, warmup=0,
                                          gpu=dict(seq_lens=(16,), decode_tokens=4, repeats=1, warmup=0))),
    # 64-wide versions of the 12-layer CPU presets (600 steps, validation every 75 for the curves), three
    # seeds; x0ve also at 256-token contexts, where its windows of 64 cover a quarter of the context as the
    # paper's v2 windows of 512 do at 2048. Cut variants, not steps, to fit the hour: DiagN is left to the
    # paper profile, and mHC trains at seed 0 only (an HCN step costs about twice an IDN step, and the paper
    # gives no mHC baseline to compare with). Two training processes at once (`train_all`); the time of each
    # notebook is in reports/run_times.json.
    "cpu": Profile("cpu", _cpu_variants(n_embd=64, n_head=2, n_kv_head=2, regs=("none", "idn"), mhc_seeds=(0,)),
                   steps=600, batch_size=8, seq_len=128, vocab_size=2048, seeds=(0, 1, 2), lam=0.1, n_par_set=(6, 12),
                   stride=1, eval_batches=16, eval_batch_size=8, finetune_steps=150, training=PAPER_TRAINING,
                   eval_every=75, contexts=(256,), context_variants=("x0ve",), train_workers=2,
                   # three of the six recipes, to fit the hour (all six: papermill ... -p recipes all)
                   decode=_cpu_plain_decode(("baseline", "idn-all", "fwd"))),
    # What did not fit the hour: the cpu profile's central comparisons trained 4x longer, mHC at three seeds
    # too; whether their curves flattened is in reports/long/regularization.md, the training time in
    # reports/long/regularization_runs.csv (hours on 2 cores; an interrupted run resumes where it stopped).
    # Writes figures/long and reports/long. DiagN is in the paper profile.
    "long": Profile("long", _cpu_variants(n_embd=64, n_head=2, n_kv_head=2, regs=("none", "idn")), steps=2400,
                    batch_size=8, seq_len=128, vocab_size=2048, seeds=(0, 1, 2), lam=0.1, n_par_set=(6, 12),
                    stride=1, eval_batches=16, eval_batch_size=8, finetune_steps=600, training=PAPER_TRAINING,
                    eval_every=300, contexts=(256,), context_variants=("x0ve",), train_workers=2,
                    decode=_cpu_plain_decode(("baseline", "idn", "idn-all", "fwd", "idn+fwd", "fwd-chunks"))),
    "paper": Profile("paper", {"plain": Variant("0.5b-plain", label="0.5B w/o x0ve"),
                               "x0ve": Variant("0.5b", label="0.5B"),
                               "mhc": Variant("0.5b-mhc", regs=("none", "hcn"), label="0.5B-mHC")},
                     steps=20000, batch_size=32, seq_len=2048, vocab_size=32768, seeds=(0,), lam=0.1,
                     n_par_set=(8, 16, 24), stride=3, eval_batches=64, eval_batch_size=8, device="cuda",
                     finetune_steps=2000, bench_repeats=20,
                     decode=_cpu_plain_decode(("baseline", "idn", "idn-all", "fwd", "idn+fwd", "fwd-chunks")),
                     speculative=SpeculativeStudy(blocks=(1, 2, 4, 8, 16), n_prompts=8, prompt_len=256,
                                                  max_new_tokens=256, repeats=5),
                     # the GPU's benchmark on either device: the 0.5B model, T = 128 and 2048
                     speedup=SpeedupStudy("0.5b-plain", seq_lens=(128, 2048), decode_tokens=32, repeats=10,
                                          big_repeats=10, warmup=2)),
}

# long's x0ve comparison at T = 128 trained 3x longer again, to see where its curves flatten (7200 steps,
# validation every 600), as long's curves were still falling before the warm-down. All of long's comparisons
# at 7200 steps would take three times long's training; so cut variants, not steps: x0ve alone at one
# context, three seeds, the regularization study alone (nb/regularization). Writes figures/long-x0ve and
# reports/long-x0ve.
PROFILES["long-x0ve"] = replace(
    PROFILES["long"], name="long-x0ve", variants={"x0ve": PROFILES["long"].variants["x0ve"]}, steps=7200,
    eval_every=600, finetune_steps=0, contexts=(), context_variants=(), decode=None, notebooks=("regularization",))


def get_profile(name: str) -> Profile:
    """The profile by name; also applies its thread setting to this process."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    P = PROFILES[name]
    if P.threads:
        torch.set_num_threads(P.threads)
    return P


# ------------------------------------------------------------------------------------------ equal, close, fused
# "Equal" and "close" PPL, as the notebooks' picks (`experiments.speed_picks`) and the claims ledger's (g) read
# them: a change against the model's own sequential PPL
EQUAL_PPL_PCT = 1.0  # at most +1% (the paper calls +0.8% on par: 0.5B IDN 12xF2-h0 K2)
CLOSE_PPL_PCT = 5.0  # at most +5%


def is_fused(config: str) -> bool:
    """Whether a configuration runs fused chunks of M >= 2 layers (CxFM, `snlp_lab.models.fusion`)."""
    c = parse_config(config)
    return bool(c.chunks) and parse_chunks(c.chunks)[1] > 1
