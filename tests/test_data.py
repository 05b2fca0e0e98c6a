"""Tests of the data layer: corpora, split rule, tokenizer, on-disk cache, batching and resume.

Everything runs on tiny corpora written to tmp_path; only test_stdlib_corpus_listing touches the
real default corpus, and only lists it (no tokenizer training).
"""

import json
import sys
import zlib

import numpy as np
import pytest
import torch

from snlp_lab.core import paths
from snlp_lab.data import (BOS, VAL_PERCENT, Corpus, Dataset, Tokenizer, TokenStream, load_corpus,
                           prepare_data, val_batches)

WORDS = ("the quick brown fox jumps over the lazy dog def return import class self lambda "
         "while for in range print value key list dict tuple").split()


def make_text(i: int, n_words: int = 80) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=n_words)) + f"\n# doc {i} üñï 😀\n"


def write_files(folder, n: int, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        sub = folder / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:03d}.txt").write_text(make_text(i), encoding="utf-8")
    return folder


def is_val(key: str) -> bool:
    return zlib.crc32(key.encode()) % 100 < VAL_PERCENT


@pytest.fixture()
def text_dir(tmp_path):
    return write_files(tmp_path / "corpus", 60)


# --- paths ---------------------------------------------------------------------------------------


def test_cache_dir_env_and_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "c" / "d"))
    assert paths.cache_dir() == tmp_path / "c" / "d" and (tmp_path / "c" / "d").is_dir()
    monkeypatch.delenv("SNLP_CACHE")
    root = paths.repo_root()
    assert root is not None and (root / "pyproject.toml").is_file()  # tests run from a checkout
    assert paths.cache_dir() == root / ".cache"


# --- corpora -------------------------------------------------------------------------------------


def test_stdlib_corpus_listing():
    """The one test on the real default corpus: list it, never tokenize it."""
    c = load_corpus("stdlib")
    m = c.meta
    assert m["kind"] == "stdlib" and m["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert m["num_files"] > 100 and m["total_bytes"] > 1_000_000 and len(m["files_sha256"]) == 64
    assert m["train_docs"] + m["val_docs"] == m["num_files"] and m["val_docs"] > 0
    keys = [k for k, _ in c.docs("val", keep=lambda k: False)]  # keep=False: nothing is read
    assert keys == []
    json.dumps(m)
    # reading the val keys only is cheap (39-ish files); they all obey the hash rule
    val_keys = [k for k, _ in c.docs("val")]
    assert val_keys == sorted(val_keys) and all(is_val(k) for k in val_keys)
    assert all(k.endswith(".py") for k in val_keys)
    assert not any(part in ("test", "tests", "site-packages", "idlelib", "lib2to3")
                   for k in val_keys for part in k.split("/"))


def test_folder_corpus_split_rule_and_stability(text_dir):
    (text_dir / "blob.bin").write_bytes(bytes(range(256)) * 10)  # binary: skipped
    (text_dir / ".hidden.txt").write_text("hidden")  # hidden: skipped
    (text_dir / "empty.txt").write_text("")  # empty: skipped
    c = load_corpus(text_dir)
    assert isinstance(c, Corpus) and c.meta["num_files"] == 60 and c.meta["kind"] == "files"
    train = [k for k, _ in c.docs("train")]
    val = [k for k, _ in c.docs("val")]
    assert len(train) + len(val) == 60 and val, "60 files should give some validation files"
    assert all(is_val(k) for k in val) and not any(is_val(k) for k in train)
    assert next(t for _, t in c.docs("train")) == (text_dir / train[0]).read_text(encoding="utf-8")

    write_files(text_dir, 40, start=60)  # adding files never moves an old file across the split
    c2 = load_corpus(text_dir)
    val2 = {k for k, _ in c2.docs("val")}
    assert set(val) <= val2 and not set(train) & val2
    assert c2.meta["files_sha256"] != c.meta["files_sha256"]


def test_tiny_corpus_still_has_validation(tmp_path):
    write_files(tmp_path / "two", 2)
    c = load_corpus(tmp_path / "two")
    assert c.meta["train_docs"] == 1 and c.meta["val_docs"] == 1


def test_bad_sources_raise_helpful_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*'stdlib'"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(ValueError, match="no text"):
        load_corpus(tmp_path / "bin")
    with pytest.raises(ValueError, match="no files match"):
        load_corpus(str(tmp_path / "*.parquet"))
    write_files(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="at least two"):
        load_corpus(tmp_path / "one")


def test_parquet_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "shards"
    folder.mkdir()
    texts = [[make_text(100 * s + i, 20) for i in range(50)] for s in range(2)]
    for s, docs in enumerate(texts):
        pq.write_table(pa.table({"text": docs, "id": list(range(50))}), folder / f"shard_{s:05d}.parquet",
                       row_group_size=16)
    (folder / "README.md").write_text("ignored next to parquet shards")
    c = load_corpus(folder)
    assert c.meta["kind"] == "parquet" and c.meta["num_docs"] == 100 and c.meta["num_files"] == 2
    val = dict(c.docs("val"))
    train = dict(c.docs("train"))
    assert len(val) + len(train) == 100 and val
    for key, text in {**val, **train}.items():
        name, row = key.split(":")
        assert text == texts[int(name[6:11])][int(row)]
        assert (key in val) == is_val(key)
    assert load_corpus(str(folder / "*.parquet")).meta["files_sha256"] == c.meta["files_sha256"]

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_corpus(tmp_path / "bad.parquet")


# --- tokenizer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([make_text(i) for i in range(30)], vocab_size=300)


def test_tokenizer_roundtrip_bos_and_save(tok, tmp_path):
    assert tok.vocab_size <= 300 and tok.bos_id == 0
    for s in ["", "def f(x):\n\treturn x  \r\n", "üñï 😀 中文 \x00", make_text(7), "a <|bos|> b"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.bos_id not in ids  # a literal "<|bos|>" in the text stays text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode([tok.bos_id] + tok.encode("hi")) == BOS + "hi"
    assert tok.decode(np.array([tok.bos_id] + tok.encode("hi"), dtype=np.uint16), skip_bos=True) == "hi"
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]
    tok.save(tmp_path / "t.json")
    tok2 = Tokenizer.load(tmp_path / "t.json")
    assert tok2.vocab_size == tok.vocab_size and tok2.bos_id == tok.bos_id
    assert tok2.encode(make_text(3)) == tok.encode(make_text(3))
    assert tok2.encode("a <|bos|> b") == tok.encode("a <|bos|> b")


def test_tokenizer_vocab_limits():
    with pytest.raises(ValueError, match="uint16"):
        Tokenizer.train(["abc"], vocab_size=65537)
    with pytest.raises(ValueError, match="257"):
        Tokenizer.train(["abc"], vocab_size=100)


# --- prepare_data and the cache ------------------------------------------------------------------


def test_prepare_data_caches_and_reuses(text_dir, tmp_path):
    cache = tmp_path / "cache"
    ds = prepare_data(text_dir, vocab_size=320, max_train_bytes=5000, cache=cache, progress=False)
    assert isinstance(ds, Dataset) and not ds.cached and ds.path.parent == cache
    assert ds.train.dtype == np.uint16 and isinstance(ds.train, np.memmap) and ds.val.ndim == 1
    m = ds.meta
    json.dumps(m)
    assert m["train_tokens"] == len(ds.train) and m["val_tokens"] == len(ds.val)
    assert m["tokenizer_train_bytes"] <= 5000 and m["vocab_size"] == ds.tokenizer.vocab_size <= 320
    assert m["corpus"]["files_sha256"] == load_corpus(text_dir).meta["files_sha256"]
    # one BOS per document, each document starts with it, and the tokens decode to the files
    assert (ds.train == ds.tokenizer.bos_id).sum() == m["train_docs"] == m["corpus"]["train_docs"]
    assert ds.train[0] == ds.val[0] == ds.tokenizer.bos_id
    corpus = load_corpus(text_dir)
    assert ds.tokenizer.decode(ds.val) == "".join(BOS + t for t in (t for _, t in corpus.docs("val")))

    mtimes = {f.name: f.stat().st_mtime_ns for f in ds.path.iterdir()}
    again = prepare_data(text_dir, vocab_size=320, max_train_bytes=5000, cache=cache, progress=False)
    assert again.cached and again.path == ds.path and again.meta == m
    assert {f.name: f.stat().st_mtime_ns for f in ds.path.iterdir()} == mtimes
    assert np.array_equal(again.train, ds.train) and not list(ds.path.glob("*.tmp"))

    other = prepare_data(text_dir, vocab_size=300, max_train_bytes=5000, cache=cache, progress=False)
    assert not other.cached and other.path != ds.path  # another vocab: another entry
    write_files(text_dir, 1, start=500)  # another file list: another entry
    assert not prepare_data(text_dir, vocab_size=320, max_train_bytes=5000, cache=cache,
                            progress=False).cached


def test_prepare_data_accepts_a_corpus_and_default_cache(text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SNLP_CACHE", str(tmp_path / "env"))
    ds = prepare_data(load_corpus(text_dir), vocab_size=280, max_train_bytes=2000, progress=False)
    assert ds.path.parent == tmp_path / "env" / "data"


# --- batches -------------------------------------------------------------------------------------


TOKENS = np.arange(1000, dtype=np.uint16) % 700


def test_token_stream_shapes_and_determinism():
    s = TokenStream(TOKENS, batch_size=4, seq_len=16, seed=1)
    x, y = next(s)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = x[:, 0].numpy()
    assert np.array_equal(x.numpy(), TOKENS[starts[:, None] + np.arange(16)])
    x2, _ = next(TokenStream(TOKENS, batch_size=4, seq_len=16, seed=1))
    x3, _ = next(TokenStream(TOKENS, batch_size=4, seq_len=16, seed=2))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    # one exact window fits: always start 0
    xs, ys = next(TokenStream(TOKENS[:17], batch_size=2, seq_len=16, seed=0))
    assert torch.equal(xs[0], torch.from_numpy(TOKENS[:16].astype(np.int64)))


def test_token_stream_exact_resume():
    s = TokenStream(TOKENS, batch_size=3, seq_len=8, seed=7)
    for _ in range(5):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))  # survives JSON (and torch.save)
    expected = [next(s) for _ in range(4)]
    r = TokenStream(TOKENS, batch_size=3, seq_len=8, seed=999)
    r.load_state_dict(state)
    assert r.step == 5 and r.seed == 7
    for (x, y), (xr, yr) in zip(expected, [next(r) for _ in range(4)]):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    with pytest.raises(ValueError, match="cannot resume"):
        TokenStream(TOKENS, batch_size=4, seq_len=8).load_state_dict(state)


def test_token_stream_ranks_split_the_global_batch():
    one = TokenStream(TOKENS, batch_size=4, seq_len=8, seed=3)
    ranks = [TokenStream(TOKENS, batch_size=2, seq_len=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = next(one)
        parts = [next(s) for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    # a 2-rank state resumes a 1-process stream with the same global batch
    single = TokenStream(TOKENS, batch_size=4, seq_len=8, seed=0)
    single.load_state_dict(ranks[0].state_dict())
    x, _ = next(single)
    assert torch.equal(x[:2], next(ranks[0])[0]) and torch.equal(x[2:], next(ranks[1])[0])
    with pytest.raises(ValueError, match="rank"):
        TokenStream(TOKENS, batch_size=2, seq_len=8, rank=2, world_size=2)


def test_too_short_corpus_raises():
    with pytest.raises(ValueError, match="smaller than one batch window"):
        TokenStream(TOKENS[:16], batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="smaller than one batch window"):
        val_batches(TOKENS[:10], seq_len=16, batch_size=2)


def test_val_batches_are_consecutive_windows():
    batches = list(val_batches(TOKENS, seq_len=100, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # (1000 - 1) // 100 = 9 windows
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x, torch.from_numpy(TOKENS[:900].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(TOKENS[1:901].astype(np.int64)))
    assert len(list(val_batches(TOKENS, 100, 4, max_batches=2))) == 2
    assert len(list(val_batches(TOKENS, 100, 4, drop_last=True))) == 2
    again = list(val_batches(TOKENS, seq_len=100, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
