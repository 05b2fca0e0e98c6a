"""SNLP configurations: one grammar for every way in, validated in one place.

    sequential
    METHOD[:K=iters][:n=n_par][:CxFM][:INIT][:kappa=κ][:probes=P][:jac=J][:seed=S][:fullmask]

in any order after the method, e.g. `idn:K=2:n=24:4xF6:h0`, `idn:K=1:n=12`, `scaled-idn:K=2:n=8:fwd`,
`idn:K=1:n=12:1xF12:h0:fullmask`. Defaults: K = 1, n = all layers (or C·M with chunks), one unit per
layer, init h0, windows kept. INIT is h0, fwd or warm ("warm", the previous token's states, is a decoding
init). `CxFM` solves C fused chunks of M layers (`snlp_lab.models.fusion`). `fullmask` is the paper's
mask treatment (its code runs the parallel layers with SDPA is_causal=True while its sequential
baseline builds the sliding-window mask): the parallel units attend with full causal masks, while the
sequential prefix, and any sequential baseline, keep the model's windows (`SNLPConfig.mask` = "full";
without the token, "window": windows on every path). It changes the function wherever a window is
shorter than the context, so it is a different model, not a faster way to the same one; on models
without windows (or at contexts no longer than the short window) it changes nothing. `sequential`
takes it only with chunks (`sequential:n=12:1xF12:fullmask`: the fused chunks run in order, full causal).
The same strings name configurations in the benchmark, validation PPL (`evaluate`,
training's `--eval-snlp`), speculative drafts and the notebooks.

`SNLPConfig` holds one configuration and checks its fields when it is made; `check(n_layer)` checks what
depends on the model's depth. `solve`, `Decoder` and the trainer build one from their keyword
arguments, so method, iterations, parallel layers, chunks and init are validated here and nowhere else
(a surrogate checks its own options: IDN's κ, DiagN's probes, exact Newton's Jacobian products).

The registry of surrogates lives here too, so that the valid methods are known where they are checked:
`snlp_lab.solvers.solver` registers the built-in ones, `snlp_lab.mhc` registers HCN.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..core.checks import check_seed
from .surrogates import methods

INITS = ("h0", "fwd")  # initial guesses of a full-sequence solve
DECODE_INITS = INITS + ("warm",)  # ... and of KV-cached decoding
# the parallel units' attention: "window" keeps every layer's sliding window (ours, on every path),
# "full" attends over the whole causal context (the paper's code in its parallel layers; token `fullmask`)
MASKS = ("window", "full")
MASK_TOKEN = "fullmask"

# ------------------------------------------------------------------------------------------ chunks
_CHUNKS = re.compile(r"(\d+)xF(\d+)")


def parse_chunks(chunks: str, n_par: int | None = None) -> tuple[int, int]:
    """'CxFM' -> (C, M): C chunks of M fused layers, e.g. '4xF6' -> (4, 6). With n_par, C·M must equal it."""
    m = _CHUNKS.fullmatch(chunks.strip()) if isinstance(chunks, str) else None
    if m is None:
        raise ValueError(f"chunks must be a string 'CxFM' (C chunks of M fused layers, e.g. '4xF6', "
                         f"'12xF2', '1xF12'), got {chunks!r}")
    C, M = int(m[1]), int(m[2])
    if C < 1 or M < 1:
        raise ValueError(f"chunks 'CxFM' needs C >= 1 and M >= 1, got C={C}, M={M} in {chunks!r}")
    if n_par is not None and C * M != n_par:
        raise ValueError(f"chunks {chunks!r} cover C·M = {C * M} layers but n_par = {n_par}; "
                         f"C·M must equal n_par (e.g. '{n_par}xF1' or '1xF{n_par}')")
    return C, M


# ------------------------------------------------------------------------------------------ configurations
GRAMMAR = ("'sequential' or 'METHOD[:K=iters][:n=n_par][:CxFM][:INIT][:kappa=κ][:fullmask]', "
           "e.g. 'idn:K=2:n=24:4xF6:h0'")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SNLPConfig:
    """One SNLP configuration (see the module docstring); `text` is its label in tables."""
    method: str = "sequential"
    iters: int = 1
    n_par: int | None = None
    chunks: str | None = None
    init: str = "h0"
    kappa: float = 0.0
    probes: int = 1
    jac: str = "jvp"
    seed: int = 0
    mask: str = "window"  # one of MASKS: the parallel units' attention (token `fullmask` for "full")
    text: str = ""

    def __post_init__(self):
        if self.method not in methods():
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(methods())}")
        if not _is_int(self.iters) or self.iters < 1:
            raise ValueError(f"iters must be an integer >= 1 (K in a configuration), got {self.iters!r}")
        if self.n_par is not None and not _is_int(self.n_par):
            raise ValueError(f"n_par must be an integer, got {self.n_par!r}")
        if self.chunks is not None:
            parse_chunks(self.chunks, self.n_par)
        if self.init not in DECODE_INITS:
            raise ValueError(f"unknown init {self.init!r}; valid inits: {', '.join(DECODE_INITS)}")
        check_seed("seed", self.seed)
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; valid masks: window (every layer keeps its sliding "
                             f"window), full (the parallel units attend with full causal masks, token {MASK_TOKEN!r})")
        if self.method == "sequential":  # one pass through the layers: no iteration to set
            # (a seed is allowed: decoders also seed their sampling with it)
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = [k for k in ("iters", "init", "kappa", "probes", "jac") if getattr(self, k) != defaults[k]]
            if self.chunks is None and self.mask != defaults["mask"]:  # no parallel units to unmask
                given.append("mask")
            if given:
                raise ValueError(f"sequential runs each layer once and takes no {', '.join(given)} "
                                 f"(got {self.text or self.canonical()!r}); valid: 'sequential', 'sequential:CxFM' "
                                 f"or 'sequential:CxFM:{MASK_TOKEN}'")
        if not self.text:
            object.__setattr__(self, "text", self.canonical())

    def canonical(self) -> str:
        """The configuration as a string of the grammar (what `parse_config` reads back)."""
        if self.method == "sequential" and self.chunks is None:
            return "sequential"
        full = [MASK_TOKEN] if self.mask == "full" else []
        parts = [self.method, f"K={self.iters}"] + ([f"n={self.n_par}"] if self.n_par is not None else []) + \
            ([self.chunks] if self.chunks else []) + [self.init]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        parts += [f"{k}={getattr(self, k)}" for k in ("kappa", "probes", "jac", "seed")
                  if getattr(self, k) != defaults[k]]
        return ":".join(parts + full)

    def units(self, n_layer: int) -> tuple[int, int, int]:
        """(n_par, C, M): parallel layers (defaults filled in), parallel units and layers per unit."""
        C, M = parse_chunks(self.chunks) if self.chunks else (None, 1)
        n_par = self.n_par if self.n_par is not None else (C * M if C else n_layer)
        return n_par, (C if C else n_par), M

    def check(self, n_layer: int, decoding: bool = True) -> "SNLPConfig":
        """Raise a ValueError if the configuration does not fit a model of depth n_layer (or, with
        decoding=False, is not a full-sequence solve: init warm). Returns the configuration."""
        n_par, _, _ = self.units(n_layer)
        if not 1 <= n_par <= n_layer:
            raise ValueError(f"n_par must be an integer in 1..{n_layer} (the model's depth), got {n_par} "
                             f"in {self.text!r}")
        units = self.units(n_layer)[1]
        if self.method != "sequential" and self.iters > units:
            raise ValueError(f"K={self.iters} in {self.text!r} exceeds its {units} parallel units: after as many "
                             f"iterations as units every unit holds the sequential state (finite termination), "
                             f"so K must be in 1..{units}")
        if not decoding and self.init not in INITS:
            raise ValueError(f"init {self.init!r} in {self.text!r} is a decoding init; a full-sequence solve "
                             f"has valid inits: {', '.join(INITS)}")
        return self

    def layout(self, n_layer: int) -> tuple[int, int]:
        """(S, units): sequential prefix layers and parallel units."""
        if self.method == "sequential" and self.chunks is None:
            return n_layer, 0
        n_par, units, _ = self.units(n_layer)
        return n_layer - n_par, units

    def bound(self, n_layer: int) -> float:
        """Critical-path speedup bound L / (S + K [+1 for fwd]); the fused sequential pass: L / (S + C)."""
        S, units = self.layout(n_layer)
        if self.method == "sequential":
            return n_layer / (S + units)
        return n_layer / (S + self.iters + (1 if self.init == "fwd" else 0))

    def _mask_kwargs(self) -> dict:
        # only when set: callers that take no mask (e.g. the layer-sliced decoder) keep working
        return {"mask": self.mask} if self.mask != "window" else {}

    def solve_kwargs(self) -> dict:
        """Keyword arguments of `snlp_lab.solve` (and `evaluate_ppl`) for this configuration; `mask`
        only with `fullmask`."""
        if self.method == "sequential":
            return {} if self.chunks is None else {"chunks": self.chunks, "n_par": self.n_par, **self._mask_kwargs()}
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} in {self.text!r} is a decoding init; a full-sequence "
                             f"solve takes {', '.join(INITS)}")
        return dict(iters=self.iters, n_par=self.n_par, chunks=self.chunks, init=self.init, kappa=self.kappa,
                    probes=self.probes, jac=self.jac, seed=self.seed, **self._mask_kwargs())

    def decoder_kwargs(self) -> dict:
        """Keyword arguments of `snlp_lab.Decoder` for this configuration; `mask` only with `fullmask`."""
        return dict(method=self.method, iters=self.iters, n_par=self.n_par, chunks=self.chunks, init=self.init,
                    kappa=self.kappa, probes=self.probes, jac=self.jac, seed=self.seed, **self._mask_kwargs())


def _number(value: str, field: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{field!r} in configuration {text!r} is not a number; e.g. kappa=0.1") from None


def parse_config(text: str) -> SNLPConfig:
    """Read a configuration string (grammar in the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a configuration must be a string {GRAMMAR}, got {text!r}")
    method, *fields = text.strip().split(":")
    if method not in methods():
        raise ValueError(f"unknown method {method!r} in {text!r}; valid methods: {', '.join(methods())}")
    kw = {}
    for f in fields:
        if m := re.fullmatch(r"K=(\d+)", f):
            key, value = "iters", int(m[1])
        elif m := re.fullmatch(r"n=(\d+)", f):
            key, value = "n_par", int(m[1])
        elif m := re.fullmatch(r"kappa=(.*)", f):
            key, value = "kappa", _number(m[1], f, text)
        elif m := re.fullmatch(r"(probes|seed)=(\d+)", f):
            key, value = m[1], int(m[2])
        elif m := re.fullmatch(r"jac=(\w+)", f):
            key, value = "jac", m[1]
        elif f in DECODE_INITS:
            key, value = "init", f
        elif f == MASK_TOKEN:
            key, value = "mask", "full"
        elif "mask" in f:
            raise ValueError(f"cannot read {f!r} in configuration {text!r}: the mask token is {MASK_TOKEN!r} "
                             f"(parallel units with full causal masks); without it every layer keeps its window")
        elif "xF" in f:
            parse_chunks(f)  # a clear error for a malformed chunking
            key, value = "chunks", f
        else:
            raise ValueError(f"cannot read {f!r} in configuration {text!r}; expected {GRAMMAR} "
                             f"(INIT one of {', '.join(DECODE_INITS)})")
        if key in kw:  # the last would silently win
            raise ValueError(f"configuration {text!r} gives {f.split('=')[0] if '=' in f else key} twice")
        kw[key] = value
    return SNLPConfig(method=method, text=text.strip(), **kw)
