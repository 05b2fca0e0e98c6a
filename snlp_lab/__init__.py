"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments."""
from .config import PRESETS, GPTConfig, get_config
from .model import GPT, build_model
from .solve import SURROGATES, NonFiniteError, SolveResult, methods, register_surrogate, solve
from . import diagnostics, jacobian

__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "methods", "register_surrogate", "solve", "diagnostics", "jacobian"]
