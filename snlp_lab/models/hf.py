"""Off-the-shelf decoders from a local Hugging Face folder, as layer stacks (docs/design.md §2, "Off-the-shelf models").

    model = snlp_lab.load_hf("~/models/Qwen2.5-0.5B")            # any folder AutoModelForCausalLM loads
    res = snlp_lab.solve(model, idx, method="idn", iters=1, n_par=12)

`HFModel` gives a transformers causal LM our GPT's interface: `embed(idx) -> (h0, ctx)`, `layer(l, h,
ctx)`, batched `layers(start, stop, H, ctx, past=None, return_kv=False)` and `head(h)`. The layer maps
Φ_l are the family's own decoder-layer modules (`model.model.layers[l]`), run as transformers runs them;
this module only supplies what the family's model-level forward would pass them:

  - h0: the family's input embedding module (Gemma's √D scale lives in it);
  - rotary tables: the family's rotary module, per layer type where it has several (Gemma 3: a local
    base for sliding layers, a global one for full layers);
  - the attention mask, per layer: causal, within the layer's sliding window where it has one (Mistral,
    Qwen2 with use_sliding_window, Gemma 2/3 on alternating layers), over the cached tokens too;
  - head: the family's final norm, lm_head and final logit soft-capping (Gemma 2/3).

`layers` evaluates N layers in one call: the layers' parameters stacked on a leading axis and
`torch.vmap` over `torch.func.functional_call` of one layer module. Layers of one model share their
structure (checked at load); what differs between them (window, rotary table) is passed in per layer.
With `past` = cached keys/values [N, B, Hkv, Tpast, hd] the layers attend to them through a stand-in
for transformers' `Cache` that hands them to the attention module and keeps the new tokens' keys and
values (`return_kv`), which is what `snlp_lab.decoding.decoder.Decoder` caches.

Fusion (`CxFM` chunks) is refused on these models: it would need the families' attention re-written
as one wide block, which is out of scope here (see `snlp_lab.models.fusion.check_chunkable`).

Families: `SUPPORTED` (tested with tiny random models of each, `tests/test_hf.py`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.files import DamagedFileError, check_safetensors, first_line
from .model import check_token_ids, param_key
from .run_folder import has_checkpoint, hf_weights_folder

MIN_TRANSFORMERS = "5.4"  # from 5.4 on every supported family's quirks live in its modules (Gemma's
# embedding scale moved into its embedding module then); tested with 5.4.0 and 5.24.0
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# attributes of a decoder layer's submodules that may differ between layers: what they select (the
# attention window, the rotary table) is passed to every layer explicitly, and the cache index is unused
PER_LAYER_ATTRS = frozenset({"layer_idx", "layer_type", "attention_type", "sliding_window", "is_sliding"})
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HFConfig:
    """The fields of `snlp_lab.GPTConfig` that the solvers, decoder and trainer read, for a
    transformers model (read from its config.json)."""
    model_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    sequence_len: int  # max_position_embeddings
    n_streams: int = 1  # one residual stream

    @classmethod
    def from_hf(cls, c) -> "HFConfig":
        return cls(model_type=c.model_type, n_layer=c.num_hidden_layers, n_embd=c.hidden_size, n_head=c.num_attention_heads,
                   n_kv_head=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   vocab_size=c.vocab_size, sequence_len=c.max_position_embeddings)


@dataclass
class HFContext:
    """What the layers need besides their input, for tokens idx [B, T] at positions pos..pos+T-1:
    the rotary tables per layer type and, built lazily, the attention masks per (past length, window)."""
    idx: torch.Tensor
    pos: int
    position_ids: torch.Tensor  # [1, T]
    rope: dict  # layer type -> (cos, sin) [1, T, hd]
    _masks: dict = field(default_factory=dict)


class _PastKV:
    """Stands in for transformers' `Cache` in one attention call: prepends the cached keys/values of
    earlier tokens (if any) and keeps this call's own, so the caller can cache them."""

    def __init__(self, k=None, v=None):
        self.past, self.k, self.v = (k, v), None, None

    def update(self, key_states, value_states, *args, **kwargs):
        self.k, self.v = key_states, value_states
        if self.past[0] is None:
            return key_states, value_states
        return torch.cat([self.past[0], key_states], dim=-2), torch.cat([self.past[1], value_states], dim=-2)


def _structure(layer: nn.Module) -> list:
    """A decoder layer's structure: module types, parameter shapes and plain attributes, except the
    per-layer ones. Layers with equal structures compute the same function of (weights, inputs)."""
    out = []
    for name, m in layer.named_modules():
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k not in PER_LAYER_ATTRS
                 and isinstance(v, (bool, int, float, str, type(None)))}
        shapes = [(n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)]
        out.append((name, type(m).__name__, sorted(attrs.items()), shapes))
    return out


class HFModel(nn.Module):
    """A transformers causal LM as a layer stack; see the module docstring. Build it with `load_hf`.

    hf: the `*ForCausalLM` model; path: the folder it came from (its tokenizer lives there too).
    """

    def __init__(self, hf: nn.Module, path: str | os.PathLike | None = None):
        super().__init__()
        c = hf.config
        if c.model_type not in SUPPORTED:
            raise ValueError(f"model type {c.model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
        if getattr(c, "use_bidirectional_attention", False):
            raise ValueError("this model attends bidirectionally (use_bidirectional_attention=True); "
                             "SNLP here needs a causal decoder")
        attn = getattr(c, "_attn_implementation", None)
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {attn!r} is not supported; load the model with "
                             f"attn_implementation='sdpa' or 'eager'")
        self.hf, self.path = hf, None if path is None else str(path)
        self.config = HFConfig.from_hf(c)
        self.backout_layer = None  # no nanochat backout: head(h) alone (snlp_lab.solvers.solver.backout_state)
        base = hf.get_decoder()
        if len({str(_structure(l)) for l in base.layers}) > 1:
            raise ValueError(f"the decoder layers of this {c.model_type} model differ in structure, so they "
                             f"cannot be evaluated as one batched call")
        # per layer: its rotary table's name (layer type) where the family has several, and its window
        rope_args = inspect.signature(base.rotary_emb.forward).parameters
        types = getattr(c, "layer_types", None)
        self._rope_type = [types[l] if "layer_type" in rope_args else None for l in range(c.num_hidden_layers)]
        self._window = [getattr(l.self_attn, "sliding_window", getattr(c, "sliding_window", None)) for l in base.layers]
        params = inspect.signature(base.layers[0].forward).parameters
        self._cache_kw = next(k for k in ("cache", "past_key_values", "past_key_value") if k in params)
        self._sdpa = attn == "sdpa"
        self._stack_key, self._stack = None, None

    # ----------------------------------------------------------------------------------- parts
    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (their matrices are what Muon trains, as our GPT's `blocks`)."""
        return self.hf.get_decoder().layers

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------- layer maps
    def embed(self, idx: torch.Tensor, pos: int = 0, prev: torch.Tensor | None = None):
        """h0 [B, T, D] (the family's input embedding) and the layers' context, for token ids idx [B, T]
        at positions pos..pos+T-1. `prev` (the token before idx, which nanochat's smear reads) is
        accepted for the decoder's sake and unused: these families have no smear."""
        cfg = self.config
        check_token_ids(idx, cfg.vocab_size, cfg.sequence_len, pos, "max_position_embeddings")
        T = idx.shape[1]
        base = self.hf.get_decoder()
        h0 = base.get_input_embeddings()(idx)
        position_ids = torch.arange(pos, pos + T, device=idx.device)[None]
        rope = {}
        for t in dict.fromkeys(self._rope_type):
            rope[t] = base.rotary_emb(h0, position_ids) if t is None else base.rotary_emb(h0, position_ids, t)
        return h0, HFContext(idx=idx, pos=pos, position_ids=position_ids, rope=rope)

    def _mask(self, ctx: HFContext, past_len: int, window: int | None, dtype, explicit: bool = False):
        """Additive mask [1, 1, T, past_len + T]: query i (absolute past_len + i) sees key j iff
        j <= past_len + i and, in a sliding-window layer, past_len + i - j < window (transformers' rule).

        None where SDPA needs none, as transformers passes it: no window reached and either no earlier
        tokens (SDPA's own causal masking) or one new token (it sees every key). Besides speed, this keeps
        single-token decoding off the fused CUDA kernels' masked paths (cuDNN failed there, torch 2.11).
        The eager attention (Gemma 2) always gets the mask; `explicit` asks for it in any case."""
        T = ctx.idx.shape[1]
        if (self._sdpa and not explicit and (window is None or past_len + T <= window)
                and (past_len == 0 or T == 1)):
            return None
        key = (past_len, window, dtype)
        if key not in ctx._masks:
            dev = ctx.idx.device
            q = past_len + torch.arange(T, device=dev)[:, None]
            k = torch.arange(past_len + T, device=dev)[None, :]
            ok = k <= q
            if window is not None:
                ok &= q - k < window
            m = torch.zeros(ok.shape, dtype=dtype, device=dev).masked_fill(~ok, torch.finfo(dtype).min)
            ctx._masks[key] = m[None, None]
        return ctx._masks[key]

    def _layer_kwargs(self, l: int, ctx: HFContext, past_len: int, dtype) -> dict:
        return {"attention_mask": self._mask(ctx, past_len, self._window[l], dtype),
                "position_embeddings": ctx.rope[self._rope_type[l]], "position_ids": ctx.position_ids}

    def layer(self, l: int, h: torch.Tensor, ctx: HFContext) -> torch.Tensor:
        """Φ_l(h) for one layer (0-based): the family's decoder layer, [B, T, D] -> [B, T, D]."""
        return self.layers(l, l + 1, h.unsqueeze(0), ctx)[0]

    def layers(self, start: int, stop: int, H: torch.Tensor, ctx: HFContext, past=None, return_kv: bool = False):
        """Φ_start..Φ_{stop-1} on inputs H [N = stop - start, B, T, D]: one batched call (vmap over the
        stacked layers); a single layer runs its module directly. `past` = (k, v) [N, B, Hkv, Tpast, hd]
        of earlier tokens; with `return_kv` also returns the keys/values of these tokens."""
        N, Tp = stop - start, 0 if past is None else past[0].shape[-2]
        kws = [self._layer_kwargs(l, ctx, Tp, H.dtype) for l in range(start, stop)]
        if N == 1:
            cache = _PastKV(*(p[0] for p in past)) if past is not None else _PastKV() if return_kv else None
            out = self.blocks[start](H[0], **kws[0], **{self._cache_kw: cache})
            out = (out[0] if isinstance(out, tuple) else out).unsqueeze(0)
            return (out, (cache.k.unsqueeze(0), cache.v.unsqueeze(0))) if return_kv else out
        masks = [kw["attention_mask"] for kw in kws]
        if any(m is None for m in masks) and not all(m is None for m in masks):  # one stack: all explicit
            masks = [self._mask(ctx, Tp, self._window[l], H.dtype, explicit=True) for l in range(start, stop)]
        mask = None if masks[0] is None else torch.stack(masks)
        cos = torch.stack([kw["position_embeddings"][0] for kw in kws])
        sin = torch.stack([kw["position_embeddings"][1] for kw in kws])
        template, pos_ids = self.blocks[start], ctx.position_ids

        def one(params, h, mask, cos, sin, pk, pv):
            cache = _PastKV(pk, pv) if (pk is not None or return_kv) else None
            out = functional_call(template, params, (h,), {"attention_mask": mask, "position_embeddings": (cos, sin),
                                                           "position_ids": pos_ids, self._cache_kw: cache})
            out = out[0] if isinstance(out, tuple) else out
            return (out, cache.k, cache.v) if return_kv else out

        pk, pv = past if past is not None else (None, None)
        dims = (0, 0, None if mask is None else 0, 0, 0, None if pk is None else 0, None if pv is None else 0)
        # Attention runs on SDPA's math kernel here, batched over the layers like the rest: the fused
        # kernels' vmap support is missing on a CPU (vmap would loop over the layers) and, on CUDA, failed
        # for masked bf16 inputs (torch 2.11)
        with sdpa_kernel(SDPBackend.MATH):
            res = torch.vmap(one, in_dims=dims)(self._stacked(start, stop), H, mask, cos, sin, pk, pv)
        return (res[0], (res[1], res[2])) if return_kv else res

    def _stacked(self, start: int, stop: int) -> dict:
        """Parameters and buffers of layers start..stop-1 stacked on a leading axis, by name.

        Under autograd they are stacked on every call (gradients flow to the layers). Without it, the
        stack of the last range asked for is kept until the range or a parameter changes: one copy of
        those layers' weights at most (solvers and decoders ask for the same range again and again)."""
        def stack():
            named = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in self.blocks[start:stop]]
            return {k: torch.stack([d[k] for d in named]) for k in named[0]}
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.blocks.parameters()):
            return stack()
        key = (start, stop, param_key(self.blocks))
        if key != self._stack_key:
            self._stack_key, self._stack = None, None  # free the old copy before making the new one
            self._stack_key, self._stack = key, stack()
        return self._stack

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] in float32 at least: final norm, lm_head, and the family's final soft-cap."""
        logits = self.lm_head(self.hf.get_decoder().norm(h))
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def resid_scale(self, l: int) -> torch.Tensor:
        """1: a plain pre-norm residual layer (the scaled-IDN surrogate is then IDN)."""
        p = next(self.parameters())
        return torch.ones((), dtype=p.dtype, device=p.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Sequential forward through our layer maps: logits, or the mean cross-entropy with targets."""
        h, ctx = self.embed(idx)
        for l in range(self.n_layer):
            h = self.layer(l, h, ctx)
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    # ----------------------------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """A Hugging Face folder (config, safetensors weights and the source folder's tokenizer) that
        `load_hf` and transformers load back."""
        self.hf.save_pretrained(folder)
        if self.path is not None:
            tok = _tokenizer(self.path)
            if tok is not None:
                tok.save_pretrained(folder)


HF_REMEDY = ("the folder is incomplete or damaged: save it again with save_pretrained, or copy it again from "
             "where it came from")


def _tokenizer(path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def resolve_dtype(dtype) -> torch.dtype | str:
    """None -> float32; a torch dtype or its name as given; "auto" -> the folder's saved dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; valid: None (float32), auto, {', '.join(DTYPES)} or a torch dtype")


def hf_config(path: str | os.PathLike):
    """The transformers config of a local folder, checked to be a supported causal LM (no weights read)."""
    from transformers import AutoConfig
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json in it); give a folder "
                         f"written by save_pretrained")
    try:
        c = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers' errors for a damaged config.json are of many classes
        raise DamagedFileError(p / "config.json", f"transformers cannot read this config ({first_line(e)})",
                               HF_REMEDY) from None
    c = getattr(c, "text_config", None) if c.model_type not in SUPPORTED and hasattr(c, "text_config") else c
    if c is None or c.model_type not in SUPPORTED:
        kind = c.model_type if c is not None else "?"
        raise ValueError(f"{path} holds a {kind!r} model, which is not a supported causal LM; "
                         f"supported model types: {', '.join(SUPPORTED)}")
    return c


def load_hf(path: str | os.PathLike, dtype=None) -> HFModel:
    """Load the causal LM in a local Hugging Face folder as a layer stack (`HFModel`), on the CPU.

    path: any folder `transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`
    loads, of a family in `SUPPORTED`, or a run folder of `snlp_lab.train` that fine-tuned one.
    dtype: None (float32: exact comparisons, fast CPU kernels), "auto" (the dtype saved in the folder),
    or a torch dtype / its name ("bfloat16" halves the memory; on a GPU the usual choice).
    Raises ValueError for a folder that is not a supported causal LM, naming the supported families.
    The model is in eval mode; call `.to(device)` to move it.
    """
    import transformers
    from packaging.version import Version
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ValueError(f"snlp_lab.models.hf needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}")
    dt = resolve_dtype(dtype)
    if has_checkpoint(path):  # a training run folder: its latest weights
        path = hf_weights_folder(path)
    hf_config(path)
    for f in sorted(Path(path).expanduser().glob("*.safetensors")):  # a damaged shard is named as such
        check_safetensors(f, remedy=HF_REMEDY)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(path).expanduser(), local_files_only=True, dtype=dt)
    except Exception as e:  # a truncated model.safetensors is a SafetensorError, a bad .bin a pickle error...
        raise DamagedFileError(path, f"transformers cannot load its weights as a causal LM ({first_line(e)})",
                               HF_REMEDY) from None
    return HFModel(hf, path).eval()
