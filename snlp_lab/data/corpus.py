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
    ``"python"``, ``"python:<max bytes>"`` (e.g. ``"python:20M"``; or ``load_corpus("python", max_bytes=N)``)
        The source and documentation text of the running interpreter: its standard library (with
        the test suites, which are code too), its C API headers, and every installed package folder
        (`python_roots`: sysconfig's purelib/platlib, ``site.getsitepackages()``, the user site when on
        sys.path, every site-packages/dist-packages folder on sys.path). Nothing to download, and
        large: about 350 MB and 105M tokens (8192-token BPE) for a venv with torch, transformers,
        pandas, scipy and their dependencies; much more on a GPU image. One document per file, keyed
        ``"<root label>/<path below the root>"`` (labels: ``stdlib``, ``include``, and a package
        folder's path below sys.prefix as ``prefix/...``, below sys.base_prefix as ``base/...``, below
        the user base as ``user/...``). Which files are text to learn from:

        - taken: ``PYTHON_EXTENSIONS``: Python and Cython source and stubs (.py .pyi .pyx .pxd),
          C/C++/CUDA source and headers (.c .h .cc .cpp .cxx .hpp .hh .cu .cuh: packages such as
          torch ship tens of MB of hand-written C++ headers) and documentation (.md .rst .txt);
        - not taken: JSON, YAML, TOML, CSV and other data or configuration (mostly generated:
          schemas, tables, locale data), JavaScript/CSS/HTML (minified front-end bundles), files
          without an extension (install records), and every binary;
        - skipped although the extension fits: files over ``PYTHON_MAX_FILE_BYTES`` (1.5 MB:
          generated registration tables and amalgamations), files whose mean line is longer than
          ``PYTHON_MAX_MEAN_LINE_BYTES`` (200 bytes: embedded data, minified code), Cython's generated
          C, empty files, files with a NUL byte or not valid UTF-8, links (read where they point, if
          that is in a root), hidden files and folders, ``__pycache__``, ``node_modules``,
          ``*.dist-info``/``*.egg-info``, site-packages folders nested in another root (another root,
          or not on sys.path), and this project's own source.

        Identical files (packages vendor copies of each other; a venv and its base interpreter share
        files) count once: of the files with the same sha256, the one first in a fixed pseudo-random
        order (crc32("cap:" + key), then key) is kept, so keys stay stable. A byte cap takes files in
        that same order and passes over each one that would overflow it, unread: a capped corpus is a
        subset of the whole one that mixes all roots, and is read in a fraction of the time (for
        smoke runs and tests). Building the listing reads every file once (in threads) to check and
        hash it: a few seconds for the whole corpus. Its metadata records the roots, the filters,
        the cap, ``candidate_files``, ``examined_files``, ``skipped_files`` per reason,
        ``duplicates_dropped``, ``duplicate_bytes`` and ``passed_over_files`` besides the counts that
        every corpus has.
    a folder (or glob, or single file) of text files
        Read recursively. Every file whose first 8 KiB hold no NUL byte and decode as UTF-8 is a
        document (.txt, .md, .py, ... the extension does not matter); binaries, empty files,
        hidden files/folders and ``__pycache__`` are skipped.
    a folder (or glob, or single file) of parquet shards with a ``text`` column
        The format of nanochat's pretraining shards: one document per row. As soon as a folder or
        glob holds a ``.parquet`` file, only the parquet files are read.

Train/validation split
    A document is in validation iff ``crc32(key) % 100 < VAL_PERCENT`` (5), where the key is the
    file's relative path (``/``-separated; for ``"python"`` with its root label in front) or
    ``"<shard relpath>:<row index>"`` for parquet rows.
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
    An unchanged second call loads everything and trains nothing (it still lists the corpus to compute
    the key). ``meta.json`` holds the corpus metadata, the documents and tokens per split and the
    seconds the build took (``build_seconds``: corpus listing, tokenizer, encoding). Encoding runs on
    all cores (`_encoded_chunks`) and gives the same tokens whatever their number. Note that the
    file list hash uses sizes, not contents: an edit that keeps a file's size is not noticed
    (delete the cache folder). Files are written atomically, so an interrupted run leaves no
    half-written entry; concurrent callers (e.g. several ranks) each build the same files, so let
    one process prepare first.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import platform
import shutil
import stat
import sys
import sysconfig
import time
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
from ..core.paths import cache_dir, repo_root

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

# The "python" corpus: which files are text a language model should learn from (see the module docstring)
PYTHON_EXTENSIONS = frozenset({
    ".py", ".pyi", ".pyx", ".pxd",  # Python and Cython source, type stubs
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",  # C, C++ and CUDA source and headers
    ".md", ".rst", ".txt",  # documentation
})
PYTHON_MAX_FILE_BYTES = 1_500_000  # bigger files are generated tables and bundles, not written text
PYTHON_MAX_MEAN_LINE_BYTES = 200  # a file whose mean line is longer is minified or embedded data
PYTHON_SKIPPED_DIRS = frozenset({
    "__pycache__",
    "site-packages", "dist-packages",  # nested package folders are roots of their own, or not on sys.path
    "node_modules",  # bundled JavaScript of notebook front ends
})
PYTHON_SKIPPED_DIR_SUFFIXES = (".dist-info", ".egg-info")  # install records, not content

_HINT = ("pass a folder of text files (.txt, .md, .py, ...), a folder or glob of parquet shards "
         "with a 'text' column, 'stdlib', or 'python' (or 'python:<max bytes>', e.g. 'python:20M')")

# -----------------------------------------------------------------------------
# Corpus


@dataclass
class Corpus:
    """A text corpus split into training and validation documents. Build one with `load_corpus`.

    `meta` is a JSON-serialisable dict: kind, source, num_docs, train_docs, val_docs, total_bytes,
    train_bytes (exact for files, estimated from parquet metadata), files_sha256 (sha256 of the
    lines "<relpath>\\t<size>\\n" over the sorted file list), split rule, for the stdlib and python
    corpora the Python version, and for the python corpus its filters, cap and duplicate counts
    (see the module docstring).
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


def load_corpus(source: str | os.PathLike = "stdlib", max_bytes: int | None = None) -> Corpus:
    """Open a corpus: "stdlib", "python", a folder/glob/file of text files, or of parquet shards.

    Only file names, sizes and parquet metadata are read here (the "python" corpus also reads every
    file once, to drop binaries and duplicates); documents are read lazily.
    max_bytes: only for "python": keep at most this many bytes of documents, taken in a fixed
    pseudo-random order (see the module docstring); "python:<max bytes>" (e.g. "python:20M", SI
    suffixes K, M, G) says the same in one string.
    Raises ValueError when the path does not exist or holds no text, or for a bad max_bytes.
    """
    if isinstance(source, str) and source == "stdlib":
        if max_bytes is not None:
            raise ValueError("max_bytes caps only the 'python' corpus; pass 'python' or leave max_bytes out")
        return _stdlib_corpus()
    if isinstance(source, str) and (source == "python" or source.startswith("python:")):
        cap = _python_cap(source, max_bytes)
        return python_corpus(cap, source="python" if cap is None else f"python:{cap}")  # one name per corpus
    if max_bytes is not None:
        raise ValueError(f"max_bytes caps only the 'python' corpus, not {source!r}; leave it out")
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


def _python_cap(source: str, max_bytes: int | None) -> int | None:
    """The byte cap of "python[:<max bytes>]" and/or max_bytes (they must agree when both are given)."""
    cap = None
    if source != "python":
        text = source[len("python:"):].strip()
        scale = {"K": 10**3, "M": 10**6, "G": 10**9}
        body = text.upper().removesuffix("B")
        mult = scale.get(body[-1:], 1)
        body = body[:-1] if body[-1:] in scale else body
        try:
            cap = int(float(body) * mult)
        except ValueError:
            raise ValueError(f"cannot read the byte cap of {source!r}: use 'python:<max bytes>' such as "
                             f"'python:20M', 'python:500K' or 'python:2000000'") from None
        if max_bytes is not None and max_bytes != cap:
            raise ValueError(f"{source!r} and max_bytes={max_bytes} give two different caps; pass one")
    if max_bytes is not None:
        cap = check_int("max_bytes", max_bytes)
    if cap is not None and cap < 1:
        raise ValueError(f"the byte cap of the 'python' corpus must be positive, not {cap} ({source!r})")
    return cap


def python_roots() -> list[tuple[str, Path]]:
    """The folders the "python" corpus reads, as (label, folder): the standard library ("stdlib"),
    the C API headers ("include", where installed) and every package folder of the running
    interpreter: sysconfig's purelib and platlib, `site.getsitepackages()`, the user site when it is
    on sys.path, and every site-packages / dist-packages folder on sys.path.

    A package folder's label is its path below sys.prefix ("prefix/..."), sys.base_prefix
    ("base/...") or the user base ("user/..."), else "path:" and its absolute path: the same on every
    machine with the same layout, and never the same for two folders. Folders
    that do not exist, and second paths to the same folder, are left out."""
    import site

    paths = sysconfig.get_paths()
    found: list[tuple[str, Path]] = [("stdlib", Path(paths["stdlib"])), ("include", Path(paths["include"]))]
    candidates = [paths["purelib"], paths["platlib"]]
    candidates += list(getattr(site, "getsitepackages", lambda: [])())  # missing in some old virtualenvs
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user and user in sys.path:
        candidates.append(user)
    candidates += [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    anchors = [("prefix", sys.prefix), ("base", sys.base_prefix), ("user", getattr(site, "USER_BASE", None))]
    for folder in candidates:
        path = Path(folder)
        for name, anchor in anchors:
            if anchor and path.is_relative_to(anchor):
                label = f"{name}/{path.relative_to(anchor).as_posix()}"
                break
        else:
            label = f"path:{path.as_posix()}"
        found.append((label, path))
    roots, seen = [], set()
    for label, path in found:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            roots.append((label, path))
    return roots


def python_corpus(max_bytes: int | None = None, source: str = "python",
                  roots: list[tuple[str, Path]] | None = None) -> Corpus:
    """The "python" corpus (see the module docstring): the source and documentation text of the
    running interpreter's standard library and installed packages, one document per file,
    deduplicated by content. Usually reached as `load_corpus("python")` or `load_corpus("python:20M")`.

    max_bytes: keep at most this many bytes of documents (None: all): files are taken in a fixed
    pseudo-random order, passing over (unread) each one that would overflow the cap, so about only
    the kept bytes are read. source: the name recorded in
    the metadata. roots: (label, folder) pairs to read instead of `python_roots()` (document keys are
    "<label>/<path below the folder>"). Every candidate file is read once here, in threads, to check
    that it is text and to hash it; documents are read again lazily by `Corpus.docs`.
    Raises ValueError when fewer than two documents are found (or fit under max_bytes).
    """
    if max_bytes is not None:
        check_int("max_bytes", max_bytes)
    roots = python_roots() if roots is None else roots
    own = {os.path.realpath(p) for p in (Path(__file__).resolve().parents[1], repo_root()) if p is not None}
    all_roots = {os.path.realpath(path) for _, path in roots}
    skipped = {"empty": 0, "not_text": 0, "too_large": 0, "long_lines": 0, "generated": 0}
    candidates: list[tuple[str, Path, int]] = []  # (key, path, size from stat)
    for label, root in roots:
        def skip_dir(d: str, parent: str) -> bool:
            if d in PYTHON_SKIPPED_DIRS or d.startswith(".") or d.endswith(PYTHON_SKIPPED_DIR_SUFFIXES):
                return True
            real = os.path.realpath(os.path.join(parent, d))
            return real in own or real in all_roots  # this project; another root, read under its own label
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not skip_dir(d, dirpath))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            prefix = label if rel_dir == "." else f"{label}/{rel_dir}"
            for name in filenames:
                if name.startswith((".", "__editable__")) or os.path.splitext(name)[1].lower() not in PYTHON_EXTENSIONS:
                    continue  # __editable__*: generated finders of editable installs (this project's, too)
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):  # not a link: its target is read where it lives, if in a root
                    if st.st_size > PYTHON_MAX_FILE_BYTES:
                        skipped["too_large"] += 1
                    elif st.st_size == 0:  # e.g. the many empty __init__.py: nothing to read
                        skipped["empty"] += 1
                    else:
                        candidates.append((f"{prefix}/{name}", path, st.st_size))

    # One fixed pseudo-random order of the files decides which copy of identical files is kept (the
    # first) and what a byte cap keeps: files are taken in this order, and one that would overflow the
    # cap is passed over unread. So a capped corpus is a subset of the whole one that mixes all roots,
    # and only about its own bytes are read.
    order = sorted(candidates, key=lambda c: (_crc("cap:" + c[0]), c[0]))
    budget = float("inf") if max_bytes is None else max_bytes
    seen: set[bytes] = set()
    found: list[tuple[str, Path, int]] = []
    dup_docs = dup_bytes = total = examined = passed_over = 0
    block_size = 4096 if max_bytes is None else 256  # capped: read little beyond what fits
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # reads and hashes release the GIL
        for i in range(0, len(order), block_size):
            block = order[i:i + block_size]
            fits = [c for c in block if c[2] <= budget - total]
            checked = dict(zip((c[0] for c in fits), pool.map(_check_python_file, (c[1] for c in fits))))
            examined += len(fits)
            for key, path, _ in block:
                if key not in checked:
                    passed_over += 1
                    continue
                verdict, size, digest = checked[key]
                if verdict != "ok":
                    skipped[verdict] += 1
                elif digest in seen:
                    dup_docs, dup_bytes = dup_docs + 1, dup_bytes + size
                elif total + size > budget:
                    passed_over += 1
                else:
                    seen.add(digest)
                    found.append((key, path, size))
                    total += size
    found.sort()
    if len(found) < 2:
        raise ValueError(f"the python corpus {source!r} holds {len(found)} documents, too few to split into "
                         f"training and validation; raise the byte cap (it keeps whole files)")
    extra = {
        "roots": {label: str(path) for label, path in roots}, "python_version": platform.python_version(),
        "extensions": sorted(PYTHON_EXTENSIONS), "max_file_bytes": PYTHON_MAX_FILE_BYTES,
        "max_mean_line_bytes": PYTHON_MAX_MEAN_LINE_BYTES,
        "skipped_dirs": sorted(PYTHON_SKIPPED_DIRS) + [f"*{s}" for s in PYTHON_SKIPPED_DIR_SUFFIXES] + [".*"],
        "max_bytes": max_bytes, "capped": passed_over > 0, "passed_over_files": passed_over,
        "candidate_files": len(candidates), "examined_files": examined,
        "skipped_files": skipped, "duplicates_dropped": dup_docs, "duplicate_bytes": dup_bytes,
        "order": "crc32('cap:' + key), then key",
        "dedup": "sha256 of the bytes; of identical files the first in the order is kept",
    }
    return _split_files(source, found, "python", extra, "crc32('<root label>/<relpath>')")


def _check_python_file(path: Path) -> tuple[str, int, bytes]:
    """(verdict, size in bytes, sha256 of the bytes) of a candidate file of the "python" corpus;
    verdict is "ok", "empty", "too_large", "not_text" (unreadable, a NUL byte, not UTF-8), "long_lines" or
    "generated" (Cython's C output)."""
    try:
        data = path.read_bytes()
    except OSError:
        return "not_text", 0, b""
    if len(data) > PYTHON_MAX_FILE_BYTES:  # grew since it was listed
        return "too_large", len(data), b""
    if not data:
        return "empty", 0, b""
    if b"\0" in data:
        return "not_text", len(data), b""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_text", len(data), b""
    if len(data) > PYTHON_MAX_MEAN_LINE_BYTES * (data.count(b"\n") + 1):
        return "long_lines", len(data), b""
    if b"Generated by Cython" in data[:200]:  # C compiled from a .pyx (which is kept): boilerplate
        return "generated", len(data), b""
    return "ok", len(data), hashlib.sha256(data).digest()


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
    return _split_files(source, [(rel, p, p.stat().st_size) for rel, p in found], kind, {"root": str(root)},
                        "crc32(relpath)")


def _split_files(source: str, found: list[tuple[str, Path, int]], kind: str, extra: dict, key_rule: str) -> Corpus:
    """A corpus of one document per file from (key, path, size) sorted by key, split by the crc32 rule."""
    rels = [rel for rel, _, _ in found]
    sizes = [size for _, _, size in found]
    path_of = {rel: path for rel, path, _ in found}
    is_val = _val_mask(np.array([_crc(r) for r in rels], dtype=np.int64))
    splits = {"train": [r for r, v in zip(rels, is_val) if not v],
              "val": [r for r, v in zip(rels, is_val) if v]}
    _check_splits(source, len(splits["train"]), len(splits["val"]), "files")
    val_bytes = int(sum(s for s, v in zip(sizes, is_val) if v))
    meta = {
        "kind": kind, "source": source, **extra,
        "num_files": len(rels), "num_docs": len(rels),
        "train_docs": len(splits["train"]), "val_docs": len(splits["val"]),
        "total_bytes": sum(sizes), "train_bytes": sum(sizes) - val_bytes, "val_bytes": val_bytes,
        "files_sha256": _files_hash(rels, sizes),
        "split": f"{key_rule} % 100 < {VAL_PERCENT} -> val",
    }

    def read(split: str, keep=None) -> Iterator[tuple[str, str]]:
        for rel in splits[split]:
            if keep is None or keep(rel):
                # errors="replace": only the first 8 KiB were checked (a file may also have changed
                # since it was listed); a stray bad byte later on should not stop a long run
                yield rel, path_of[rel].read_bytes().decode("utf-8", errors="replace")

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
        """`encode` for many strings at once, in parallel threads (all cores; the GIL is released)."""
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: same ids, ~20% faster
        fast = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

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
    t_start = time.perf_counter()
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    seconds = {"corpus": time.perf_counter() - t_start}
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
    t_tok = time.perf_counter()
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

    t_encode = time.perf_counter()
    seconds["tokenizer"] = t_encode - t_tok
    counts = {split: _encode_split(corpus, split, tokenizer, files[split], progress)
              for split in ("train", "val")}
    seconds["encode"] = time.perf_counter() - t_encode
    meta = {
        "format": FORMAT_VERSION, "key": path.name, "corpus": corpus.meta,
        "vocab_size": tokenizer.vocab_size, "vocab_size_requested": vocab_size,
        "bos_id": tokenizer.bos_id, "max_train_bytes": max_train_bytes,
        "tokenizer_train_bytes": sample_bytes, "pretrained_tokenizer": pretrained and getattr(pretrained, "path", pretrained.fingerprint()),
        "train_docs": counts["train"][0], "val_docs": counts["val"][0],
        "train_tokens": counts["train"][1], "val_tokens": counts["val"][1],
        "build_seconds": {k: round(v, 2) for k, v in seconds.items()},  # of this build, on this machine
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


ENCODE_IN_FLIGHT = 3  # chunks being encoded at once: the next ones are read while the cores encode


def _encoded_chunks(corpus: Corpus, split: str, tokenizer: Tokenizer) -> Iterator[tuple[int, np.ndarray]]:
    """(number of documents, token ids as a 1-D `token_dtype` array) per chunk of a split, every document
    BOS-first, in the split's order.

    Chunks are encoded in worker threads while this one reads the next: `encode_batch` of HF tokenizers
    runs in Rust without the GIL and spreads one chunk's documents over all cores (its own thread pool),
    so reading, encoding and joining overlap. The result does not depend on the number of threads.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    dtype = token_dtype(tokenizer.vocab_size)

    def encode(chunk: list[str]) -> tuple[int, np.ndarray]:
        return len(chunk), _join_docs(tokenizer.encode_batch(chunk), tokenizer.bos_id, dtype)

    # other tokenizers encode one chunk at a time: transformers' fast tokenizers set their padding state
    # on every call and fail ("Already borrowed") when two threads call them at once
    workers = ENCODE_IN_FLIGHT if isinstance(tokenizer, Tokenizer) else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for chunk in _chunks(corpus.docs(split)):
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= ENCODE_IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _join_docs(docs: list[list[int]], bos_id: int, dtype) -> np.ndarray:
    """[BOS, *doc0, BOS, *doc1, ...] as one array, without a Python list of all the ids."""
    lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    out = np.empty(int(lens.sum()) + len(docs), dtype=dtype)
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lens[:-1] + 1, out=starts[1:])
    body = np.ones(len(out), dtype=bool)
    body[starts] = False
    out[starts] = bos_id
    out[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lens.sum()))
    return out


def encode_split(source: str | os.PathLike | Corpus, tokenizer: Tokenizer, split: str = "val") -> np.ndarray:
    """One split of a corpus (see `load_corpus`) encoded with a given tokenizer, every document BOS-first
    as `prepare_data` does: [N] of `token_dtype(tokenizer.vocab_size)` (uint16, uint32 past 65536 ids), in
    memory, not cached. For evaluating a trained model (with its own tokenizer) on any text; with the
    run's training corpus it gives that run's validation tokens."""
    corpus = source if isinstance(source, Corpus) else load_corpus(source)
    dtype = token_dtype(tokenizer.vocab_size)
    chunks = [np.asarray(ids, dtype=dtype) for _, ids in _encoded_chunks(corpus, split, tokenizer)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def _chunks(docs: Iterator[tuple[str, str]], max_chars: int = 4 << 20,
            max_docs: int = 4096) -> Iterator[list[str]]:
    """Group documents into lists of about max_chars characters for encode_batch (big enough that
    16 cores share one chunk's documents evenly, small enough to keep memory at a few hundred MB)."""
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
