"""One video on several processes / GPUs: Ulysses sequence parallelism inside the DiT forward and guidance
parallelism around the model callable, over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Layout: ``world = guidance x sequence`` ranks. Rank ``r`` is in sequence group ``r // sequence`` (consecutive
ranks: the all-to-alls stay inside one NVLink island first) at position ``r % sequence``, and in the guidance
group of all ranks with the same position. Every rank holds the whole model, runs the whole sampler loop
redundantly (same seed, same CPU-drawn noise) and ends with the same latent bit for bit, because every model
output it uses comes from the same all-gather.

**Sequence axis** (``Ulysses``, enabled with ``enable_sequence_parallel(model, group)``): the DiT forward is
unchanged up to the token embeddings (pose modules, patch embeddings, time / text / CLIP embeddings run whole on
every rank, as in the official ``usp_dit_forward``). Then the ``L = (F + 2) h' w'`` tokens (the two reference
frames are the last ``2 h' w'``) are split into contiguous slices of ``s = ceil(L / N)``; the last slice is
zero-padded when ``L % N != 0`` (the official code has no padding and crashes there). The RoPE table is built
for the whole grid and sliced (identity rows for the padding). Per block, only the self-attention core
communicates: q, k, v of the local tokens (after RMSNorm and RoPE, as official) go through one
``all_to_all_single`` to ``[B, N s, H / N, D]`` (the whole sequence, H / N heads), the padded tail is cut off so
**a padded token is never attended, as key or as query**, the attention backend (SDPA, cuDNN, flash, top-k
sparse...) runs on exactly the ``L`` real tokens of its heads, and a second all-to-all brings the outputs back.
Cross-attention (local queries against the replicated 257 + 512 context tokens), modulation, norms and FFN are
per token and stay local. The head runs on the local tokens, an all-gather rebuilds the
sequence, the padding is dropped and unpatchify runs as before. Heads must divide by N (40 heads: N in 2, 4, 5,
8, 10, 20, 40).

**Guidance axis** (``GuidanceParallel``): a wrapper with the DiT's call signature. When a sampler batches a
step's guidance passes along the batch dimension (``batch_passes=True``), the batch is split into ``G``
contiguous shares (``ceil(B / G)`` rows; a shorter last share is zero-padded after the forward, never computed),
each guidance group runs its share, and an all-gather rebuilds the batch in order. Unbatched
calls (one pass, e.g. the rCM turbo sampler) run whole on every guidance group. Sampler code is unchanged.

Why plain ``torch.distributed.all_to_all_single`` and not xfuser / yunchang (docs/spec-distributed.md): xfuser
0.7.0 does not import without a GPU (so no CPU tests), needs flash-attn and keeps global process-group
singletons; yunchang's torch-kernel paths are partly wrong on CPU and it also uses a global ``PROCESS_GROUP``;
both bring a ring-attention merge we do not want (never bit-exact). Ulysses here is two all-to-alls around our
own attention registry, works on gloo and NCCL, keeps every kernel we have (fp8 layers, top-k sparse) and needs
no global state. Inside ``torch.compile`` regions the traceable functional form
(``torch.distributed._functional_collectives.all_to_all_single``) is used, so compiled blocks stay one graph.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..kernels.attention import attention as _attention
from ..model.batching import rows as _rows

__all__ = ["Layout", "ParallelContext", "Ulysses", "GuidanceParallel", "init_parallel", "enable_sequence_parallel",
           "disable_sequence_parallel", "parallelize", "runtime_info", "DistributedSetupError"]


class DistributedSetupError(RuntimeError):
    """A layout that cannot run (sizes, heads, missing process group)."""


# ---------------------------------------------------------------------------------------------------- collectives
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange the N equal dim-0 chunks of x with the N ranks of group (chunk j goes to rank j)."""
    x = x.contiguous()
    if torch.compiler.is_compiling():  # traceable form: compiled blocks stay one graph (fullgraph=True)
        import torch.distributed._functional_collectives as fc
        return fc.wait_tensor(fc.all_to_all_single(x, None, None, group))
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[n, ...] from every rank of group -> [world, n, ...] in rank order."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # concatenated form
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # new name in torch 2.13
    gather(out, x, group=group)
    return out.view(world, *x.shape)


# ---------------------------------------------------------------------------------------------------- sequence axis
class Ulysses:
    """Sequence-parallel state shared by a model and its blocks' self-attentions (one per process group)."""

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise DistributedSetupError("torch.distributed is not initialized (init_parallel / init_process_group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.valid_len: Optional[int] = None   # real tokens of the current forward (set by scatter)
        self.local_len: Optional[int] = None

    def split(self, length: int) -> int:
        """Tokens per rank (the last rank's slice is padded up to it)."""
        return -(-length // self.world)

    def scatter(self, tok: torch.Tensor, freqs):
        """tok [B, L, C] (whole sequence) -> this rank's [B, s, C] slice; freqs (complex [L, 1, D/2] or the
        (cos, sin) [L, 1, D] tables) -> the same rows. Padding: zero tokens, identity rotations."""
        length = tok.shape[1]
        s = self.split(length)
        self.valid_len, self.local_len = length, s
        lo, hi = self.rank * s, min(length, (self.rank + 1) * s)
        pad = s - max(0, hi - lo)
        local = tok[:, lo:hi]
        if pad:
            local = F.pad(local, (0, 0, 0, pad))

        def rows(t, fill):
            r = t[lo:hi]
            if pad:
                r = torch.cat([r, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])
            return r

        if isinstance(freqs, tuple):  # (cos, sin): identity is cos 1, sin 0
            freqs = (rows(freqs[0], 1.0), rows(freqs[1], 0.0))
        else:
            freqs = rows(freqs, 1.0)
        return local.contiguous(), freqs

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, s, C] per rank -> [B, L, C] (padding dropped)."""
        b, s, c = x.shape
        full = _all_gather(x, self.group, self.world)                  # [N, B, s, C]
        return full.permute(1, 0, 2, 3).reshape(b, self.world * s, c)[:, : self.valid_len]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Self-attention of the whole sequence for local q, k, v [B, s, H, D] -> local output [B, s, H, D]."""
        n = self.world
        b, s, h, d = q.shape
        if h % n:
            raise DistributedSetupError(f"{h} attention heads do not divide over {n} sequence-parallel ranks")
        hn, length = h // n, self.valid_len
        qkv = torch.stack([q, k, v]).view(3, b, s, n, hn, d).permute(3, 0, 1, 2, 4, 5)   # [N, 3, B, s, H/N, D]
        qkv = _all_to_all(qkv, self.group)                              # [N src ranks, 3, B, s, H/N, D]
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, n * s, hn, d)[:, :, :length]  # padded tail cut off
        out = _attention(qkv[0], qkv[1], qkv[2], backend)              # [B, L, H/N, D]: only real tokens
        if n * s != length:
            out = F.pad(out, (0, 0, 0, 0, 0, n * s - length))
        out = out.view(b, n, s, hn, d).permute(1, 0, 2, 3, 4)          # [N dst ranks, B, s, H/N, D]
        out = _all_to_all(out, self.group)                              # [N head groups, B, s, H/N, D]
        return out.permute(1, 2, 0, 3, 4).reshape(b, s, h, d)


def enable_sequence_parallel(model, group=None) -> Ulysses:
    """Split every forward of ``model`` (a SteadyDancerDiT) over the ranks of ``group``. Returns the state."""
    heads = model.config.num_heads
    sp = Ulysses(group)
    if heads % sp.world:
        raise DistributedSetupError(f"the model has {heads} attention heads; they do not divide over {sp.world} "
                                    f"sequence-parallel ranks (use a sequence size that divides {heads})")
    model.sequence_parallel = sp
    for blk in model.blocks:
        blk.self_attn.sequence_parallel = sp
    return sp


def disable_sequence_parallel(model) -> None:
    model.sequence_parallel = None
    for blk in model.blocks:
        blk.self_attn.sequence_parallel = None


# ---------------------------------------------------------------------------------------------------- guidance axis
class GuidanceParallel:
    """``wrapper(x, timestep, *args)`` like the DiT: a batched call is split over the guidance groups."""

    def __init__(self, model, group=None):
        self.model = model
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __getattr__(self, name):  # config, compute_dtype, ... of the wrapped model (the samplers read them)
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x, timestep, *args):
        b, g = x.shape[0], self.world
        if g == 1 or b == 1:
            return self.model(x, timestep, *args)
        share = -(-b // g)
        lo = min(b, self.rank * share)
        hi = min(b, lo + share)
        n = hi - lo
        if n == 0:  # more groups than rows (e.g. 2 passes on 4 groups): compute a real row, send zeros
            lo, hi = b - 1, b
        out = self.model(x[lo:hi], _rows(timestep, b, lo, hi), *[_rows(a, b, lo, hi) for a in args])
        if n < share:
            out = out[:n] if n else out[:0]
            out = torch.cat([out, out.new_zeros((share - n, *out.shape[1:]))])
        full = _all_gather(out, self.group, g)                           # [G, share, ...]
        return full.reshape(g * share, *out.shape[1:])[:b]


# ---------------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    guidance: int = 1
    sequence: int = 1

    @property
    def world(self) -> int:
        return self.guidance * self.sequence

    def __str__(self) -> str:
        return f"{self.guidance}x{self.sequence}"

    @classmethod
    def parse(cls, text: str, world: int) -> "Layout":
        """``"2x4"`` (guidance x sequence), ``"seq"`` (1 x world), ``"cfg"`` (world x 1), ``"auto"``."""
        text = text.strip().lower()
        if text in ("seq", "sequence"):
            return cls(1, world)
        if text in ("cfg", "guidance"):
            return cls(world, 1)
        if text == "auto":
            return cls(1, world)
        try:
            g, s = (int(v) for v in text.split("x"))
        except ValueError:
            raise DistributedSetupError(f"layout {text!r}: expected GxS (e.g. 2x4), 'seq', 'cfg' or 'auto'") from None
        return cls(g, s)


@dataclasses.dataclass
class ParallelContext:
    layout: Layout
    rank: int
    seq_group: object
    cfg_group: object
    seq_rank: int
    cfg_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(layout: Layout, groups_cache: Optional[dict] = None) -> ParallelContext:
    """Process groups for ``layout`` on the initialized default group (every rank must call this, in the same
    order: ``new_group`` is collective). ``world`` must equal ``layout.world``."""
    if not dist.is_initialized():
        raise DistributedSetupError("torch.distributed is not initialized")
    world, rank = dist.get_world_size(), dist.get_rank()
    if layout.guidance < 1 or layout.sequence < 1 or layout.world != world:
        raise DistributedSetupError(f"layout {layout} needs {layout.world} ranks, this run has {world}")
    g, s = layout.guidance, layout.sequence
    seq_group = cfg_group = None
    for i in range(g):  # sequence groups: consecutive ranks
        grp = dist.new_group(list(range(i * s, (i + 1) * s)))
        if rank // s == i:
            seq_group = grp
    for j in range(s):  # guidance groups: same position in every sequence group
        grp = dist.new_group(list(range(j, world, s)))
        if rank % s == j:
            cfg_group = grp
    return ParallelContext(layout, rank, seq_group, cfg_group, rank % s, rank // s)


def parallelize(model, ctx: ParallelContext, force_sequence: bool = False):
    """The callable the samplers get: ``model`` with the sequence axis switched on (when the layout has more
    than one sequence rank, or ``force_sequence``: the Ulysses code path on a one-rank group, for checks),
    wrapped for the guidance axis when it has more than one group."""
    if ctx.layout.sequence > 1 or force_sequence:
        enable_sequence_parallel(model, ctx.seq_group)
    else:
        disable_sequence_parallel(model)
    return GuidanceParallel(model, ctx.cfg_group) if ctx.layout.guidance > 1 else model


def runtime_info() -> dict:
    """Backend, world size and NCCL version (for logs and bench tables)."""
    info = {"backend": dist.get_backend() if dist.is_initialized() else None,
            "world": dist.get_world_size() if dist.is_initialized() else 1, "torch": torch.__version__}
    try:
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # CPU build
        info["nccl"] = None
    return info


def check_tokens(length: int, sequence: int) -> dict:
    """How ``length`` tokens split over ``sequence`` ranks: tokens per rank and padded tokens (for logs/docs)."""
    s = math.ceil(length / sequence)
    return {"tokens": length, "per_rank": s, "padded": s * sequence - length}


def split_sizes(b: int, groups: int) -> Sequence[int]:
    """Rows each guidance group computes for a batch of b (documentation/tests helper)."""
    share = -(-b // groups)
    return [max(0, min(b, (i + 1) * share) - min(b, i * share)) for i in range(groups)]
