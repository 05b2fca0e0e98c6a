"""Models as layer stacks h_l = Φ_l(h_{l-1}) (docs/design.md §2): the nanochat GPT, mHC, fused chunks, presets,
the nanochat and Hugging Face adapters, run folders, and the one loader (`loader.load_model`)."""
