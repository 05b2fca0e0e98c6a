"""`build_model`: a preset name or a config -> a freshly initialised model of the class it needs.

It sits above both model classes (`snlp_lab.models.model.GPT`, `snlp_lab.mhc.MHCGPT`), so that neither imports
the other to build it.
"""
from __future__ import annotations

from .config import GPTConfig, get_config
from .mhc import MHCGPT
from .model import GPT


def build_model(preset: str | GPTConfig = "tiny", **overrides) -> GPT:
    """A freshly initialised model for a preset name (see `snlp_lab.PRESETS`) or a `GPTConfig`, with
    config overrides (nanochat field names): a `GPT`, or an `MHCGPT` when the config has n_streams > 1.
    Raises ValueError naming the valid presets or fields."""
    cfg = get_config(preset, **overrides)
    return MHCGPT(cfg) if cfg.n_streams > 1 else GPT(cfg)
