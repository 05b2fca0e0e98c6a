import pytest
import torch

import snlp_lab

# Toy models: extra threads only add synchronisation, and on a shared 2-core machine they make a
# tiny matmul thousands of times slower. One thread keeps the suite fast and steady.
torch.set_num_threads(1)


def randomize(model, scale: float = 0.3, seed: int = 0):
    """Give a fresh model non-trivial weights: nanochat zero-initialises the output projections,
    which would make every layer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "ve_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            elif name.endswith("x0_lambdas"):
                p.copy_(0.1 + 0.2 * torch.rand(p.shape, generator=g))
            elif name.endswith("resid_lambdas"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            elif name == "smear_gate.weight":  # smear and backout start small or switched off
                p.copy_(torch.randn(p.shape, generator=g))
            elif name in ("smear_lambda", "backout_lambda"):
                p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=g))
    return model


@pytest.fixture
def tiny():
    """The tiny preset (x0ve + GQA) in float64 with random non-trivial weights."""
    torch.manual_seed(0)
    return randomize(snlp_lab.build_model("tiny").double())


@pytest.fixture
def tiny_plain():
    torch.manual_seed(0)
    return randomize(snlp_lab.build_model("tiny", x0ve=False, n_kv_head=4).double())


@pytest.fixture
def idx():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
