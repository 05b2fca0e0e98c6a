"""KV-cached decoding with SNLP: the cache, the compiled step, `Decoder`, and lossless self-speculative decoding."""
