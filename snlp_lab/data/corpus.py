"""Data and tokenizer layer: corpus -> byte-level BPE -> cached uint16 token arrays -> batches.

Quick start::

    from snlp_lab.data import prepare_data, TokenStream, val_batches

    ds = prepare_data()                     # stdlib corpus, 4096-token BPE, cached on disk
    stream = TokenStream(ds.train, batch_size=8, seq_len=256, seed=0)
    x, y = next(stream)                     # int64 [8, 256]; y is x shifted left by one token
    for x, y in val_batches(ds.val, seq_len=256, batch_size=8):
        ...                                 # fixed windows for perplexity

Corpora (``load_corpus(source)``)
    ``"stdlib"`` (default)
        The ``.py`` files of the running interpreter's standard library
        (``sysconfig.get_paths()["stdlib"]``): always there, nothing to download. Left out as noise:
        the folders in ``STDLIB_EXCLUDED_DIRS`` at any depth (third-party packages, the test suites,
        IDLE, lib2to3, turtledemo, the generated codec tables in ``encodings``, the generated
        ``pydoc_data/topics.py``), build folders ``config-*``, the generated ``_sysconfigdata_*.py``,
        and hidden files and folders. The corpus differs between Python versions, so its metadata
        records the version and a hash of the file list.
    a folder (or glob, or single file) of text files
        Read recursively. Every file whose first 8 KiB hold no NUL byte and decode as UTF-8 is a
        document (.txt, .md, .py, ... the extension does not matter); binaries, empty files,
        hidden files/folders and ``__pycache__`` are skipped.
    a folder (or glob, or single file) of parquet shards with a ``text`` column
        The format of nanochat's pretraining shards: one document per row. As soon as a folder or
        glob holds a ``.parquet`` file, only the parquet files are read.

Train/validation split
    A document is in validation iff ``crc32(key) % 100 < VAL_PERCENT`` (5), where the key is the
    file's relative path (``/``-separated) or ``"<shard relpath>:<row index>"`` for parquet rows.
    The rule looks at one document at a time, so adding or removing a file never moves another
    file across the split. Only for tiny corpora where the rule selects nothing, the one document
    with the smallest ``crc32(key) % 100`` (then smallest crc32) goes to validation, so that both
    splits are non-empty; a corpus with fewer than two documents is refused.

Tokenizer
    Byte-level BPE trained with HuggingFace ``tokenizers`` on a deterministic sample of about
    ``max_train_bytes`` of the training split (BPE training on all of a big corpus is slow and
    hardly better); the sample is spread over the whole split by a hash of the document keys.
    One special token, ``<|bos|>``, which starts every document.
    Or, with ``prepare_data(..., tokenizer=FOLDER)``, the tokenizer of a local Hugging Face model
    folder (``PretrainedTokenizer``): nothing is trained, every document starts with the model's BOS
    token (its EOS token where it has no BOS, as Qwen's), and tokens are stored as uint32 when the
    vocabulary exceeds 65536.

Cache
    ``prepare_data`` writes ``tokenizer.json``, ``train.npy``, ``val.npy`` (uint16) and
    ``meta.json`` (written last: it marks a complete entry) to ``cache_dir()/data/<key>/``, where
    the key hashes the corpus metadata (source, file list and sizes, ...), the vocabulary size and
    ``max_train_bytes`` (a pretrained tokenizer: a hash of its files instead; no tokenizer.json).
    An unchanged second call loads everything and trains nothing. Note that the
    file list hash uses sizes, not contents: an edit that keeps a file's size is not noticed
    (delete the cache folder). Files are written atomically, so an interrupted run leaves no
    half-written entry; concurrent callers (e.g. several ranks) each build the same files, so let
    one process prepare first.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..core.files import (DamagedFileError, atomic_write, atomic_write_text, first_line, read_bytes, read_json,
                          remove_stale, removed_on_failure, temporary_name)
from ..core.checks import check_int, check_seed
from ..core.paths import cache_dir

VAL_PERCENT = 5  # crc32(key) % 100 < VAL_PERCENT -> validation
BOS = "<|bos|>"
MAX_VOCAB = 2**16  # token ids are stored as uint16
MIN_VOCAB = 257  # 256 byte tokens + BOS
DEFAULT_MAX_TRAIN_BYTES = 10_000_000  # BPE training sample: ~2 s for 4096 tokens on 2 CPU cores
FORMAT_VERSION = 1  # bump when the split, sampling or file layout changes: it is part of the cache key

STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages",  # third-party code, not the standard library
    "test", "tests",  # the test suites (about 2/3 of the bytes)
    "idlelib", "lib2to3", "turtledemo",  # applications and demos
    "encodings",  # generated codec tables (hex literals)
    "pydoc_data",  # one generated 750 KB dict of help texts
    "__pycache__",
})

_HINT = ("pass a folder of text files (.txt, .md, .py, ...), a folder or glob of parquet shards "
         "with a 'text' column, or 'stdlib'")

# -----------------------------------------------------------------------------
# Corpus


@dataclass
class Corpus:
    """A text corpus split into training and validation documents. Build one with `load_corpus`.

    `meta` is a JSON-serialisable dict: kind, source, num_docs, train_docs, val_docs, total_bytes,
    train_bytes (exact for files, estimated from parquet metadata), files_sha256 (sha256 of the
    lines "<relpath>\\t<size>\\n" over the sorted file list), split rule, and for the stdlib corpus
    the Python version.
    """

    meta: dict
    _read: Callable[..., Iterator[tuple[str, str]]] = field(repr=False)

    def docs(self, split: str, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str]]:
        """(key, text) pairs of one split ("train" or "val"), in a fixed order.

        `keep(key)`, if given, filters documents by key before they are read.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        return self._read(split, keep)


def load_corpus(source: str | os.PathLike = "stdlib") -> Corpus:
    """Open a corpus: "stdlib", a folder/glob/file of text files, or of parquet shards.

    Only file names, sizes and parquet metadata are read here; documents are read lazily.
    Raises ValueError when the path does not exist or holds no text.
    """
    if isinstance(source, str) and source == "stdlib":
        return _stdlib_corpus()
    spec = os.path.expanduser(os.fspath(source))
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"no files match {spec!r}; {_HINT}")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
    elif not os.path.exists(spec):
        raise ValueError(f"data path {spec} does not exist; {_HINT}")
    elif os.path.isfile(spec):
        root, files = Path(spec).parent, [Path(spec)]
    else:
        root = Path(spec)
        files = list(_walk(root, skip_dir=lambda d: d.startswith(".") or d == "__pycache__"))
    files = [f for f in files if not f.name.startswith(".")]
    shards = [f for f in files if f.suffix == ".parquet"]
    if shards:
        return _parquet_corpus(spec, root, shards)
    return _files_corpus(spec, root, files, kind="files")


def _stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = lambda d: d in STDLIB_EXCLUDED_DIRS or d.startswith((".", "config-"))
    files = [p for p in _walk(root, skip)
             if p.suffix == ".py" and not p.name.startswith(("_sysconfigdata_", "."))]
    corpus = _files_corpus("stdlib", root, files, kind="stdlib")
    corpus.meta["python_version"] = platform.python_version()
    corpus.meta["excluded_dirs"] = sorted(STDLIB_EXCLUDED_DIRS) + ["config-*", ".*"]
    return corpus


def _walk(root: Path, skip_dir: Callable[[str], bool]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip_dir(d))  # prune in place
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _looks_like_text(path: Path) -> bool:
    """True if the file's first 8 KiB hold no NUL byte and decode as UTF-8 (binaries fail this)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:  # final=False: a multi-byte character cut at the 8 KiB boundary is fine
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _crc(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _val_mask(crcs: np.ndarray) -> np.ndarray:
    """The split rule on an array of crc32 values: True = validation (see the module docstring)."""
    mask = crcs % 100 < VAL_PERCENT
    if not mask.any() and len(crcs) >= 2:
        mask[np.lexsort((crcs, crcs % 100))[0]] = True  # tiny corpus: the doc nearest to the rule
    return mask


def _check_splits(source, n_train: int, n_val: int, unit: str) -> None:
    if n_train == 0 or n_val == 0:
        raise ValueError(
            f"data path {source} holds {n_train + n_val} {unit}, too few to split into training "
            f"and validation ({VAL_PERCENT}% of the {unit} go to validation); provide at least two "
            f"{unit}, e.g. cut a big text file into several files")


def _files_hash(names: list[str], sizes: list[int]) -> str:
    h = hashlib.sha256()
    for name, size in zip(names, sizes):
        h.update(f"{name}\t{size}\n".encode("utf-8"))
    return h.hexdigest()


def _files_corpus(source: str, root: Path, paths: list[Path], kind: str) -> Corpus:
    found = sorted((p.relative_to(root).as_posix(), p) for p in paths if _looks_like_text(p))
    if not found:
        raise ValueError(f"data path {source} holds no text files (non-empty, UTF-8); {_HINT}")
    rels = [rel for rel, _ in found]
    sizes = [p.stat().st_size for _, p in found]
    is_val = _val_mask(np.array([_crc(r) for r in rels], dtype=np.int64))
    splits = {"train": [r for r, v in zip(rels, is_val) if not v],
              "val": [r for r, v in zip(rels, is_val) if v]}
    _check_splits(source, len(splits["train"]), len(splits["val"]), "files")
    val_bytes = int(sum(s for s, v in zip(sizes, is_val) if v))
    meta = {
        "kind": kind, "source": source, "root": str(root),
        "num_files": len(rels), "num_docs": len(rels),
        "train_docs": len(splits["train"]), "val_docs": len(splits["val"]),
        "total_bytes": sum(sizes), "train_bytes": sum(sizes) - val_bytes, "val_bytes": val_bytes,
        "files_sha256": _files_hash(rels, sizes),
        "split": f"crc32(relpath) % 100 < {VAL_PERCENT} -> val",
    }

    def read(split: str, keep=None) -> Iterator[tuple[str, str]]:
        for rel in splits[split]:
            if keep is None or keep(rel):
                # errors="replace": only the first 8 KiB were checked; a stray bad byte later on
                # should not stop a long run
                yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")

    return Corpus(meta=meta, _read=read)


def _parquet_corpus(source: str, root: Path, shards: list[Path]) -> Corpus:
    import pyarrow.parquet as pq

    names, sizes, crcs_per_shard, text_bytes = [], [], [], 0
    for path in sorted(shards, key=lambda p: p.relative_to(root).as_posix()):
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        if "text" not in columns:
            raise ValueError(f"parquet shard {path} has no 'text' column (it has {columns}); "
                             f"store one document per row in a string column named 'text'")
        name = path.relative_to(root).as_posix()
        md = pf.metadata
        for g in range(md.num_row_groups):  # bytes of the text column, for the BPE sample rate
            rg = md.row_group(g)
            text_bytes += sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                              if rg.column(c).path_in_schema == "text")
        crcs = np.array([_crc(f"{name}:{i}") for i in range(md.num_rows)], dtype=np.int64)
        names.append(name)
        sizes.append(path.stat().st_size)
        crcs_per_shard.append(crcs)
    all_crcs = np.concatenate(crcs_per_shard)
    if len(all_crcs) == 0:
        raise ValueError(f"parquet shards at {source} hold no rows; {_HINT}")
    # apply the rule to all rows at once (the tiny-corpus fallback is global), then cut per shard
    all_val = _val_mask(all_crcs)
    cuts = np.cumsum([len(c) for c in crcs_per_shard])[:-1]
    masks = np.split(all_val, cuts)
    n_val = int(all_val.sum())
    n_train = len(all_val) - n_val
    _check_splits(source, n_train, n_val, "documents")
    meta = {
        "kind": "parquet", "source": source, "root": str(root),
        "num_files": len(names), "num_docs": len(all_val), "train_docs": n_train, "val_docs": n_val,
        "total_bytes": sum(sizes), "text_bytes_estimate": text_bytes,
        "train_bytes": int(text_bytes * n_train / len(all_val)),
        "files_sha256": _files_hash(names, sizes),
        "split": f"crc32('<shard>:<row>') % 100 < {VAL_PERCENT} -> val",
    }

    def read(split: str, keep=None) -> Iterator[tuple[str, str]]:
        want_val = split == "val"
        for name, is_val in zip(names, masks):
            row = 0
            for batch in pq.ParquetFile(root / name).iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column(0).to_pylist():
                    key = f"{name}:{row}"
                    if is_val[row] == want_val and text and (keep is None or keep(key)):
                        yield key, text
                    row += 1

    return Corpus(meta=meta, _read=read)


# -----------------------------------------------------------------------------
# Tokenizer


def _check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be between {MIN_VOCAB} (256 bytes + BOS) "
                         f"and {MAX_VOCAB} (token ids are stored as uint16)")


class Tokenizer:
    """Byte-level BPE with one special token, BOS = "<|bos|>"; a thin wrapper of HF `tokenizers`.

    Any string round-trips: decode(encode(s)) == s. Text that happens to contain "<|bos|>" is
    encoded as ordinary text; BOS ids are only inserted by the data pipeline.
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # never turn "<|bos|>" inside a document into BOS
        bos = self.hf.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"tokenizer has no {BOS} token; build it with Tokenizer.train")
        self.bos_id: int = bos

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train on an iterable of strings. The result may have fewer than vocab_size tokens when
        the text is too small to learn that many merges; `vocab_size` then reports the real size."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        _check_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS],  # first, so BOS gets id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (all ids are < vocab_size), BOS included."""
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many strings at once, in parallel threads."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_bos: bool = False) -> str:
        """Text of a list (or array, or 1-D tensor) of ids; BOS shows as "<|bos|>" unless skipped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.hf.decode(ids, skip_special_tokens=skip_bos)

    def fingerprint(self) -> str:
        """A hash of the tokenizer's JSON: names the data cache of text it encoded."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (atomically)."""
        atomic_write_text(path, self.hf.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike, remedy: str = "replace it with an intact copy") -> "Tokenizer":
        """The tokenizer saved at `path` (`save`). DamagedFileError naming the file when it is missing,
        not a tokenizers JSON (a truncated file) or has no BOS token."""
        from tokenizers import Tokenizer as HFTokenizer

        blob = read_bytes(path, "tokenizer file", remedy)
        try:
            return cls(HFTokenizer.from_str(blob.decode("utf-8")))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DamagedFileError(path, f"is not a tokenizer file of snlp_lab ({first_line(e)})", remedy) from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id})"


class PretrainedTokenizer:
    """The tokenizer of a local Hugging Face model folder (`transformers.AutoTokenizer`) with the
    interface of `Tokenizer`. `bos_id` is the id that starts every document: the tokenizer's BOS
    token, or its EOS token where it has none (then documents are separated by EOS, as Qwen's are)."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt")  # what defines a tokenizer: their hash names the data cache

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = str(Path(path).expanduser())
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot load a tokenizer from {path} (a Hugging Face model folder with "
                             f"tokenizer files is needed): {e}") from None
        bos = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.eos_token_id
        if bos is None:
            raise ValueError(f"the tokenizer in {path} has neither a BOS nor an EOS token to start documents with")
        self.bos_id: int = bos

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self.hf)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in self.FILES:
            f = Path(self.path) / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model's context are fine here (cut into windows later)
        return self.hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids, skip_bos: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.hf.decode(ids, skip_special_tokens=skip_bos)

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"


def _tokenizer_sample(corpus: Corpus, max_train_bytes: int) -> list[str]:
    """A deterministic sample of about max_train_bytes of training text, spread over the split.

    A document is kept when crc32("bpe:" + key) falls below a threshold set so that the kept
    documents add up to max_train_bytes on average; the sample is cut at max_train_bytes.
    """
    frac = min(1.0, max_train_bytes / max(corpus.meta["train_bytes"], 1))
    threshold = frac * 2**32
    keep = None if frac >= 1.0 else (lambda key: _crc("bpe:" + key) < threshold)
    sample, budget = [], max_train_bytes
    for _, text in corpus.docs("train", keep):
        data = text.encode("utf-8")
        if len(data) >= budget:
            sample.append(data[:budget].decode("utf-8", errors="ignore"))
            break
        sample.append(text)
        budget -= len(data)
    return sample


# -----------------------------------------------------------------------------
# Tokenized dataset, cached on disk


@dataclass
class Dataset:
    """Tokenized corpus: `train` and `val` are 1-D uint16 (uint32) arrays (memory-mapped from `path`),
    every document starting with `tokenizer.bos_id`. `cached` is True when nothing was trained
    or encoded (all loaded from the cache)."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer | PretrainedTokenizer
    meta: dict
    path: Path
    cached: bool = False


def prepare_data(source: str | os.PathLike | Corpus = "stdlib", vocab_size: int = 4096,
                 max_train_bytes: int = DEFAULT_MAX_TRAIN_BYTES,
                 cache: str | os.PathLike | None = None, progress: bool | None = None,
                 tokenizer=None) -> Dataset:
    """Load a corpus, train (or reuse) its tokenizer and tokenize it (or reuse the token arrays).

    source: see `load_corpus`, or a Corpus. vocab_size: BPE vocabulary, BOS included (<= 65536).
    max_train_bytes: size of the training-text sample the BPE is learned from.
    cache: folder holding the `<key>/` dataset folders; default `cache_dir()/"data"`.
    progress: show progress bars and messages; None = only on a terminal.
    tokenizer: instead of training a BPE, a local Hugging Face model folder whose tokenizer to use
    (`PretrainedTokenizer`), or a model's own tokenizer object (`encode`, `bos_id`, `vocab_size` and
    `fingerprint()`, e.g. a run's `Tokenizer` or nanochat's); vocab_size and max_train_bytes are then ignored.
    """
    if tokenizer is None:
        _check_vocab_size(vocab_size)
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        pretrained = tokenizer
    else:
        pretrained = PretrainedTokenizer(tokenizer)
    if pretrained is None:
        key = _cache_key(corpus.meta, vocab_size, max_train_bytes)
    else:
        key = _cache_key(corpus.meta, pretrained.vocab_size, 0, pretrained.fingerprint())
    path = Path(cache if cache is not None else cache_dir() / "data") / key
    files = {name: path / f"{name}.npy" for name in ("train", "val")}
    tok_file, meta_file = path / "tokenizer.json", path / "meta.json"
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)

    if meta_file.exists() and (pretrained or tok_file.exists()) and all(f.exists() for f in files.values()):
        try:
            return Dataset(train=_load_tokens(files["train"]), val=_load_tokens(files["val"]),
                           tokenizer=pretrained or Tokenizer.load(tok_file), meta=read_json(meta_file, "data cache meta"),
                           path=path, cached=True)
        except ValueError as e:  # the cache is rebuildable: a damaged entry is built again, not an error
            print(f"[data] the cached dataset in {path} is damaged ({e}); building it again", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)

    path.mkdir(parents=True, exist_ok=True)
    if pretrained is not None:
        tokenizer, sample_bytes = pretrained, None
    elif tok_file.exists():  # a previous run got past training and stopped while encoding
        tokenizer, sample_bytes = Tokenizer.load(tok_file), None
    else:
        sample = _tokenizer_sample(corpus, max_train_bytes)
        sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
        say(f"training a {vocab_size}-token BPE on {sample_bytes / 1e6:.1f} MB of {corpus.meta['source']}")
        tokenizer = Tokenizer.train(sample, vocab_size)
        tokenizer.save(tok_file)

    counts = {split: _encode_split(corpus, split, tokenizer, files[split], progress)
              for split in ("train", "val")}
    meta = {
        "format": FORMAT_VERSION, "key": path.name, "corpus": corpus.meta,
        "vocab_size": tokenizer.vocab_size, "vocab_size_requested": vocab_size,
        "bos_id": tokenizer.bos_id, "max_train_bytes": max_train_bytes,
        "tokenizer_train_bytes": sample_bytes, "pretrained_tokenizer": pretrained and getattr(pretrained, "path", pretrained.fingerprint()),
        "train_docs": counts["train"][0], "val_docs": counts["val"][0],
        "train_tokens": counts["train"][1], "val_tokens": counts["val"][1],
    }
    atomic_write_text(meta_file, json.dumps(meta, indent=2))  # last: marks the entry complete
    say(f"tokenized: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens in {path}")
    return Dataset(train=np.load(files["train"], mmap_mode="r"), val=np.load(files["val"], mmap_mode="r"),
                   tokenizer=tokenizer, meta=meta, path=path, cached=False)


def _load_tokens(file: Path) -> np.ndarray:
    """A cached token array (memory-mapped); DamagedFileError when it is not a complete 1-D .npy."""
    try:
        tokens = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DamagedFileError(file, f"is not a complete token array ({first_line(e)})") from None
    if tokens.ndim != 1 or tokens.dtype.kind != "u":
        raise DamagedFileError(file, f"is not a token array: {tokens.ndim}-D {tokens.dtype}")
    return tokens


def _cache_key(corpus_meta: dict, vocab_size: int, max_train_bytes: int, tokenizer: str | None = None) -> str:
    """The dataset's folder name; `tokenizer` = a pretrained tokenizer's fingerprint (None: our BPE)."""
    d = {"format": FORMAT_VERSION, "corpus": corpus_meta, "vocab_size": vocab_size, "max_train_bytes": max_train_bytes}
    if tokenizer is not None:
        d["tokenizer"] = tokenizer
    blob = json.dumps(d, sort_keys=True)
    kind = "hf" if tokenizer is not None else "v"
    return f"{corpus_meta['kind']}-{kind}{vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def token_dtype(vocab_size: int):
    """uint16 while every id fits, else uint32 (pretrained vocabularies reach 262144)."""
    return np.uint16 if vocab_size <= MAX_VOCAB else np.uint32


def _encode_split(corpus: Corpus, split: str, tokenizer: Tokenizer | PretrainedTokenizer, out: Path,
                  progress: bool | None) -> tuple[int, int]:
    """Tokenize one split into a uint16 (uint32) .npy file, each doc prefixed with BOS. Returns (docs, tokens).

    Tokens are streamed to a raw temp file and then wrapped as .npy, so memory stays bounded
    by one chunk whatever the corpus size.
    """
    raw = out.with_name(f"{out.name}.raw")  # the stream before its .npy header; removed however this ends
    dtype = token_dtype(tokenizer.vocab_size)
    n_docs = n_tokens = 0
    bar = tqdm(total=corpus.meta[f"{split}_docs"], desc=f"tokenize {split}", unit="doc",
               disable=None if progress is None else not progress)
    raw_tmp = temporary_name(raw)
    remove_stale(raw)
    with removed_on_failure(raw_tmp, raw):
        with open(raw_tmp, "wb") as f:
            for docs, ids in _encoded_chunks(corpus, split, tokenizer):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n_docs, n_tokens = n_docs + docs, n_tokens + len(ids)
                bar.update(docs)
        bar.close()

        def write(tmp):
            tokens = np.memmap(raw_tmp, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
            with open(tmp, "wb") as f:
                np.save(f, tokens)

        atomic_write(out, write)
        raw_tmp.unlink()
    return n_docs, n_tokens


def _encoded_chunks(corpus: Corpus, split: str, tokenizer: Tokenizer) -> Iterator[tuple[int, list[int]]]:
    """(number of documents, token ids) per chunk of a split, every document BOS-first."""
    for chunk in _chunks(corpus.docs(split)):
        ids: list[int] = []
        for doc in tokenizer.encode_batch(chunk):
            ids.append(tokenizer.bos_id)
            ids.extend(doc)
        yield len(chunk), ids


def encode_split(source: str | os.PathLike | Corpus, tokenizer: Tokenizer, split: str = "val") -> np.ndarray:
    """One split of a corpus (see `load_corpus`) encoded with a given tokenizer, every document BOS-first
    as `prepare_data` does: [N] of `token_dtype(tokenizer.vocab_size)` (uint16, uint32 past 65536 ids), in
    memory, not cached. For evaluating a trained model (with its own tokenizer) on any text; with the
    run's training corpus it gives that run's validation tokens."""
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    dtype = token_dtype(tokenizer.vocab_size)
    chunks = [np.asarray(ids, dtype=dtype) for _, ids in _encoded_chunks(corpus, split, tokenizer)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def _chunks(docs: Iterator[tuple[str, str]], max_chars: int = 1 << 20,
            max_docs: int = 1024) -> Iterator[list[str]]:
    """Group documents into lists of about max_chars characters for encode_batch."""
    chunk, size = [], 0
    for _, text in docs:
        chunk.append(text)
        size += len(text)
        if size >= max_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------
# Batches


def token_array(tokens) -> np.ndarray:
    """A token stream as a 1-D integer numpy array: taken from a numpy array, a CPU tensor or a list of
    ints. ValueError, naming what was given, for anything else (2-D batches, floats, other objects)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    elif isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        what = f"{type(tokens).__name__} of shape {tokens.shape} and dtype {tokens.dtype}" \
            if isinstance(tokens, np.ndarray) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D stream of integer token ids (a numpy array, tensor or list, "
                         f"e.g. prepare_data(...).val), got a {what}")
    return tokens


def _check_window(tokens, seq_len: int, batch_size: int, max_batches: int | None = None) -> np.ndarray:
    """The shared ranges of every window stream; returns the tokens as `token_array` reads them."""
    tokens = token_array(tokens)
    check_int("seq_len", seq_len)
    check_int("batch_size", batch_size)
    check_int("max_batches", max_batches, allow_none=True)
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the corpus is smaller than one batch window: {len(tokens)} tokens, but seq_len + 1 = "
            f"{seq_len + 1} are needed (inputs plus the shifted targets); use a shorter seq_len or "
            f"a bigger corpus (more or larger files)")
    return tokens


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
             device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[s:s+T] and targets tokens[s+1:s+T+1] for each start s, as int64 [B, T]."""
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    return x.to(device), y.to(device)


class TokenStream:
    """Endless stream of random training windows; reproducible, resumable, shardable over ranks.

    Each step draws the starts of a global batch of batch_size * world_size windows from a
    numpy Generator(PCG64(seed)); rank r takes rows r*B:(r+1)*B. So all ranks together see the
    same rows as one process with batch_size * world_size, and `state_dict()` /
    `load_state_dict()` resume exactly (also with another world_size, if the global batch is kept).

        stream = TokenStream(ds.train, batch_size=8, seq_len=256, seed=0)
        x, y = next(stream)                 # int64 [8, 256] each
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        tokens = _check_window(tokens, seq_len, batch_size)
        check_seed("seed", seed)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), not {rank}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.step = 0  # batches drawn so far

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        # every rank draws the whole global batch, so the generators stay in step
        starts = self.rng.integers(0, len(self.tokens) - T, size=B * self.world_size)
        self.step += 1
        return _windows(self.tokens, starts[self.rank * B:(self.rank + 1) * B], T, self.device)

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly (JSON- and torch.save-friendly)."""
        return {"seed": self.seed, "step": self.step, "rng": self.rng.bit_generator.state,
                "global_batch": self.batch_size * self.world_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"global_batch": self.batch_size * self.world_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens)}
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"cannot resume a stream saved with {theirs} into one with {mine}; "
                             f"keep seq_len, batch_size * world_size and the data unchanged")
        self.seed, self.step = state["seed"], state["step"]
        self.rng.bit_generator.state = state["rng"]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None,
                device: str | torch.device = "cpu",
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation stream: consecutive non-overlapping windows from the start.

    Window i has inputs tokens[i*T:(i+1)*T] and targets one token later; there are
    (len(tokens) - 1) // T windows, grouped into batches of batch_size (the last one smaller
    unless drop_last). Stops after max_batches batches if given. Always the same batches.
    """
    tokens = _check_window(tokens, seq_len, batch_size, max_batches)  # here, not at the first next()
    starts = np.arange((len(tokens) - 1) // seq_len) * seq_len

    def gen():
        for b, i in enumerate(range(0, len(starts), batch_size)):
            chunk = starts[i:i + batch_size]
            if (max_batches is not None and b >= max_batches) or (drop_last and len(chunk) < batch_size):
                return
            yield _windows(tokens, chunk, seq_len, device)

    return gen()
