"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments.

    model = snlp_lab.build_model("cpu")                          # presets: snlp_lab.PRESETS
    res = snlp_lab.solve(model, idx, method="idn", iters=2, n_par=8, chunks="4xF2")
    tokens = snlp_lab.generate(model, prompt, 32, method="idn", iters=1, n_par=8)   # KV-cached
    tokens, stats = snlp_lab.speculative_generate(model, prompt, 32, draft="idn:K=1:n=8", block=4)  # lossless
    model = snlp_lab.trained_model("cpu-plain", steps=300, reg="idn")               # cached training
    model = snlp_lab.load_nanochat("base_checkpoints/d32")                          # a nanochat checkpoint
    model = snlp_lab.load_hf("~/models/Qwen2.5-0.5B")    # a local Hugging Face folder as a layer stack
"""
from .config import PRESETS, GPTConfig, get_config
from .build import build_model
from .model import GPT
from .snlp_config import SURROGATES, SNLPConfig, methods, parse_config, register_surrogate
from .solver import NonFiniteError, SolveResult, solve
from .mhc import MHCGPT  # also registers the "hcn" surrogate
from .decode import Decoder, generate
from .speculative import SpeculativeStats, speculative_generate
from .data import prepare_data
from .checkpoint import load_checkpoint, save_checkpoint
from .nanochat import load_nanochat
from .hf import HFModel, load_hf
from . import diagnostics, jacobian, mhc

# Modules that are also commands (`python -m snlp_lab.train`, `... .evaluate`) load on first use: imported
# here, `python -m` would find them loaded already and run a second copy (runpy warns). `train` stays the
# module (snlp_lab.train.train is the function).
_ON_USE = {"TrainConfig": "train", "trained_model": "train", "evaluate_ppl": "evaluate",
           "train": "train", "evaluate": "evaluate"}


def __getattr__(name: str):
    if name in _ON_USE:
        import importlib
        module = importlib.import_module(f".{_ON_USE[name]}", __name__)
        return module if name == _ON_USE[name] else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "MHCGPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "SNLPConfig", "parse_config", "methods", "register_surrogate", "solve", "Decoder", "generate", "speculative_generate",
           "SpeculativeStats", "prepare_data", "evaluate_ppl", "load_checkpoint", "save_checkpoint", "load_nanochat",
           "HFModel", "load_hf", "TrainConfig", "trained_model",
           "diagnostics", "jacobian", "mhc"]
