"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments.

    model = snlp_lab.build_model("cpu")                          # presets: snlp_lab.PRESETS
    res = snlp_lab.solve(model, idx, method="idn", iters=2, n_par=8, chunks="4xF2")
    tokens = snlp_lab.generate(model, prompt, 32, method="idn", iters=1, n_par=8)   # KV-cached
    model = snlp_lab.trained_model("cpu-plain", steps=300, reg="idn")               # cached training
    model = snlp_lab.load_hf("~/models/Qwen2.5-0.5B")    # a local Hugging Face folder as a layer stack
"""
from .config import PRESETS, GPTConfig, get_config
from .model import GPT, build_model
from .solve import SURROGATES, NonFiniteError, SolveResult, methods, register_surrogate, solve
from .mhc import MHCGPT  # also registers the "hcn" surrogate
from .decode import Decoder, generate
from .data import prepare_data
from .evaluate import evaluate_ppl
from .checkpoint import load_checkpoint, save_checkpoint
from .hf import HFModel, load_hf
# `train` stays the module (snlp_lab.train.train is the function), as `python -m snlp_lab.train` expects
from .train import TrainConfig, trained_model
from . import diagnostics, jacobian, mhc

__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "MHCGPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "methods", "register_surrogate", "solve", "Decoder", "generate", "prepare_data",
           "evaluate_ppl", "load_checkpoint", "save_checkpoint", "HFModel", "load_hf", "TrainConfig", "trained_model",
           "diagnostics", "jacobian", "mhc"]
