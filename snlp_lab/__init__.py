"""snlp_lab: Structured Newton Layer Parallelism — models, solvers, training and experiments.

    model = snlp_lab.build_model("cpu")                          # presets: snlp_lab.PRESETS
    res = snlp_lab.solve(model, idx, method="idn", iters=2, n_par=8, chunks="4xF2")
    tokens = snlp_lab.generate(model, prompt, 32, method="idn", iters=1, n_par=8)   # KV-cached
    tokens, stats = snlp_lab.speculative_generate(model, prompt, 32, draft="idn:K=1:n=8", block=4)  # lossless
    model = snlp_lab.trained_model("cpu-plain", steps=300, reg="idn")               # cached training
    model = snlp_lab.load_nanochat("base_checkpoints/d32")                          # a nanochat checkpoint
    model = snlp_lab.load_hf("~/models/Qwen2.5-0.5B")    # a local Hugging Face folder as a layer stack
    m = snlp_lab.load_model("runs/abc")   # any of these (preset, run, nanochat or HF folder): m.model, m.tokenizer

The package's layers, each importing only from those before it: core, data, models, solvers, decoding and
training, measurement, lab (docs/design.md). The modules beside this file are the `python -m` commands.
"""
import sys
import types

from .models.config import PRESETS, GPTConfig, get_config
from .models.build import build_model
from .core.files import DamagedFileError, DiskFullError
from .models.model import GPT
from .models.mhc import MHCGPT
from .models.checkpoint import load_checkpoint, save_checkpoint
from .models.nanochat import load_nanochat
from .models.hf import HFModel, load_hf
from .models.loader import LoadedModel, load_model
from .solvers.grammar import SNLPConfig, parse_config
from .solvers.surrogates import SURROGATES, NonFiniteError, methods, register_surrogate
from .solvers.solver import SolveResult, solve
from .solvers.ppl import evaluate_ppl
from .solvers import diagnostics, jacobian
from .models import mhc
from .decoding.decoder import Decoder, generate
from .decoding.speculative import SpeculativeStats, speculative_generate
from .data import prepare_data
from .training import TrainConfig, trained_model

__all__ = ["PRESETS", "GPTConfig", "get_config", "GPT", "MHCGPT", "build_model", "SURROGATES", "NonFiniteError",
           "SolveResult", "SNLPConfig", "parse_config", "methods", "register_surrogate", "solve", "Decoder", "generate",
           "speculative_generate", "SpeculativeStats", "prepare_data", "evaluate_ppl", "load_checkpoint",
           "save_checkpoint", "load_nanochat", "HFModel", "load_hf", "load_model", "LoadedModel", "TrainConfig",
           "trained_model", "diagnostics", "jacobian", "mhc", "DamagedFileError", "DiskFullError"]


class _Package(types.ModuleType):
    """Importing a command module (`snlp_lab.generate`, ...) sets it as an attribute of the package; a
    name of the public API must stay what `__all__` says (`snlp_lab.generate` is the function)."""

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, types.ModuleType) and name in self.__dict__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
