"""Self-speculative decoding: greedy output equals sequential decoding token for token, sampled output
follows the sequential model's distribution (chi-square tests), and the text commands around it."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import snlp_lab
from snlp_lab.models.checkpoint import TOKENIZER_JSON, load_checkpoint, load_tokenizer
from snlp_lab.evaluate import main as evaluate_main
from snlp_lab.generate import main as generate_main
from snlp_lab.data import encode_split
from snlp_lab.decoding.decoder import Decoder, generate
from snlp_lab.solvers.ppl import evaluate_ppl
from snlp_lab.decoding.speculative import SpeculativeStats, next_token_probs, predicted_speedup, speculative_generate, verify
from snlp_lab.lab.speculative_study import measure, retime_fastest
from snlp_lab.training import TrainConfig, train

from conftest import randomize

P_MIN = 1e-3  # a chi-square test fails below this p-value (a correct sampler fails 1 time in 1000)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probabilities; the cells expected fewer
    than 5 times are pooled into one (the usual validity rule)."""
    n = counts.sum()
    e, c = probs.flatten().double() * n, counts.flatten().double()
    small = e < 5
    e = torch.cat([e[~small], e[small].sum().view(1)])
    c = torch.cat([c[~small], c[small].sum().view(1)])
    stat, dof = ((c - e) ** 2 / e).sum(), len(e) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


WORDS = "def return import class self lambda while for in range print value key if else try with as pass".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained tiny model (its run folder), on a fixed corpus of 30 files of pseudo-code."""
    root = tmp_path_factory.mktemp("spec")
    old = os.environ.get("SNLP_CACHE")
    os.environ["SNLP_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    (root / "corpus").mkdir()
    for i in range(30):
        text = "\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(40))
        (root / "corpus" / f"f{i:02d}.txt").write_text(text + "\n")
    cfg = TrainConfig(model="tiny", override=("vocab_size=300",), data=str(root / "corpus"),
                      steps=40, batch_size=8, seq_len=32, out=str(root / "run"), device="cpu", progress=False)
    train(cfg)
    yield root / "run"
    if old is None:
        os.environ.pop("SNLP_CACHE")
    else:
        os.environ["SNLP_CACHE"] = old


@pytest.fixture(scope="module")
def trained(run):
    return load_checkpoint(run).double().eval()


# ------------------------------------------------------------------------------------------ greedy
DRAFTS = ["idn:K=1:n=4", "idn:K=1:n=3:fwd", "idn:K=2:n=4:warm", "idn:K=1:n=4:2xF2:h0", "idn:K=1:n=4:1xF4:warm",
          "jacobi:K=1:n=3:h0"]


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_equals_sequential(tiny, trained, which, draft):
    """Token for token, for block sizes 1..8, prompts of 1 to 9 tokens, the last one up to the context
    limit (prompt + new tokens = sequence_len + 1: the last token is returned, never fed)."""
    model = tiny if which == "random" else trained
    V, n_ctx = model.config.vocab_size, model.config.sequence_len
    g = torch.Generator().manual_seed(3)
    rejected = 0
    for B in range(1, 9):
        T = (1, 2, 5, 9)[B % 4]
        new = n_ctx + 1 - T if B == 8 else 10
        prompt = torch.randint(0, V, (1, T), generator=g)
        ref = generate(model, prompt, new, method="sequential")
        got, st = speculative_generate(model, prompt, new, draft=draft, block=B)
        assert torch.equal(got, ref), (B, T)
        assert st.new_tokens == new and st.accepted + st.verifier_passes == new
        rejected += st.rejected
    if draft.startswith("jacobi"):  # a poor drafter: the verifier must have had drafts to reject
        assert rejected > 0


def test_sequential_draft_is_always_accepted(tiny):
    """A sequential drafter is the model itself: every draft is kept, B + 1 tokens per pass."""
    prompt = torch.tensor([[3, 1, 4]])
    out, st = speculative_generate(tiny, prompt, 13, draft="sequential", block=3)
    assert torch.equal(out, generate(tiny, prompt, 13, method="sequential"))
    assert st.acceptance_rate == 1.0 and st.rejected == 0
    assert st.verifier_passes == 13 // 4 + 1 and st.accepted == st.drafted  # 4 + 4 + 4 + 1 tokens


def test_stats_and_shared_prefix(tiny):
    """S prefix layers are shared: the verifier skips them on every prompt token but the last and on
    every drafted token; the counters add up."""
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    _, st = speculative_generate(tiny, prompt, 12, draft="idn:K=1:n=1", block=3)
    S = tiny.n_layer - 1
    assert st.shared_layer_tokens == S * (6 - 1 + st.drafted)
    assert st.new_tokens == 12 == st.accepted + st.verifier_passes
    assert st.drafter_steps >= st.drafted and st.rejected <= st.verifier_passes
    assert st.tokens_per_pass == 12 / st.verifier_passes and st.tokens_per_s > 0
    _, st0 = speculative_generate(tiny, prompt, 0, draft="idn:K=1:n=4")
    assert st0 == SpeculativeStats(block=4) and st0.acceptance_rate is None


def test_mhc_drafter(tiny):
    torch.manual_seed(0)
    m = randomize(snlp_lab.build_model("tiny", x0ve=False, n_streams=2).double())
    prompt = torch.tensor([[5, 9, 2]])
    for draft in ("hcn:K=1:n=3", "idn:K=1:n=4:warm"):
        got, _ = speculative_generate(m, prompt, 12, draft=draft, block=3)
        assert torch.equal(got, generate(m, prompt, 12, method="sequential"))


def test_rewind_then_refeed_is_a_fresh_decode(tiny):
    """Decoder.rewind forgets the tokens after a position; the split step (prefix_states, then
    feed_states) is `step`."""
    idx = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    dec = Decoder(tiny, method="sequential")
    dec.prefill(idx[:, :4])
    dec.step(idx[:, 4])
    dec.step(torch.tensor([7]))
    dec.rewind(5)
    got = dec.feed_states(*dec.prefix_states(idx[:, 5:8]), parallel=False)
    torch.testing.assert_close(got, tiny(idx)[:, 5:8], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="rewind to a position in 0..8"):
        dec.rewind(9)


# ------------------------------------------------------------------------------------------ sampling
def test_verify_rule_gives_the_target_distribution():
    """The accept/reject rule alone: drafts d_i ~ q_i, then `verify`, the rest of the B + 1 positions
    sampled from p (as the next round would). The B + 1 tokens must be distributed as the product of
    the p_i, whatever q, also where p is zero (top-k); the drafts alone (no rule) must fail the test."""
    g = torch.Generator().manual_seed(0)
    V, B, N = 4, 2, 8000
    p_logits = 2 * torch.randn(B + 1, V, generator=g)
    p_logits[1, 2] = float("-inf")  # a token the target never samples there
    p, q = torch.softmax(p_logits, -1), torch.softmax(2 * torch.randn(B, V, generator=g), -1)
    target = p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :]
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(B)], 1)
    rest = torch.stack([torch.multinomial(p[i], N, replacement=True, generator=g) for i in range(B + 1)], 1)
    counts, raw = torch.zeros(V, V, V), torch.zeros(V, V, V)
    for d, r in zip(drafts.tolist(), rest.tolist()):
        n, y = verify(p_logits, d, list(q), 1.0, None, g)
        counts[tuple(d[:n] + [y] + r[n + 1:])] += 1
        raw[tuple(d + r[B:])] += 1
    assert chi_square_p(counts, target) > P_MIN
    assert chi_square_p(raw, target) < 1e-12


@pytest.fixture(scope="module")
def peaked():
    """Tiny model with a 4-token vocabulary and spread-out next-token distributions at T = 1."""
    torch.manual_seed(0)
    m = randomize(snlp_lab.build_model("tiny", vocab_size=4))
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.5)
    return m.eval().requires_grad_(False)


def test_sampling_follows_the_sequential_distribution(peaked):
    """Three new tokens after a fixed prompt, one seed per sample, block 2 (so the first round tests two
    drafts and the bonus token): chi-square of the 64 joint frequencies against the sequential model's
    probabilities p(y1) p(y2 | y1) p(y3 | y1, y2), at threshold P_MIN. The drafter alone must fail it."""
    m, V, N, draft = peaked, 4, 400, "jacobi:K=1:n=4"  # a poor drafter, so the negative control has power
    prompt = torch.tensor([[1, 3, 2]])
    T = prompt.shape[1]
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))
    probs = next_token_probs(m(torch.cat([prompt.expand(len(pairs), -1), pairs], 1))[:, T - 1:], 1.0)
    target = torch.zeros(V, V, V, dtype=torch.float64)
    for i, (a, b) in enumerate(pairs.tolist()):
        target[a, b] = probs[i, 0, a] * probs[i, 1, b] * probs[i, 2]
    counts, drafter, tested = torch.zeros(V, V, V), torch.zeros(V, V, V), 0
    for s in range(N):
        out, st = speculative_generate(m, prompt, 3, draft=draft, block=2, temperature=1.0, seed=s)
        counts[tuple(out[0, T:].tolist())] += 1
        tested += st.accepted + st.rejected
        out = generate(m, prompt, 3, method="jacobi", iters=1, n_par=4, temperature=1.0, seed=s)
        drafter[tuple(out[0, T:].tolist())] += 1
    assert chi_square_p(counts, target) > P_MIN
    assert chi_square_p(drafter, target) < P_MIN  # the negative control: SNLP decoding alone differs
    assert tested >= N  # every sample went through the rule at least once


def test_top_1_sampling_is_greedy(tiny):
    """top_k = 1 leaves one token to sample: the output is sequential greedy decoding's."""
    prompt = torch.tensor([[0, 5, 7]])
    # a Jacobi drafter: on this model one IDN iteration drafts every token right, and the test needs rejections
    out, st = speculative_generate(tiny, prompt, 20, draft="jacobi:K=1:n=4", block=3, temperature=1.0, top_k=1)
    assert torch.equal(out, generate(tiny, prompt, 20, method="sequential"))
    assert st.rejected > 0


def test_sampling_is_seeded(trained):
    prompt = torch.tensor([[0, 5, 7]])
    a, _ = speculative_generate(trained, prompt, 16, draft="idn:K=1:n=3", block=3, temperature=1.0, seed=4)
    b, _ = speculative_generate(trained, prompt, 16, draft="idn:K=1:n=3", block=3, temperature=1.0, seed=4)
    c, _ = speculative_generate(trained, prompt, 16, draft="idn:K=1:n=3", block=3, temperature=1.0, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_probs():
    p = next_token_probs(torch.tensor([1.0, 3.0, 2.0, 0.0]), 1.0, top_k=2)
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, torch.e ** -1, 0.0]) / (1 + torch.e ** -1))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(block=0), "block"), (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(draft="nope"), "unknown method 'nope'"), (dict(draft="idn:n=9"), r"1\.\.4"),
    (dict(max_new_tokens=40), "sequence_len=32"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_input(tiny, kwargs, msg):
    kw = dict(max_new_tokens=4, draft="idn:K=1:n=4") | kwargs
    with pytest.raises(ValueError, match=msg):
        speculative_generate(tiny, torch.tensor([[1, 2]]), **kw)


def test_batch_is_refused(tiny):
    with pytest.raises(ValueError, match="one sequence at a time"):
        speculative_generate(tiny, torch.zeros(2, 3, dtype=torch.long), 4, draft="idn:K=1:n=4")


# ------------------------------------------------------------------------------------------ measuring
def test_predicted_speedup():
    assert predicted_speedup(0.0, 4, 2.0) == pytest.approx(1 / 3)  # one token for 4 half-price drafts + 1
    assert predicted_speedup(1.0, 3, 3.0) == pytest.approx(4 / 2)
    assert predicted_speedup(0.5, 2, 2.0) == pytest.approx((1 + 0.5 + 0.25) / 2)
    with pytest.raises(ValueError):
        predicted_speedup(1.5, 2, 2.0)


def test_measure_table(trained):
    prompts = [torch.tensor([[0, 9, 4]]), torch.tensor([[0, 17]])]
    df = measure(trained, prompts, "idn:K=1:n=3", blocks=(1, 3), temperatures=(0.0, 1.0), max_new_tokens=8,
                 repeats=1, warmup=0)
    assert len(df) == 4 and list(df.block) == [1, 3, 1, 3]
    assert (df[df.temperature == 0].identical == "yes").all() and (df[df.temperature > 0].identical == "n/a").all()
    assert df.alpha.between(0, 1).all() and (df.speedup > 0).all() and (df.drafter_speedup > 0).all()
    assert (df.speedup_lo == df.speedup).all()  # one round: its ratio is the median and the interval
    for r in df.itertuples():
        assert r.predicted == pytest.approx(predicted_speedup(r.alpha, r.block, r.drafter_speedup))
        assert r.tokens_per_pass == pytest.approx(16 / r.verifier_passes)


def test_retime_fastest_times_the_greedy_pick_again(trained):
    prompts = [torch.tensor([[0, 9, 4]])]
    table = pd.DataFrame(dict(draft=["idn:K=1:n=3", "idn:K=1:n=2", "idn:K=1:n=3"], temperature=[0.0, 0.0, 1.0],
                              block=[1, 3, 2], speedup=[1.1, 1.4, 9.0]))
    row = retime_fastest(trained, prompts, table, max_new_tokens=6, repeats=1, warmup=0)
    assert len(row) == 1 and (row.draft[0], row.block[0], row.temperature[0]) == ("idn:K=1:n=2", 3, 0.0)
    assert row.explored_speedup[0] == 1.4 and row.picked_of[0] == 2 and row.identical[0] == "yes"
    assert row.speedup[0] > 0 and row.speedup[0] != 1.4  # a new timing, not the table's number
    with pytest.raises(ValueError, match="no temperature-0 row"):
        retime_fastest(trained, prompts, table[table.temperature > 0], max_new_tokens=6)


# ------------------------------------------------------------------------------------------ commands
def test_run_carries_its_tokenizer(run, tmp_path):
    tok = load_tokenizer(run)
    assert (run / TOKENIZER_JSON).is_file() and tok.vocab_size <= 300
    # a run without the file: rebuilt from the training settings, the same tokenizer
    (tmp_path / "old").mkdir()
    for f in run.iterdir():
        if f.name != TOKENIZER_JSON and f.is_file():
            (tmp_path / "old" / f.name).write_bytes(f.read_bytes())
    text = "def speculative(x):\n    return lambda value: x"
    assert load_tokenizer(tmp_path / "old").encode(text) == tok.encode(text)


def test_generate_command(run, capsys):
    tok = load_tokenizer(run)
    prompt = "def f(x):"
    idx = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    want = tok.decode(generate(load_checkpoint(run), idx, 12, method="sequential")[0, 1:])
    for extra in ([], ["--speculative", "3", "--config", "idn:K=1:n=2:warm"]):
        assert generate_main(["--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", "12", *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want + "\n" and out.out.startswith(prompt)
    assert generate_main(["--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", "12",
                          "--speculative", "2", "--config", "idn:K=1:n=4", "--temperature", "1"]) == 0
    assert "alpha" in capsys.readouterr().err


def test_evaluate_command(run, capsys):
    assert evaluate_main(["--checkpoint", str(run), "--configs", "sequential", "idn:K=1:n=4:2xF2",
                          "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    model = load_checkpoint(run)
    val = encode_split(str(run.parent / "corpus"), load_tokenizer(run))
    seq = evaluate_ppl(model, val, 32, 8, 2)
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in out.splitlines() if l.startswith("| ")]
    assert rows[0] == ["config", "ppl", "tokens", "seconds"]
    assert rows[1][0] == "sequential" and float(rows[1][1]) == pytest.approx(seq, abs=1e-4) and rows[1][2] == "512"
    assert rows[2][0] == "idn:K=1:n=4:2xF2"
    assert float(rows[2][1]) != float(rows[1][1])  # a fused chunk is another function


@pytest.mark.parametrize("main,args,msg", [
    (generate_main, ["--checkpoint", "/nonexistent", "--prompt", "x", "--max-new-tokens", "2"], "/nonexistent does not exist"),
    (generate_main, ["--prompt", "x", "--max-new-tokens", "2"], "--checkpoint"),
    (generate_main, ["RUN", "--prompt", "x", "--max-new-tokens", "2", "--config", "idn:n=99"], "1..4"),
    (generate_main, ["RUN", "--prompt", "x", "--max-new-tokens", "99"], "sequence_len"),
    (evaluate_main, ["RUN", "--configs", "warp:K=1"], "unknown method 'warp'"),
    (evaluate_main, ["RUN", "--data", "/nonexistent"], "does not exist"),
    (evaluate_main, ["RUN", "--max-batches", "0"], "--max-batches >= 1"),
    (evaluate_main, ["RUN", "--seq-len", "0"], "need 1 <= --seq-len <= "),  # 0 once meant the default
    (evaluate_main, ["RUN", "--max-new-tokens", "2"], "unrecognized arguments"),
])
def test_commands_bad_input_is_one_error_line(run, capsys, main, args, msg):
    args = ["--checkpoint", str(run), *args[1:]] if args[0] == "RUN" else args
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err


def test_commands_run_as_modules(run):
    """`python -m snlp_lab.generate` and `python -m snlp_lab.evaluate` are real commands (not no-ops)."""
    env = dict(os.environ, PYTHONPATH=str(Path(snlp_lab.__file__).parent.parent))
    for mod in ("generate", "evaluate"):
        r = subprocess.run([sys.executable, "-m", f"snlp_lab.{mod}", "--checkpoint", str(run / "missing")],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
