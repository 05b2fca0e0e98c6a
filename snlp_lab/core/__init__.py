"""Bottom layer, imports nothing else of snlp_lab: the cache folder, parameter checks and command-line plumbing."""
