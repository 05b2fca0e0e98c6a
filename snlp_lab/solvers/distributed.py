"""SNLP across devices: each rank of a torch.distributed group holds a contiguous slice of the parallel
units, evaluates it in one batched call per iteration, and one collective carries each slice's
correction to the slices after it.

    torchrun --nproc_per_node 2 my_script.py        # NCCL on GPUs, gloo on CPUs
    res = solve_distributed(model, idx, method="idn", iters=1, n_par=12)   # every rank calls it
    res.logits                                       # on the last rank; None on the others

The iteration is `solver.iterate`'s, cut along depth. With the units split into slices [a_r, b_r) over
P ranks, the correction d solves d_j = r_j + A_j d_{j-1} over all units. Each rank solves its slice's
part from zero, d^loc = scan(r), and forms its slice's transfer operator Φ_r = A_{b-1} ⋯ A_a (a scalar
for IDN, a diagonal for DiagN, n×n stream matrices for HCN: `Surrogate.operator`). One all-gather of
(d^loc at the slice's last unit, Φ_r) gives every rank what the earlier slices pass on: the correction
entering its slice, d_in,r = c_{r-1} + Φ_{r-1} d_in,r-1 (for IDN, A = I: the exclusive prefix sum over
ranks of the slices' accumulated deltas). The rank adds Φ_{≤j} d_in to its local corrections, and
d_in,r also moves its copy of the state that enters its slice, so no state crosses ranks during the
iteration. Exact Newton has no operator that can cross ranks (its A_j is a Jacobian product) and is
refused.

Per iteration each rank contributes one tensor of B·T·D (·n on mHC) elements plus its operator: for
IDN a scalar, for DiagN another B·T·D, for static HCN n² (dynamic: B·T·n²). `payload_elements` gives it.
Once per solve, rank 0 broadcasts the embedding x0 and the state h_S after the sequential prefix, and
(with init "fwd") one more all-gather gives each slice its entering state; after the last iteration the
head's inputs go to the last rank by point-to-point.

The baseline in the same code, `pipeline_forward`, is sequential pipeline execution over the same
slices: rank r waits for rank r-1's output state (recv), runs its units one after another, and sends
its output on (send): P hops of one state each on the critical path.

Layout: the embedding, the sequential prefix and the backout state's source live where they are
computed (rank 0 for the prefix); the head on the last rank, which ends the critical path. The units
are split as evenly as they go (`split_units`): the first U mod P ranks take one more.
Source: docs/design.md §1 (the iteration) and docs/distributed.md (this layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.fusion import chunk_stack
from ..models.model import Context
from .grammar import SNLPConfig, parse_chunks
from .solver import head_logits
from .surrogates import SURROGATES


def split_units(units: int, ranks: int) -> list[range]:
    """Contiguous slices of `units` parallel units over `ranks` ranks, sizes differing by at most one
    (the first units % ranks ranks take one more). ValueError when a rank would hold no unit."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    if ranks > units:
        raise ValueError(f"{ranks} ranks cannot each hold a slice of {units} parallel units; use at most {units} "
                         f"processes, or more parallel units (n_par, or chunks CxFM with more chunks)")
    q, extra = divmod(units, ranks)
    starts = [r * q + min(r, extra) for r in range(ranks + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(ranks)]


class UnitSlice:
    """Units a..b-1 of a layer stack (a model, or a chunk stack) as a layer stack of their own, indexed
    from 0: what one rank's surrogate sees."""

    def __init__(self, stack, a: int, b: int):
        self.stack, self.a, self.b, self.n_layer = stack, a, b, b - a
        self.config = getattr(stack, "config", None)
        if hasattr(stack, "res_matrices"):  # mHC: HCN's stream matrices of these units
            self.res_matrices = lambda i, j, H=None, ctx=None, past=None: stack.res_matrices(a + i, a + j, H, ctx, past)

    def layers(self, i: int, j: int, H: torch.Tensor, ctx) -> torch.Tensor:
        return self.stack.layers(self.a + i, self.a + j, H, ctx)

    def layer(self, i: int, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.stack.layer(self.a + i, h, ctx)

    def resid_scale(self, i: int) -> torch.Tensor:
        return self.stack.resid_scale(self.a + i)


def slice_stack(model, S: int, M: int, units: range, chunks: str | None) -> UnitSlice:
    """This rank's parallel units as a layer stack indexed from 0: layers S + units of the model, or
    (chunks) the fused chunks of layers S + units·M, built from those layers' weights only."""
    if chunks is None:
        return UnitSlice(model, S + units.start, S + units.stop)
    return UnitSlice(chunk_stack(model, S + units.start * M, S + units.stop * M, M), 0, len(units))


@dataclass
class DistributedResult:
    """What `solve_distributed` and `pipeline_forward` return on each rank."""
    units: range  # the parallel units this rank held
    states: torch.Tensor  # [len(units), B, T, ...] their final outputs (chunk-boundary states with chunks)
    prefix: torch.Tensor | None  # h_0..h_S [S+1, B, T, ...] on rank 0, None elsewhere
    logits: torch.Tensor | None  # [B, T, V] on the last rank, None elsewhere
    payload_elements: int  # elements this rank sends in each iteration's collective (0: the pipeline)


def shard(model, n_par: int | None = None, chunks: str | None = None, group=None):
    """Free on this rank every weight its part of a layer-sliced run with these parallel units does not
    read (`GPT.hold`): rank 0 keeps the embedding, the prefix layers and its slice; the others their
    slice; the last rank the head. Memory per rank is then about 1/P of the blocks. Every rank of the
    group calls it with the same options; the model then serves `solve_distributed`, `pipeline_forward`
    and `DistributedDecoder` with those options only. Returns the model."""
    rank, P = rank_and_size(group)
    S, U, M = parallel_units(model, n_par, chunks)
    mine = split_units(U, P)[rank]
    return model.hold(range(0 if rank == 0 else S + mine.start * M, S + mine.stop * M),
                      embedding=rank == 0, head=rank == P - 1)


def rank_and_size(group) -> tuple[int, int]:
    """(this rank, ranks) in `group` (None: the world); ValueError when no process group exists."""
    if not dist.is_initialized():
        raise ValueError("no torch.distributed process group: launch with torchrun (or call "
                         "torch.distributed.init_process_group) first")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, r: int) -> int:
    """Rank r of `group` in the world's numbering, which send, recv and broadcast take."""
    return r if group is None else dist.get_global_rank(group, r)


def layer_context(model, idx: torch.Tensor, x0: torch.Tensor, pos: int = 0) -> Context:
    """The layers' Context of tokens idx [B, T] at position pos from the broadcast embedding x0: what
    `embed` builds, without the embedding table (rank 0 holds it)."""
    cos, sin = model.rotary(x0.device, x0.dtype)
    T = idx.shape[1]
    return Context(idx=idx, x0=x0, cos=cos[pos:pos + T], sin=sin[pos:pos + T], pos=pos,
                   qk_scale=model.config.qk_scale)


def _start(model, idx, S: int, rank: int, group):
    """Rank 0 embeds and runs the sequential prefix; every rank receives x0 and h_S (one broadcast
    each). Returns (prefix states or None, h_S, ctx)."""
    if rank == 0:
        h, ctx = model.embed(idx)
        prefix = [h]
        for l in range(S):
            prefix.append(model.layer(l, prefix[-1], ctx))
        hS, x0 = prefix[-1].contiguous(), ctx.x0.contiguous()
    else:
        prefix = None
        hS, x0 = empty_states(model, idx)
    dist.broadcast(x0, global_rank(group, 0), group=group)
    dist.broadcast(hS, global_rank(group, 0), group=group)
    return (None if prefix is None else torch.stack(prefix)), hS, layer_context(model, idx, x0)


def empty_states(model, idx):
    """Empty tensors to receive h_S (with the stream axis on mHC) and x0 into, in the model's dtype."""
    p = model.lm_head.weight
    B, T, D = *idx.shape, model.config.n_embd
    n = getattr(model.config, "n_streams", 1)
    return p.new_empty((B, T, n, D) if n > 1 else (B, T, D)), p.new_empty(B, T, D)


def parallel_units(model, n_par: int | None, chunks: str | None) -> tuple[int, int, int]:
    """(S prefix layers, parallel units, layers per unit M) of the last n_par layers (default all), or
    of the C fused chunks of M layers that chunks="CxFM" names. ValueError for n_par outside 1..L."""
    L = model.n_layer
    if chunks is not None:
        C, M = parse_chunks(chunks, n_par)
        n_par = C * M
    n_par = L if n_par is None else n_par
    if isinstance(n_par, bool) or not isinstance(n_par, int) or not 1 <= n_par <= L:
        raise ValueError(f"n_par must be an integer in 1..{L} (the model's depth), got {n_par!r}")
    return (L - n_par, n_par, 1) if chunks is None else (L - n_par, C, M)


def finish_head(model, H: torch.Tensor, slices: list[range], S: int, M: int, prefix, rank: int, group):
    """The head on the last rank: the last state is its own; the backout state comes from the rank
    that computed it (point-to-point)."""
    P, mine = len(slices), slices[rank]
    b = getattr(model, "backout_layer", None)
    hb = None
    if b is not None:
        u = None if b < S else (b - S) // M  # the unit whose output is the backout state
        owner = 0 if u is None else next(r for r, s in enumerate(slices) if u in s)
        if owner == P - 1:
            if rank == owner:
                hb = prefix[b + 1] if u is None else H[u - mine.start]
        elif rank == owner:
            dist.send((prefix[b + 1] if u is None else H[u - mine.start]).contiguous(), global_rank(group, P - 1),
                      group=group)
        elif rank == P - 1:
            hb = torch.empty_like(H[-1])
            dist.recv(hb, global_rank(group, owner), group=group)
    if rank != P - 1:
        return None
    return head_logits(model, H[-1], hb)


def check_layout(model, method, iters, n_par, chunks, init, kappa, probes, seed, group, decoding: bool = False):
    """The checks shared by the distributed solve and decoder: the options (as `SNLPConfig.check`), a
    method whose correction can cross ranks, and the slices. Returns (rank, P, S, units, M, slices)."""
    rank, P = rank_and_size(group)
    L = model.n_layer
    S, U, M = parallel_units(model, n_par, chunks)
    SNLPConfig(method, iters, None if method == "sequential" and chunks is None else L - S, chunks, init, kappa,
               probes, "jvp", seed).check(L, decoding=decoding)
    if method == "newton":
        valid = ", ".join(m for m in SURROGATES if m != "newton")
        raise ValueError(f"method 'newton' has no operator that can cross ranks (its A_l is a Jacobian product); "
                         f"valid distributed methods: {valid}")
    return rank, P, S, U, M, split_units(U, P)


def entering_state(hS: torch.Tensor, H: torch.Tensor, group=None) -> torch.Tensor:
    """The initial guess of the state that enters this rank's slice: h_S on rank 0, else the last unit
    of the slice before (one all-gather of every slice's last initial state)."""
    rank, P = rank_and_size(group)
    if P == 1:
        return hS
    last = [torch.empty_like(H[-1]) for _ in range(P)]
    dist.all_gather(last, H[-1].contiguous(), group=group)
    return hS if rank == 0 else last[rank - 1]


def iterate_sliced(f, entering: torch.Tensor, H: torch.Tensor, sur, iters: int, group=None):
    """`iters` structured Newton iterations of this rank's slice, shared by `solve_distributed` and the
    distributed decoder: f maps the slice's inputs [n, ...] to its outputs (one batched call), entering
    is the current state that enters the slice, H [n, ...] the slice's current outputs, sur its
    surrogate (`UnitSlice` units 0..n-1). One all-gather per iteration (module docstring).
    Returns (H, entering, elements this rank sent per iteration)."""
    rank, P = rank_and_size(group)
    n, sent = H.shape[0], 0
    for _ in range(iters):
        X = torch.cat([entering.unsqueeze(0), H[:-1]])
        Fx = f(X)
        r = Fx - H
        sur.update(X, Fx)
        d = sur.scan(r)
        if P > 1:
            op = sur.operator(0)
            for j in range(1, n):
                op = sur.compose(sur.operator(j), op)
            c, op = d[-1], op.to(d.dtype)
            payload = torch.cat([c.reshape(-1), op.reshape(-1)])
            sent = payload.numel()
            parts = [torch.empty_like(payload) for _ in range(P)]
            dist.all_gather(parts, payload, group=group)
            d_in = torch.zeros_like(c)
            for q in range(rank):  # what slices 0..rank-1 pass on, in order
                c_q, op_q = parts[q][:c.numel()].view_as(c), parts[q][c.numel():].view_as(op)
                d_in = c_q + sur.apply(op_q, d_in)
            if rank > 0:
                e, add = d_in, []
                for j in range(n):  # A_j ⋯ A_0 d_in: the entering correction carried through the slice
                    e = sur.apply(sur.operator(j), e)
                    add.append(e)
                d = d + torch.stack(add)
                entering = entering + d_in
        H = H + d
    return H, entering, sent


@torch.no_grad()
def solve_distributed(model, idx: torch.Tensor, method: str = "idn", iters: int = 1, n_par: int | None = None,
                      chunks: str | None = None, init: str = "h0", kappa: float = 0.0, probes: int = 1,
                      seed: int = 0, group=None) -> DistributedResult:
    """`solver.solve` over the ranks of `group` (default: the whole world): every rank calls it with the
    same model, idx and options, and evaluates only its slice of the parallel units (`split_units`).

    idx: token ids [B, T] on this rank's device, the same on every rank. Returns this rank's
    `DistributedResult`: its units' final states, h_0..h_S on rank 0 and the logits [B, T, V] on the
    last rank. Equal to `solve(...)` up to rounding (for DiagN: up to its random probes, which each rank
    draws for its own slice). Raises ValueError for bad options (as `solve`; tol is not offered), for
    method "newton", and for more ranks than parallel units."""
    if method == "sequential":
        raise ValueError("solve_distributed solves the parallel units; for the sequential pass over the same "
                         "ranks use pipeline_forward")
    rank, P, S, U, M, slices = check_layout(model, method, iters, n_par, chunks, init, kappa, probes, seed, group)
    mine = slices[rank]
    prefix, hS, ctx = _start(model, idx, S, rank, group)
    sl = slice_stack(model, S, M, mine, chunks)
    n = sl.n_layer
    sur = SURROGATES[method](sl, 0, n, ctx, kappa=kappa, probes=probes, generator=torch.Generator().manual_seed(seed))
    f = lambda X: sl.layers(0, n, X, ctx)
    H = hS.expand(n, *hS.shape) if init == "h0" else f(hS.expand(n, *hS.shape))
    entering = hS if init == "h0" else entering_state(hS, H, group)
    H, entering, sent = iterate_sliced(f, entering, H, sur, iters, group)
    logits = finish_head(model, H, slices, S, M, prefix, rank, group)
    return DistributedResult(units=mine, states=H, prefix=prefix, logits=logits, payload_elements=sent)


@torch.no_grad()
def pipeline_forward(model, idx: torch.Tensor, n_par: int | None = None, chunks: str | None = None,
                     group=None) -> DistributedResult:
    """The sequential forward as a pipeline over the ranks of `group`, the baseline of
    `solve_distributed` on the same slices: rank 0 runs the prefix, then each rank waits for the state
    from the rank before it (recv), runs its units one after another and sends the result on. With
    chunks, the fused model's sequential pass. Returns this rank's `DistributedResult` (logits on the
    last rank)."""
    rank, P = rank_and_size(group)
    S, U, M = parallel_units(model, n_par, chunks)
    slices = split_units(U, P)
    mine = slices[rank]
    prefix, hS, ctx = _start(model, idx, S, rank, group)
    stack = slice_stack(model, S, M, mine, chunks)
    h = hS
    if rank > 0:
        h = torch.empty_like(hS)
        dist.recv(h, global_rank(group, rank - 1), group=group)
    out = []
    for j in range(stack.n_layer):
        h = stack.layer(j, h, ctx)
        out.append(h)
    if rank < P - 1:
        dist.send(h.contiguous(), global_rank(group, rank + 1), group=group)
    H = torch.stack(out)
    logits = finish_head(model, H, slices, S, M, prefix, rank, group)
    return DistributedResult(units=mine, states=H, prefix=prefix, logits=logits, payload_elements=0)
