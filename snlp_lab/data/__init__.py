"""Data: corpora, the byte-level BPE tokenizer, cached token arrays, training streams and validation
batches (`snlp_lab.data.corpus`)."""
from .corpus import (BOS, MAX_VOCAB, MIN_VOCAB, VAL_PERCENT, Corpus, Dataset, PretrainedTokenizer, Tokenizer,
                     TokenStream, encode_split, load_corpus, prepare_data, python_corpus, python_roots, token_dtype,
                     val_batches)

__all__ = ["BOS", "MAX_VOCAB", "MIN_VOCAB", "VAL_PERCENT", "Corpus", "Dataset", "PretrainedTokenizer", "Tokenizer",
           "TokenStream", "encode_split", "load_corpus", "prepare_data", "python_corpus", "python_roots", "token_dtype",
           "val_batches"]
