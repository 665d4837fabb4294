"""Block swap: run a DiT whose transformer blocks do not all fit in GPU memory.

``N`` of the blocks (``model.blocks[:N]``, the first ones, as Kijai's WanVideo wrapper does) keep their
weights in (pinned) host memory. A forward-pre-hook on each block makes sure its weights are on the
compute device before it runs, and starts copying the *next* swapped block on a side CUDA stream so the
transfer overlaps with compute; a forward hook drops the device copy again. At most
``1 + prefetch`` swapped blocks are on the device at any time.

Without CUDA the same code path runs (the "device" is the CPU, copies are no-ops, no streams).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn


def _tensors(module: nn.Module):
    """(owner module, attribute name, is_param) of every parameter and buffer under ``module``."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, name, True
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, name, False


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place (cudaHostRegister, portable); False when not possible."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1)) == 0
    except Exception:
        return False


def _host_unregister(ptr: int):
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:
        pass


class HostArena:
    """One flat host buffer for the weights of one swapped block, page-locked in place.

    PyTorch's pinned-memory caching allocator rounds every allocation up to a power of two (a 141 MB
    FFN weight takes 256 MB), so pinning tensor by tensor can cost up to 2x the host RAM. One exact-size
    buffer per block registered with cudaHostRegister costs exactly the block's bytes. Falls back to
    unpinned memory (transfers then stop overlapping with compute) when registration is not possible.
    """

    ALIGN = 256

    def __init__(self, nbytes: int, pin: bool):
        self.buf = torch.empty(max(1, int(nbytes)), dtype=torch.uint8)
        self.off = 0
        self.pinned = bool(pin) and _host_register(self.buf)
        if self.pinned:
            weakref.finalize(self, _host_unregister, self.buf.data_ptr())

    @classmethod
    def size_for(cls, tensors) -> int:
        return sum(t.numel() * t.element_size() + cls.ALIGN for t in tensors)

    def empty(self, shape, dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        off = -(-self.off // self.ALIGN) * self.ALIGN
        if off + nbytes > self.buf.numel():
            raise RuntimeError("HostArena overflow (size estimate too small)")
        self.off = off + nbytes
        return self.buf[off:off + nbytes].view(dtype).view(tuple(shape))


def module_bytes(module: nn.Module) -> int:
    return sum(getattr(m, n).numel() * getattr(m, n).element_size() for m, n, _ in _tensors(module))


def blocks_to_swap_for_budget(model: nn.Module, vram_budget_gb: float, prefetch: int = 1) -> int:
    """Smallest N such that the weights resident on the GPU fit in ``vram_budget_gb``.

    Counts the non-block weights, the ``L - N`` resident blocks and ``1 + prefetch`` in-flight copies
    of swapped blocks. Activations are not included: leave room for them in the budget you pass.
    """
    blocks = list(model.blocks)
    per_block = [module_bytes(b) for b in blocks]
    total = module_bytes(model)
    fixed = total - sum(per_block)
    budget = vram_budget_gb * (1 << 30)
    biggest = max(per_block) if per_block else 0
    for n in range(len(blocks) + 1):
        resident = fixed + sum(per_block[n:]) + (min(n, 1 + prefetch) * biggest)
        if resident <= budget:
            return n
    raise ValueError(f"a VRAM budget of {vram_budget_gb} GB cannot hold even the non-block weights "
                     f"({fixed / 2**30:.2f} GiB) plus {1 + prefetch} transformer blocks "
                     f"({biggest / 2**30:.2f} GiB each)")


class BlockSwap:
    """Block-swap controller attached to ``model.blocks``.

    ``BlockSwap(model, n, device)`` moves everything except ``model.blocks[:n]`` to ``device`` and keeps
    those ``n`` blocks on ``offload_device`` (pinned when ``device`` is CUDA). ``remove()`` takes the
    hooks off (blocks stay where they are); ``offload()`` moves the whole model to the offload device.
    """

    def __init__(self, model: nn.Module, blocks_to_swap: int, device, offload_device="cpu",
                 prefetch: int = 1, pin_memory: bool = True, arenas=None):
        # a weak reference: the model holds this controller (``model.block_swap``), and a strong one back would
        # make a cycle that keeps all the weights alive until Python's cycle collector runs (ComfyUI runs it only
        # every 10 s of idle time), instead of freeing them when the last user drops the model
        self._model = weakref.ref(model)
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.blocks = list(model.blocks)
        n = int(blocks_to_swap)
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"blocks_to_swap must be in 0..{len(self.blocks)}, got {n}")
        self.n = n
        self.prefetch = max(0, int(prefetch))
        self.cuda = self.device.type == "cuda"
        self.pin = pin_memory and self.cuda and self.offload_device.type == "cpu"
        # host memory the loader already placed (and page-locked) block by block; kept alive here
        self.arenas = list(arenas or [])
        self.prepinned = bool(self.arenas)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host = {}     # block index -> {(id(owner), name): host tensor}
        self._ready = {}    # block index -> (event or None, {(id(owner), name): device tensor})
        self._handles = []
        self.stats = {"prefetches": 0, "loads": 0}
        self.swapped = list(range(n))
        self._setup()

    @property
    def model(self) -> nn.Module:
        m = self._model()
        if m is None:
            raise RuntimeError("BlockSwap: the model it controls was freed")
        return m

    # -- placement -------------------------------------------------------------------------
    def _setup(self):
        swapped = set(self.swapped)
        for i, blk in enumerate(self.blocks):
            if i in swapped:
                self._host[i] = {}
                for mod, name, _ in _tensors(blk):
                    t = getattr(mod, name)
                    h = t.data.to(self.offload_device)
                    if self.pin and not h.is_pinned() and not self.prepinned:
                        h = h.pin_memory()
                    self._set(mod, name, h)
                self._handles.append(blk.register_forward_pre_hook(self._make_pre(i)))
                self._handles.append(blk.register_forward_hook(self._make_post(i)))
            else:
                blk.to(self.device)
        block_ids = {id(m) for b in self.blocks for m in b.modules()}
        for mod in self.model.modules():
            if id(mod) in block_ids:
                continue
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    self._set(mod, name, p.data.to(self.device))
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    self._set(mod, name, b.to(self.device))

    @staticmethod
    def _set(mod, name, t):
        if name in mod._parameters:
            p = mod._parameters[name]
            try:
                p.data = t
            except RuntimeError:  # e.g. to/from the meta device: a new Parameter object
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[name] = t

    def _host_tensors(self, i):
        """Host copies of block i, refreshed for tensors added since setup (e.g. LoRA patches)."""
        host = self._host[i]
        live = {}
        for mod, name, _ in _tensors(self.blocks[i]):
            key = (id(mod), name)
            t = getattr(mod, name)
            h = host.get(key)
            if h is None or (t.device == self.offload_device and t.data_ptr() != h.data_ptr()):
                h = t.data.to(self.offload_device)
                if self.pin and not h.is_pinned() and not self.prepinned:
                    h = h.pin_memory()
                host[key] = h
            live[key] = (mod, name, h)
        return live

    # -- transfers -------------------------------------------------------------------------
    def _start_copy(self, i):
        if i in self._ready:
            return
        live = self._host_tensors(i)
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            dev = {k: h.to(self.device, non_blocking=True) for k, (m, n, h) in live.items()}
            ev = None
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.stream)
        self._ready[i] = (ev, dev)

    def _make_pre(self, i):
        def pre(module, args):
            if i not in self._ready:
                self._start_copy(i)
                self.stats["loads"] += 1
            ev, dev = self._ready[i]
            if ev is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(ev)
                for t in dev.values():
                    t.record_stream(cur)
            live = self._host_tensors(i)
            for key, (mod, name, h) in live.items():
                self._set(mod, name, dev[key])
            # prefetch the next swapped blocks while this one computes
            for j in range(i + 1, min(i + 1 + self.prefetch, self.n)):
                if j not in self._ready:
                    self._start_copy(j)
                    self.stats["prefetches"] += 1
        return pre

    def _make_post(self, i):
        def post(module, args, output):
            live = self._host_tensors(i)
            for key, (mod, name, h) in live.items():
                self._set(mod, name, h)
            self._ready.pop(i, None)
            return output
        return post

    # -- lifecycle -------------------------------------------------------------------------
    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ready.clear()

    def offload(self):
        """Move every weight of the model to the offload device and free the device caches."""
        self._ready.clear()
        offload_model(self.model, self.offload_device)

    def __repr__(self):
        return f"BlockSwap(blocks_to_swap={self.n}/{len(self.blocks)}, device={self.device}, pinned={self.pin})"


def offload_model(model: nn.Module, offload_device="cpu"):
    """Move all parameters/buffers of ``model`` to ``offload_device`` and release cached device memory.

    Block-swapped blocks already live there; their (pinned) host copies are kept.
    """
    offload_device = torch.device(offload_device)
    for mod, name, _ in list(_tensors(model)):
        t = getattr(mod, name)
        if t.device != offload_device:
            BlockSwap._set(mod, name, t.data.to(offload_device))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def ensure_on_device(model: nn.Module):
    """Bring the non-swapped weights back to the compute device after :func:`offload_model`."""
    swap = getattr(model, "block_swap", None)
    if swap is None:
        return
    swapped_ids = {id(m) for i in swap.swapped for m in swap.blocks[i].modules()}
    for mod in model.modules():
        if id(mod) in swapped_ids:
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device != swap.device:
                BlockSwap._set(mod, name, p.data.to(swap.device))
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != swap.device:
                mod._buffers[name] = b.to(swap.device)


def gpu_bytes_estimate(model: nn.Module, n_swap: int, prefetch: int = 1) -> int:
    blocks = list(model.blocks)
    per = [module_bytes(b) for b in blocks]
    return module_bytes(model) - sum(per[:n_swap]) + min(n_swap, 1 + prefetch) * (max(per) if per else 0)


__all__ = ["BlockSwap", "blocks_to_swap_for_budget", "offload_model", "ensure_on_device", "module_bytes",
           "gpu_bytes_estimate"]
