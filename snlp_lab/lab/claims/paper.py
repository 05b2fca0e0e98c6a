"""The paper's numbers that the claims ledger compares with (arXiv 2605.17842, docs/design.md §4), the prior
method that one IDN iteration from h0 reduces to (`LAYER_PARALLELISM`, arXiv 2502.02790), and the setting
each set of numbers comes from (`Setting`: the paper's 0.5B runs, `PAPER_SETTING`; one of our profiles,
`Setting.of`; or the GPU study, `Setting.of_study`).

PPL is validation perplexity; a change is in % against a reference PPL (the same model's sequential PPL,
or the baseline's); a speedup is a ratio of wall-clock times (sequential / SNLP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...core.checks import check_choice
from ...models.config import get_config
from ..profiles import PROFILES


# ------------------------------------------------------------------------------------------ the paper
# docs/design.md §4, from the paper's v1 (128-token contexts, B = 1 forward, SDPA): (model, configuration,
# PPL, change against the model's sequential PPL in %, speedup).
PAPER_V1 = (
    ("0.5B baseline", "12xF1-h0 K4", 62.01, -10.8, 1.11),
    ("0.5B IDN", "12xF2-h0 K2", 53.68, +0.8, 2.37),
    ("0.5B IDN", "2xF6-fwd K1", 44.00, -17.4, 1.37),
    ("0.5B w/o x0ve baseline", "8xF2-fwd K2", 81.35, -4.0, 1.39),
    ("0.5B w/o x0ve IDN", "4xF6-h0 K2", 75.09, -6.1, 2.32),
    ("0.5B w/o x0ve IDN", "4xF4-h0 K4", 72.71, -9.1, 1.24),
    ("0.5B-mHC HCN", "n20-HCN-h0 K4", 66.56, -1.0, 1.22),
)
PAPER_V1_REG_RANGE = (-23.4, -4.7)  # sequential PPL change by the regulariser, v1 (0.5B IDN ... 3B DiagN)
PAPER_V2_REG_WITHIN = 2.4  # v2 (2048-token contexts): the change is within ±2.4%
PAPER_V2_EQUAL = ("0.5B w/o x0ve IDN", "1xF12 n12 K1 h0", 0.0, 1.40)  # v2: 1.40x at ±0% PPL
PAPER_V2_T = 2048  # v2's context length, at which PAPER_V2_EQUAL was timed

# "Layer Parallelism" (arXiv 2502.02790): pairs of pretrained layers run side by side on the same input,
# their residual updates summed, which is what one IDN iteration from h0 computes; it reports 1.05-1.20x
# with no retraining. The claims ledger cites it beside claims (b) and (g).
LAYER_PARALLELISM = {"name": "Layer Parallelism", "source": "arXiv 2502.02790", "speedup": (1.05, 1.20)}

# v1 (docs/design.md §4): sequential PPL without ("base") and with ("reg_ppl") the regulariser `reg`, by our
# variant of the same model family; None where the paper gives no baseline.
PAPER_TABLE_B = {
    "x0ve": {"model": "0.5B", "reg": "idn", "base": 69.54, "reg_ppl": 53.25},
    "plain": {"model": "0.5B w/o x0ve", "reg": "idn", "base": 84.74, "reg_ppl": 79.96},
    "mhc": {"model": "0.5B-mHC", "reg": "hcn", "base": None, "reg_ppl": 67.23},
}


def paper_v1(model: str, config: str) -> tuple:
    """The row of `PAPER_V1` of this model and configuration."""
    return next(r for r in PAPER_V1 if r[:2] == (model, config))


# ------------------------------------------------------------------------------------------ our setting
@dataclass(frozen=True)
class Setting:
    """What a set of numbers comes from: model size, training, data, device; the sentences that compare
    ours with the paper's are made from two of these."""
    name: str
    n_layer: int
    n_embd: int
    steps: int
    tokens: int  # training tokens: steps x batch x context
    data: str
    device: str
    finetune_steps: int = 0
    params: int = 0  # the model's parameters; 0: not given (the text leaves them out)
    tokens_per_param: float = 0.0  # as the run counted it (it may leave embeddings out); 0: tokens / params
    seq_len: int = 0  # the training context length; 0: not given

    @classmethod
    def of(cls, profile: str) -> "Setting":
        """The setting of a profile of `snlp_lab.lab.profiles` (its first variant's model size)."""
        check_choice("profile", profile, PROFILES)
        P = PROFILES[profile]
        v = next(iter(P.variants.values()))
        cfg = get_config(v.preset, **v.overrides)
        data = "the Python standard library's source" if P.data == "stdlib" else f"the corpus {Path(P.data).name}"
        return cls(f"our {profile} profile", cfg.n_layer, cfg.n_embd, P.steps, P.steps * P.batch_size * P.seq_len,
                   data, P.device, P.finetune_steps)

    @classmethod
    def of_study(cls, study: dict, name: str = "our GPU study") -> "Setting":
        """The setting of the GPU study (`make gpu-study`) from its study.json record (written by
        `snlp_lab.lab.gpu_study.study_summary`): `scale` (n_layer, n_embd, steps, tokens; params,
        tokens_per_param and sequence_len where given), `corpus.source` and `device` (the GPU's name).
        ValueError naming what the record lacks."""
        scale = study.get("scale")
        if not isinstance(scale, dict):
            raise ValueError("study.json has no scale record (n_layer, n_embd, steps, tokens)")
        number = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
        missing = [k for k in ("n_layer", "n_embd", "steps", "tokens") if not number(scale.get(k))]
        if missing:
            raise ValueError(f"study.json's scale lacks {', '.join(missing)}")
        source = (study.get("corpus") or {}).get("source")
        return cls(name, int(scale["n_layer"]), int(scale["n_embd"]), int(scale["steps"]), int(scale["tokens"]),
                   _data(source), str(study.get("device") or "an unnamed device"),
                   params=int(scale["params"]) if number(scale.get("params")) else 0,
                   tokens_per_param=float(scale["tokens_per_param"]) if number(scale.get("tokens_per_param")) else 0.0,
                   seq_len=int(scale["sequence_len"]) if number(scale.get("sequence_len")) else 0)

    def text(self) -> str:
        size = f" ({_sci(self.params)} parameters)" if self.params else ""
        ratio = self.tokens_per_param or (self.tokens / self.params if self.params else 0)
        per = f" ({ratio:.3g} per parameter)" if ratio else ""
        context = f" at T = {self.seq_len}" if self.seq_len else ""
        return (f"{self.name}: {self.n_layer} layers x {self.n_embd} wide{size}, {self.steps} steps, "
                f"{_sci(self.tokens)} training tokens{per} of {self.data}{context}, on {self.device}")


def _data(source) -> str:
    """A corpus named in words: the standard library by name, a local path by its last part."""
    if not source:
        return "an unnamed corpus"
    if source == "stdlib":
        return "the Python standard library's source"
    return f"the corpus {Path(source).name if str(source).startswith(('/', '.', '~')) else source}"


# The paper's 0.5B runs (docs/training.md, "The paper's runs"): depth 32, width 640, 4800 steps of 2^20 tokens.
PAPER_SETTING = Setting("the paper's 0.5B models", 32, 640, 4800, 4800 * 2 ** 20, "nanochat's pretraining corpus", "GPU")


def _sci(x: float) -> str:
    """Two significant digits, exponent without '+' and leading zeros: 1.5e5."""
    m, _, e = f"{x:.1e}".partition("e")
    return f"{m}e{int(e)}"


def gap(ours: Setting) -> str:
    """Why numbers may differ: the two settings side by side, with the ratio of training tokens."""
    return (f"It may differ through scale, training length, data and device: {ours.text()}; {PAPER_SETTING.text()} "
            f"({_sci(PAPER_SETTING.tokens / ours.tokens)} times our training tokens).")
