"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments."""
from .config import PRESETS, GPTConfig, get_config
from .model import GPT, build_model
from .solve import SURROGATES, NonFiniteError, SolveResult, methods, register_surrogate, solve
from .mhc import MHCGPT  # also registers the "hcn" surrogate
from . import diagnostics, jacobian, mhc

__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "MHCGPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "methods", "register_surrogate", "solve", "diagnostics", "jacobian", "mhc"]
