"""Experiment profiles shared by the notebooks: which models, how long they train, how much they are
evaluated. `smoke` is what the test suite runs (seconds), `cpu` is the default `make figures`
(about an hour on 2 cores), `paper` the paper's sizes on a GPU.

Every notebook starts with `P = experiments.get_profile(profile)`; trained models come from
`experiments.trained(P, variant, reg, seed)`, which trains once and reuses the cached run after.
"""
from __future__ import annotations

import platform
from pathlib import Path
from dataclasses import dataclass, field

import torch

from .data import prepare_data, val_batches
from .evaluate import evaluate_ppl
from .params import check_choice
from .snlp_config import parse_config
from .train import trained_model, trained_run_dir


@dataclass(frozen=True)
class Variant:
    """A model family of the experiments: a preset, overrides, and the regularizers trained on it."""
    preset: str
    overrides: dict = field(default_factory=dict)
    regs: tuple = ("none", "idn", "diagn")
    label: str = ""

    @property
    def reg(self) -> str:
        """The variant's main regularizer (IDN; HCN on mHC): the one the single-model studies use."""
        return self.regs[1]


@dataclass(frozen=True)
class Profile:
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

    def describe(self, variant: str | None = None) -> dict:
        """The facts every table states: model, data, steps, seeds, device."""
        data = "Python standard library source ('stdlib')" if self.data == "stdlib" else self.data
        d = {"profile": self.name, "data": data,
             "training": f"{self.steps} steps x {self.batch_size} x {self.seq_len} tokens, BPE vocab {self.vocab_size}",
             "regularizer": f"lambda={self.lam}, n_par set={list(self.n_par_set)}, stride={self.stride}",
             "seeds": list(self.seeds), "device": f"{self.device} ({platform.processor() or platform.machine()}, "
                                                  f"{torch.get_num_threads()} threads), torch {torch.__version__}",
             "evaluation": f"{self.eval_batches} x {self.eval_batch_size} validation windows of {self.seq_len} tokens"}
        if variant is not None:
            v = self.variants[variant]
            d["model"] = f"{v.preset} {v.overrides or ''}".strip()
        return d


def _cpu_variants(**ov) -> dict:
    return {"plain": Variant("cpu-plain", dict(ov), label="plain (w/o x0ve)"),
            "x0ve": Variant("cpu", dict(ov), label="x0 + value embeddings"),
            "mhc": Variant("cpu-mhc", dict(ov), regs=("none", "hcn"), label="mHC, 4 streams")}


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", {"plain": Variant("tiny", dict(x0ve=False, vocab_size=512), label="tiny plain"),
                               "x0ve": Variant("tiny", dict(vocab_size=512), label="tiny x0ve"),
                               "mhc": Variant("tiny", dict(x0ve=False, vocab_size=512, n_streams=2),
                                              regs=("none", "hcn"), label="tiny mHC")},
                     steps=6, batch_size=4, seq_len=32, vocab_size=512, seeds=(0,), lam=0.1, n_par_set=(2, 4),
                     stride=1, eval_batches=2, eval_batch_size=2, finetune_steps=3, bench_repeats=2,
                     data=str(Path(__file__).resolve().parent),  # this package's own source: tiny, fast
                     threads=1),  # toy matrices: threads only add synchronisation
    # 64-wide versions of the 12-layer CPU presets: 24 training runs (8 models x 3 seeds) fit in about
    # half an hour on 2 cores, the rest of `make figures` in the other half.
    "cpu": Profile("cpu", _cpu_variants(n_embd=64, n_head=2, n_kv_head=2), steps=150, batch_size=8, seq_len=128,
                   vocab_size=2048, seeds=(0, 1, 2), lam=0.1, n_par_set=(6, 12), stride=1, eval_batches=16,
                   eval_batch_size=8, finetune_steps=60),
    "paper": Profile("paper", {"plain": Variant("0.5b-plain", label="0.5B w/o x0ve"),
                               "x0ve": Variant("0.5b", label="0.5B"),
                               "mhc": Variant("0.5b-mhc", regs=("none", "hcn"), label="0.5B-mHC")},
                     steps=20000, batch_size=32, seq_len=2048, vocab_size=32768, seeds=(0,), lam=0.1,
                     n_par_set=(8, 16, 24), stride=3, eval_batches=64, eval_batch_size=8, device="cuda",
                     finetune_steps=2000, bench_repeats=20),
}


def get_profile(name: str) -> Profile:
    """The profile by name; also applies its thread setting to this process."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    P = PROFILES[name]
    if P.threads:
        torch.set_num_threads(P.threads)
    return P


# Paper reference numbers (arXiv 2605.17842 v1, DESIGN §4): sequential PPL without / with the regularizer.
PAPER_TABLE_B = {
    "x0ve": {"model": "0.5B", "reg": "idn", "base": 69.54, "reg_ppl": 53.25},
    "plain": {"model": "0.5B w/o x0ve", "reg": "idn", "base": 84.74, "reg_ppl": 79.96},
    "mhc": {"model": "0.5B-mHC", "reg": "hcn", "base": None, "reg_ppl": 67.23},
}


# ------------------------------------------------------------------------------------------ shared steps
def dataset(P: Profile):
    """The tokenized corpus of the profile (built once, cached)."""
    return prepare_data(P.data, vocab_size=P.vocab_size)


def eval_batch(P: Profile, ds, batch_size: int | None = None, seq_len: int | None = None):
    """The first validation windows as (idx, targets): the fixed input of convergence/Jacobian studies."""
    x, y = next(iter(val_batches(ds.val, seq_len or P.seq_len, batch_size or P.eval_batch_size, 1)))
    return x.to(P.device), y.to(P.device)


def train_options(P: Profile, variant: str, reg: str = "none", seed: int = 0, **extra) -> dict:
    """The keyword arguments of `train.trained_model` for one model of the profile."""
    check_choice("variant", variant, P.variants)
    v = P.variants[variant]
    opts = dict(preset=v.preset, steps=P.steps, reg=reg, lam=P.lam, seed=seed, batch_size=P.batch_size,
                seq_len=P.seq_len, vocab_size=P.vocab_size, n_par_set=P.n_par_set, stride=P.stride,
                device=P.device, eval_batches=P.eval_batches, progress=False, data=P.data)
    opts.update(v.overrides)
    opts.update(extra)
    return opts


def trained(P: Profile, variant: str, reg: str = "none", seed: int = 0, **extra):
    """A model of the profile trained with `reg` (cached: trained on first use, reused after), frozen for
    analysis (eval mode, no parameter gradients, so solves build no autograd graph)."""
    return trained_model(**train_options(P, variant, reg, seed, **extra)).eval().requires_grad_(False)


def ppl(P: Profile, model, ds, method: str = "sequential", **solve_kw) -> float:
    """Validation PPL of the profile's evaluation windows, sequential or under an SNLP configuration."""
    return evaluate_ppl(model, ds.val, P.seq_len, P.eval_batch_size, P.eval_batches, method=method, **solve_kw)


def model_pairs(P: Profile) -> list[tuple[str, str]]:
    """(variant, regularizer) for every model family's baseline ("none") and its main regularizer: the
    models that the single-seed studies compare (convergence, jacobians, frontier)."""
    return [(v, reg) for v, var in P.variants.items() for reg in ("none", var.reg)]


def ppl_grid(P: Profile, model, ds, configs) -> list[float]:
    """Validation PPL of `model` under each configuration string (`snlp_lab.snlp_config` grammar)."""
    return [ppl(P, model, ds, c.method, **c.solve_kwargs()) for c in map(parse_config, configs)]


def frontier_configs(L: int, mhc: bool = False) -> list[str]:
    """The speed–quality grid (configuration strings of `snlp_lab.snlp_config`): n_par in {L/2, 3L/4, L},
    K in {1, 2, 4}, init h0/fwd, per layer (IDN, and HCN on mHC models); and, without mHC, every fused
    chunking CxFM (M > 1) of n_par in {L/2, L} with K in {1, 2} from h0 (K = 1 also from fwd)."""
    ns = sorted({max(1, L // 2), max(1, 3 * L // 4), L})
    out = ["sequential"]
    for method in ("idn", "hcn") if mhc else ("idn",):
        out += [f"{method}:K={K}:n={n}:{init}" for n in ns for K in (1, 2, 4) if K <= n for init in ("h0", "fwd")]
    if not mhc:
        for n in sorted({max(1, L // 2), L}):
            for M in (m for m in range(2, n + 1) if n % m == 0 and m in (2, 3, 4, 6, n)):
                out += [f"idn:K={K}:n={n}:{n // M}xF{M}:h0" for K in (1, 2) if K <= n // M]
                out.append(f"idn:K=1:n={n}:{n // M}xF{M}:fwd")
    return list(dict.fromkeys(out))


def pareto(df, x: str = "speedup", y: str = "ppl"):
    """Boolean mask of the rows no other row beats on both x (higher is better) and y (lower)."""
    keep = []
    for i, r in df.iterrows():
        keep.append(not ((df[x] >= r[x]) & (df[y] <= r[y]) & ((df[x] > r[x]) | (df[y] < r[y]))).any())
    return keep


def run_folder(P: Profile, variant: str, reg: str = "none", seed: int = 0, **extra):
    """The cached run folder of `trained(P, variant, reg, seed, **extra)` (e.g. to fine-tune from it)."""
    return trained_run_dir(**train_options(P, variant, reg, seed, **extra))


def frontier_table(res):
    """A speed–quality table of bench rows with a `ppl` column and a `model_name` column: adds
    ppl_change_% (against the same model's sequential PPL), speedup (the prefill speedup) and pareto
    (no configuration of the same model is both faster and better; `pareto`)."""
    res = res.copy()
    seq = res[res.config == "sequential"].set_index("model_name").ppl
    res["ppl_change_%"] = 100 * (res.ppl / res.model_name.map(seq) - 1)
    res["speedup"] = res.prefill_speedup
    res["pareto"] = False
    for _, d in res.groupby("model_name"):
        res.loc[d.index, "pareto"] = pareto(d)
    return res
