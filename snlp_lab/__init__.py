"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments.

    model = snlp_lab.build_model("cpu")                          # presets: snlp_lab.PRESETS
    res = snlp_lab.solve(model, idx, method="idn", iters=2, n_par=8, chunks="4xF2")
    tokens = snlp_lab.generate(model, prompt, 32, method="idn", iters=1, n_par=8)   # KV-cached
    model = snlp_lab.trained_model("cpu-plain", steps=300, reg="idn")               # cached training
    model = snlp_lab.load_nanochat("base_checkpoints/d32")                          # a nanochat checkpoint
    model = snlp_lab.load_hf("~/models/Qwen2.5-0.5B")    # a local Hugging Face folder as a layer stack
"""
from .config import PRESETS, GPTConfig, get_config
from .model import GPT, build_model
from .solve import SURROGATES, NonFiniteError, SolveResult, methods, register_surrogate, solve
from .mhc import MHCGPT  # also registers the "hcn" surrogate
from .decode import Decoder, generate
from .data import prepare_data
from .checkpoint import load_checkpoint, save_checkpoint
from .nanochat import load_nanochat
from .hf import HFModel, load_hf
from . import diagnostics, jacobian, mhc

# Names from the command-line modules (python -m snlp_lab.train, .evaluate, ...) load on first use:
# imported here, each would already be in sys.modules when runpy runs it as __main__ (a warning and a
# second copy of the module). `train` stays the module (snlp_lab.train.train is the function).
_LAZY = {"evaluate_ppl": "evaluate", "TrainConfig": "train", "trained_model": "train"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "MHCGPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "methods", "register_surrogate", "solve", "Decoder", "generate", "prepare_data",
           "evaluate_ppl", "load_checkpoint", "save_checkpoint", "load_nanochat", "HFModel", "load_hf", "TrainConfig", "trained_model",
           "diagnostics", "jacobian", "mhc"]
