"""nanochat checkpoints: `load_nanochat(folder)` builds the matching model and loads its weights.

A nanochat checkpoint folder (written by `nanochat/checkpoint_manager.save_checkpoint`, e.g.
base_checkpoints/d32/) holds, per saved step,

    model_<step:06d>.pt      torch.save of the state dict (embeddings may be bf16)
    meta_<step:06d>.json     {"model_config": dataclasses.asdict(GPTConfig), ...training metadata}

The paper's models come from nanochat-snlp, whose GPTConfig adds mHC fields (use_mhc, mhc_num_streams,
mhc_sinkhorn_iters, mhc_sinkhorn_tau) and multi-token prediction heads (training only; not loaded).

    model = load_nanochat("base_checkpoints/d32")          # newest step, eval mode, float32
    res = snlp_lab.solve(model, idx, method="idn", iters=2, n_par=12)

Weight map (nanochat name -> ours): transformer.wte -> wte, transformer.h.{i} -> blocks.{i} (attn.c_q,
c_k, c_v, c_proj, ve_gate; mlp.c_fc, c_proj), lm_head, value_embeds.{i}, resid_lambdas, x0_lambdas,
smear_gate, smear_lambda, backout_lambda under their own names. mHC: transformer.h.{i}.hc_attn and
.hc_mlp hold H_res_logits [n, n], H_pre_logits [n], H_post_logits [n] per layer; ours stacks them as
mix.res [L, 2, n, n], mix.pre and mix.post [L, 2, n] (sublayer 0 = attention, 1 = MLP). The transform
is that stacking only: our "softmax" maps compute exactly what nanochat-snlp does from the same logits
(H^pre, H^post = softmax(logits), H^res = Sinkhorn(logits / τ), mhc_sinkhorn_iters rounds, no rounding
to exact double stochasticity). nanochat always saves resid/x0 lambdas and every value embedding,
also when its config switches them off (no_x0_resid, no_ve); those are skipped, as nanochat's forward
skips them. Rows of a vocabulary padded to a multiple of 64 are cut to vocab_size (nanochat crops its
logits the same way).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch

from ..core.files import DamagedFileError, field, first_line, read_bytes, read_json, read_torch
from .config import GPTConfig
from .build import build_model

_MODEL_FILE = re.compile(r"model_(\d+)\.pt")
# nanochat-snlp GPTConfig fields this loader understands (those it does not model are checked below)
NANOCHAT_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                   "no_x0_resid", "no_ve", "use_mhc", "mhc_num_streams", "mhc_sinkhorn_iters", "mhc_sinkhorn_tau",
                   "num_mtp_steps", "mtp_loss_weight")


def is_nanochat_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder holding nanochat's model_<step>.pt files."""
    path = Path(path)
    return path.is_dir() and any(_MODEL_FILE.fullmatch(p.name) for p in path.iterdir())


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """The steps saved in a nanochat checkpoint folder, ascending."""
    return sorted(int(m[1]) for p in Path(path).iterdir() if (m := _MODEL_FILE.fullmatch(p.name)))


# their types in meta_<step>.json (nanochat's GPTConfig annotations)
FIELD_TYPES = {"window_pattern": str, "no_x0_resid": bool, "no_ve": bool, "use_mhc": bool, "mhc_sinkhorn_tau": float,
               "mtp_loss_weight": float}
REMEDY = ("the nanochat checkpoint folder is damaged: copy the step's model_<step>.pt and meta_<step>.json "
          "again from where nanochat saved them")


def read_meta(meta_file: str | os.PathLike) -> GPTConfig:
    """Our GPTConfig for a nanochat meta_<step>.json (`nanochat_config` of its model_config), checked:
    DamagedFileError naming the file when it is missing, not JSON, or its config has a missing field,
    a value of the wrong type or one that fails the checks."""
    what = "nanochat meta file"
    mc = field(meta_file, read_json(meta_file, what, REMEDY), "model_config", dict, what, REMEDY)
    for name in mc:
        if name in NANOCHAT_FIELDS:
            field(meta_file, mc, name, FIELD_TYPES.get(name, int), what, REMEDY)
    try:
        return nanochat_config(mc)
    except (TypeError, ValueError) as e:
        raise DamagedFileError(meta_file, f"is not a valid {what}: {first_line(e)}", REMEDY) from None


def nanochat_config(model_config: dict) -> GPTConfig:
    """Our GPTConfig for nanochat's `model_config` (meta_<step>.json): nanochat's architecture
    (q, k scale 1.2, VE gate on 12 normalised channels, smear, backout, RoPE base 100000, short window
    ceil(sequence_len/4/128)·128) with the saved sizes and switches."""
    unknown = sorted(set(model_config) - set(NANOCHAT_FIELDS))
    if unknown:
        raise ValueError(f"nanochat model_config has field(s) {unknown} this loader does not know; "
                         f"known: {', '.join(NANOCHAT_FIELDS)}")
    c = {"window_pattern": "SSSL", "no_x0_resid": False, "no_ve": False, "use_mhc": False, "mhc_num_streams": 4,
         "mhc_sinkhorn_iters": 10, "mhc_sinkhorn_tau": 0.05, **model_config}
    missing = [k for k in NANOCHAT_FIELDS[:6] if k not in c]
    if missing:
        raise ValueError(f"nanochat model_config lacks field(s) {missing}")
    if c["no_ve"] and not c["no_x0_resid"]:
        raise ValueError("nanochat model_config has x0 lambdas without value embeddings (no_ve=True, "
                         "no_x0_resid=False); snlp_lab models x0 lambdas only with value embeddings (x0ve)")
    return GPTConfig(sequence_len=c["sequence_len"], vocab_size=c["vocab_size"], n_layer=c["n_layer"],
                     n_head=c["n_head"], n_kv_head=c["n_kv_head"], n_embd=c["n_embd"],
                     window_pattern=c["window_pattern"].upper(), x0ve=not c["no_ve"],
                     no_x0_resid=c["no_x0_resid"] and not c["no_ve"],
                     n_streams=c["mhc_num_streams"] if c["use_mhc"] else 1,
                     mhc_sinkhorn_iters=c["mhc_sinkhorn_iters"], mhc_sinkhorn_tau=c["mhc_sinkhorn_tau"],
                     mhc_maps="softmax").validate()


def _our_name(key: str) -> str:
    if key.startswith("transformer.wte."):
        return "wte." + key[len("transformer.wte."):]
    if key.startswith("transformer.h."):
        return "blocks." + key[len("transformer.h."):]
    return key


def convert_state_dict(state: dict, model) -> dict:
    """nanochat's state dict -> ours for `model` (same dtype as the model's parameters).
    ValueError naming any unknown, missing or mis-shaped key."""
    cfg, ours = model.config, model.state_dict()
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    out, skipped = {}, []
    mhc = re.compile(r"transformer\.h\.(\d+)\.hc_(attn|mlp)\.H_(res|pre|post)_logits")
    mix = {}
    for key, val in state.items():
        if m := mhc.fullmatch(key):
            mix[(int(m[1]), 0 if m[2] == "attn" else 1, m[3])] = val
            continue
        name = _our_name(key)
        if name not in ours:
            unused = ((key in ("resid_lambdas", "x0_lambdas") and not cfg.x0_lambdas)
                      or (key.startswith("value_embeds.") and not cfg.x0ve) or key.startswith("mtp_projs."))
            if unused:  # saved by nanochat, not read by its forward with this config
                skipped.append(key)
                continue
            raise ValueError(f"unknown key {key!r} in the nanochat checkpoint (no parameter {name!r} in a "
                             f"model with this config)")
        if name in ("wte.weight", "lm_head.weight") or name.startswith("value_embeds."):
            val = val[:cfg.vocab_size]  # nanochat pads the vocabulary to a multiple of 64
        out[name] = val
    if cfg.n_streams > 1:
        L, n = cfg.n_layer, cfg.n_streams
        for kind, shape in (("res", (n, n)), ("pre", (n,)), ("post", (n,))):
            per = []
            for l in range(L):
                for sub, sub_name in enumerate(("attn", "mlp")):
                    key = f"transformer.h.{l}.hc_{sub_name}.H_{kind}_logits"
                    if (l, sub, kind) not in mix:
                        raise ValueError(f"missing key {key!r} in the nanochat checkpoint")
                    v = mix.pop((l, sub, kind))
                    if tuple(v.shape) != shape:
                        raise ValueError(f"key {key!r} has shape {tuple(v.shape)}, expected {shape}")
                    per.append(v)
            out[f"mix.{kind}"] = torch.stack(per).view(L, 2, *shape)
    if mix:
        l, sub, kind = next(iter(mix))
        raise ValueError(f"unknown key 'transformer.h.{l}.hc_{('attn', 'mlp')[sub]}.H_{kind}_logits' in the "
                         f"nanochat checkpoint (the config has no mHC layer for it)")
    missing = sorted(set(ours) - set(out))
    if missing:
        raise ValueError(f"missing key(s) {missing} (our names) in the nanochat checkpoint")
    for name, val in out.items():
        if val.shape != ours[name].shape:
            raise ValueError(f"key {name!r} (ours) has shape {tuple(val.shape)} in the checkpoint, "
                             f"expected {tuple(ours[name].shape)}")
        out[name] = val.to(ours[name].dtype)
    return out


def load_nanochat(path: str | os.PathLike, step: int | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """The model of a nanochat checkpoint folder at `step` (default: the newest), in eval mode.

    path: the folder with model_<step:06d>.pt and meta_<step:06d>.json. The config comes from the meta
    file (`nanochat_config`), the weights are mapped by `convert_state_dict` and cast to `dtype`.
    When nanochat's tokenizer lies beside the folder (tokenizer/tokenizer.pkl in the folder or one or
    two levels up, as nanochat's base_dir has it) it is attached as `model.tokenizer` (else None;
    always None with tokenizer=False, which reads no tokenizer).
    Raises ValueError for a missing folder or step and for unknown, missing or mis-shaped keys.
    """
    path = Path(path)
    if not is_nanochat_checkpoint(path):
        raise ValueError(f"{path} is not a nanochat checkpoint folder (no model_<step>.pt files)")
    steps = checkpoint_steps(path)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no step {step} in {path}; saved steps: {', '.join(map(str, steps))}")
    cfg = read_meta(path / f"meta_{step:06d}.json")
    weights = path / f"model_{step:06d}.pt"
    state = read_torch(weights, "nanochat model file", REMEDY)
    model = build_model(cfg).to(dtype)
    try:
        model.load_state_dict(convert_state_dict(state, model))
    except (ValueError, RuntimeError, AttributeError, TypeError) as e:  # keys, shapes, non-tensor values
        raise DamagedFileError(weights, f"does not fit the config of its meta file ({first_line(e)})", REMEDY) from None
    model.tokenizer = load_nanochat_tokenizer(path) if tokenizer else None
    return model.to(device).eval()


class NanochatTokenizer:
    """nanochat's tokenizer (a tiktoken Encoding) with the interface of `snlp_lab.data.Tokenizer` that
    the commands use: bos_id (nanochat's <|bos|>), encode, encode_batch, decode, vocab_size. Text is
    encoded without special tokens, as nanochat encodes documents before prepending BOS."""

    BOS = "<|bos|>"

    def __init__(self, enc, digest: str = ""):
        self.enc = enc
        self.bos_id = enc.encode_single_token(self.BOS)
        self.vocab_size = enc.n_vocab
        self.digest = digest  # sha256 of the pickle it came from

    def pickle(self) -> bytes:
        """The tiktoken Encoding as nanochat stores it (tokenizer/tokenizer.pkl)."""
        return pickle.dumps(self.enc)

    def fingerprint(self) -> str:
        """Names the data cache of text it encoded (`snlp_lab.data.prepare_data`)."""
        return self.digest or hashlib.sha256(repr(sorted(self.enc._mergeable_ranks.items())).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def load_nanochat_tokenizer(path: str | os.PathLike):
    """nanochat's tokenizer (tokenizer/tokenizer.pkl, a pickled tiktoken Encoding) found in the
    checkpoint folder or up to two levels above it, as a `NanochatTokenizer`; None when there is none.
    Unpickling runs code: load only folders you trust."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        pkl = folder / "tokenizer" / "tokenizer.pkl"
        if pkl.is_file():
            blob = read_bytes(pkl, "nanochat tokenizer")
            try:
                return NanochatTokenizer(pickle.loads(blob), hashlib.sha256(blob).hexdigest())
            except ModuleNotFoundError as e:
                raise ValueError(f"nanochat's tokenizer {pkl} needs the package {e.name!r}: "
                                 f"pip install {e.name}") from None
            except Exception as e:  # a truncated pickle, or one that holds no tiktoken Encoding with <|bos|>
                raise DamagedFileError(pkl, f"is not a nanochat tokenizer (a pickled tiktoken Encoding with "
                                            f"{NanochatTokenizer.BOS}): {first_line(e)}",
                                       "copy tokenizer/tokenizer.pkl again from nanochat's base folder") from None
    return None
