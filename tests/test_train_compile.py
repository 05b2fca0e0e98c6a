"""Training with the loss compiled (`--compile`, `SNLPLoss.compile_loss`): one graph (fullgraph) for the
forward, the regulariser and their backward, the gradients of eager training, no recompiles from step to
step, and attention masks decided without reading a tensor on the host.

The loss compiles with the "aot_eager" backend here: dynamo's graph and AOTAutograd's backward, as
inductor gets them, run by eager kernels; inductor's code generation takes minutes on 2 cores. The
configs of the tests share one model shape and regulariser, so they share compiled graphs.
"""
import dataclasses
import os

import pytest
import torch
import torch._dynamo

import snlp_lab
import snlp_lab.train as train_cmd
from snlp_lab.data import prepare_data
from snlp_lab.models.fusion import fuse
from snlp_lab.models.model import attention_mask
from snlp_lab.training import TrainConfig, loss as loss_module, runs, train
from snlp_lab.training.config import model_config, resolve
from snlp_lab.training.loss import SNLPLoss
from conftest import randomize
from test_train import train_lines, write_corpus

# the shapes and options every test here compiles the loss for (tests/test_train.py's tiny runs)
BASE = dict(model="tiny", vocab_size=300, seq_len=32, batch_size=4, n_par_set=(2, 4), progress=False,
            save_every=0, eval_batches=2)


@pytest.fixture(scope="module", autouse=True)
def setup():
    """One thread (toy matrices), and the aot_eager backend for every compiled loss of the module."""
    n, backend = torch.get_num_threads(), loss_module.COMPILE_BACKEND
    torch.set_num_threads(1)
    loss_module.COMPILE_BACKEND = "aot_eager"
    yield
    torch.set_num_threads(n)
    loss_module.COMPILE_BACKEND = backend


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus, with SNLP_CACHE pointing into a temporary folder for the whole module."""
    root = tmp_path_factory.mktemp("compile")
    old = os.environ.get("SNLP_CACHE")
    os.environ["SNLP_CACHE"] = str(root / "cache")
    folder = write_corpus(root / "corpus")
    prepare_data(str(folder), vocab_size=300)
    yield folder
    if old is None:
        os.environ.pop("SNLP_CACHE")
    else:
        os.environ["SNLP_CACHE"] = old


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 300, (BASE["batch_size"], BASE["seq_len"] + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def model_for(cfg, seed=0):
    """The config's model (float32) with non-trivial weights: at nanochat's init the output projections are
    zero, every layer is the identity and the regulariser has nothing to compare."""
    torch.manual_seed(seed)
    return randomize(snlp_lab.build_model(model_config(cfg)), seed=seed)


def grads(model, cfg, compiled: bool, weight: float = 0.7):
    """(loss, ce, reg) and every parameter's gradient of one loss evaluation."""
    net = SNLPLoss(model, cfg)
    if compiled:
        net.compile_loss()
    x, y = batch()
    out = net(x, y, weight, 3)
    out[0].backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return [float(v.detach()) for v in out], g


@pytest.mark.parametrize("reg", ["none", "idn"])
def test_compiled_gradients_equal_eager(reg):
    """The compiled loss and its gradient equal eager's to float32 rounding, for the baseline loss and the
    IDN-regularised one (reg > 0 and pulling on the weights: w(t)·λ·R is part of the loss)."""
    cfg = resolve(TrainConfig(**BASE, reg=reg, lam=0.5))
    model = model_for(cfg)
    want, g_eager = grads(model, cfg, compiled=False)
    got, g_comp = grads(model, cfg, compiled=True)
    if reg == "idn":
        assert want[2] > 1e-3 and want[0] == pytest.approx(want[1] + 0.7 * 0.5 * want[2], rel=1e-6)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert g_eager.keys() == g_comp.keys()
    for name, ge in g_eager.items():
        if ge.norm() == 0:  # (a weight the loss does not reach at this batch: its gradient must stay zero)
            assert g_comp[name].norm() == 0, name
            continue
        err = float((g_comp[name] - ge).norm() / ge.norm())
        assert err < 1e-5, (name, err)


def test_steps_cause_no_recompile():
    """A few training steps (w(t) changing, weights updated in place, a new model of the same config)
    run the graph compiled at the first call: dynamo's error_on_recompile stays silent, and the loss of
    each step equals eager's on the same weights."""
    cfg = resolve(TrainConfig(**BASE, reg="idn", lam=0.5))
    model, ref = model_for(cfg, seed=1), model_for(cfg, seed=1)
    net, eager = SNLPLoss(model, cfg).compile_loss(), SNLPLoss(ref, cfg)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, w in enumerate((0.0, 0.25, 1.0)):
            x, y = batch(step)
            losses = []
            for n, o in zip((net, eager), opts):
                loss = n(x, y, w, step)[0]
                loss.backward()
                o.step()
                o.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            assert losses[0] == pytest.approx(losses[1], rel=1e-5), step


def test_masks_need_no_host_read():
    """attention_mask decides from the windows as Python ints (`window_static`, kept beside the window
    tensors in the stacked and fused weights): the same masks as from the tensors, and it traces under
    torch.compile(fullgraph=True), where reading the tensor on the host is a graph break."""
    m = snlp_lab.build_model("tiny")
    W = m.stacked_weights(0, m.n_layer)
    fused = fuse(W, 2)  # chunks of a short and a long layer: windows differ between heads of a unit
    assert W["window_static"] == tuple(map(tuple, W["window"].tolist()))
    assert fused["window_static"] == tuple(map(tuple, fused["window"].tolist()))
    assert m.stacked_weights(1, 3)["window_static"] == tuple(map(tuple, W["window"][1:3].tolist()))
    cases = [(U, T, Tp) for U in (W, fused) for T, Tp in [(8, 0), (3, 6), (1, 9), (4, 0), (16, 16)]]
    want = [attention_mask(U["window"], T, Tp, "cpu", 2, U["window_dev"]) for U, T, Tp in cases]
    got = [attention_mask(U["window"], T, Tp, "cpu", 2, U["window_dev"], U["window_static"]) for U, T, Tp in cases]
    assert sum(w is None for w in want) == 2  # T = 4 within the windows of 4, no past: plain causal
    for g, w, case in zip(got, want, cases):
        assert (g is None and w is None) or torch.equal(g, w), case[1:]
    # every mask in one graph (one compile): the tensors are inputs, the windows' ints constants
    traced = torch.compile(lambda: [attention_mask(U["window"], T, Tp, "cpu", 2, U["window_dev"], U["window_static"])
                                    for U, T, Tp in cases], fullgraph=True, backend="eager")()
    for g, w, case in zip(traced, want, cases):
        assert (g is None and w is None) or torch.equal(g, w), case[1:]
    host = torch.compile(lambda w, d: attention_mask(w, 8, 0, "cpu", 2, d), fullgraph=True, backend="eager")
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):  # reads the host
        host(W["window"], W["window_dev"])


def test_train_compile_matches_eager(corpus, tmp_path, monkeypatch):
    """`train --compile` compiles the loss (once) and trains; its losses follow the eager run's."""
    compiled = []
    compile_loss = SNLPLoss.compile_loss
    monkeypatch.setattr(SNLPLoss, "compile_loss", lambda self: compiled.append(self.cfg) or compile_loss(self))
    kw = dict(BASE, data=str(corpus), steps=4, reg="idn", lam=0.5)
    eager = train(TrainConfig(**kw, out=str(tmp_path / "eager")))
    argv = [a for k, v in kw.items() if k not in ("progress", "n_par_set")
            for a in (f"--{k.replace('_', '-')}", str(v))]
    argv += ["--n-par-set", "2,4", "--no-progress", "--compile", "--out", str(tmp_path / "compiled")]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert train_cmd.main(argv) == 0
    assert [c.compile for c in compiled] == [True]
    losses = [m["loss"] for m in train_lines(tmp_path / "compiled") if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5  # it trained
    for a, b in zip(eager.losses, losses):
        assert b == pytest.approx(a, rel=1e-4)


def test_compile_option():
    """--compile is a flag of the command line, bookkeeping for the run's identity (the same run folder, and
    a run resumes with or without it), and refused with one line where the loss does not compile."""
    cfg = train_cmd.config_from_args(["--model", "tiny", "--compile"])
    assert cfg.compile and not train_cmd.config_from_args(["--model", "tiny"]).compile
    assert "torch.compile" in train_cmd.build_parser().format_help()
    plain = resolve(TrainConfig(**BASE, reg="idn"))
    assert runs.run_dir(plain) == runs.run_dir(dataclasses.replace(plain, compile=True))
    assert runs.comparable(dataclasses.asdict(plain)) == runs.comparable(
        dataclasses.asdict(dataclasses.replace(plain, compile=True)))
    for kw, msg in [(dict(reg="diagn"), "--reg diagn .*with --compile use --reg none, jacobi, idn"),
                    (dict(reg="newton"), "--reg newton"), (dict(objective="snlp-forward"), "objective 'snlp-forward'")]:
        with pytest.raises(ValueError, match=msg):
            resolve(TrainConfig(**BASE, compile=True, **kw))
    assert train_cmd.main(["--model", "tiny", "--reg", "diagn", "--compile"]) == 2
