"""Training with the SNLP-aware regulariser: config, optimizers and schedules, the loop, cached runs."""
