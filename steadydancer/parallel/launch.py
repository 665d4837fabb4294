"""Starting and stopping the ranks of one distributed run (torchrun, or processes spawned from Python).

- ``init_rank(...)``: the process-group setup every rank does (NCCL on CUDA with one GPU per rank, gloo on CPU),
  from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) or explicit values.
- ``spawn_ranks(fn, world, args)``: runs ``fn(rank, *args)`` in ``world`` fresh processes (``spawn`` start
  method, so CUDA is safe) and waits. If any rank dies (a crash, a signal, ``os._exit``) or raises, the others are
  stopped (SIGTERM, then SIGKILL), every process is reaped, and ``DistributedWorkerError`` says which rank failed
  and how; the others typically fail a moment later in their next collective ("Connection closed by peer" on
  gloo), which is reported beside it. ``deadline_s`` bounds the whole run.

``fn`` must be importable by the spawned interpreter (a module-level function), and it must import what makes
its own imports resolve (the tests' worker module imports ``conftest`` first).
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistributedWorkerError", "free_port", "init_rank", "spawn_ranks", "from_env"]


class DistributedWorkerError(RuntimeError):
    """A rank of a distributed run died, raised, or the run passed its deadline."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_rank(rank: Optional[int] = None, world: Optional[int] = None, port: Optional[int] = None,
              backend: Optional[str] = None, timeout_s: float = 600.0, device: Optional[int] = None):
    """Initialize the default process group for this rank and return its torch device.

    ``backend`` None: NCCL when CUDA is available (device ``cuda:<device or LOCAL_RANK>``), else gloo (CPU).
    With ``port`` the rendezvous is ``tcp://127.0.0.1:port`` (one host); without it torchrun's ``env://``."""
    env_rank, env_world, local = from_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dev = torch.device("cpu")
    if backend == "nccl":
        n = torch.cuda.device_count()
        idx = local if device is None else device
        if idx >= n:
            raise DistributedWorkerError(f"rank {rank} needs GPU {idx}, this machine has {n} visible GPU(s)")
        torch.cuda.set_device(idx)
        dev = torch.device("cuda", idx)
    kw = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    if port is not None:
        kw["init_method"] = f"tcp://127.0.0.1:{port}"
    if backend == "nccl":
        kw["device_id"] = dev  # eager NCCL communicator init: a broken GPU fails here, not in the first forward
    dist.init_process_group(**kw)
    return dev


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def _describe(processes) -> str:
    return ", ".join(f"rank {i}: exit {p.exitcode}" for i, p in enumerate(processes))


def _died(processes) -> list:
    """Ranks that ended without a Python exception and not by our SIGTERM: crashes, os._exit, the OOM killer."""
    return [i for i, p in enumerate(processes) if p.exitcode not in (None, 0, 1, -15)]


def spawn_ranks(fn: Callable, world: int, args: Sequence = (), deadline_s: Optional[float] = None,
                grace_s: float = 3.0) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned processes; raise ``DistributedWorkerError`` on any failure.
    After a failure the other ranks get ``grace_s`` to fail by themselves (their collectives break), then they
    are stopped. No process survives this call, whatever happens."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=tuple(args), nprocs=world, join=False, start_method="spawn")
    start = time.monotonic()
    try:
        while not ctx.join(timeout=0.5, grace_period=grace_s):
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                _stop(ctx.processes)
                raise DistributedWorkerError(f"distributed run of {world} ranks did not finish within "
                                             f"{deadline_s:g} s; all ranks stopped ({_describe(ctx.processes)})")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        _stop(ctx.processes)
        died = _died(ctx.processes)
        if died:  # name the rank that crashed, even if a survivor's broken collective was noticed first
            i = died[0]
            code = ctx.processes[i].exitcode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            head = f"rank {i} of {world} died ({how})"
        elif isinstance(e, mp.ProcessRaisedException):
            lines = str(e).strip().splitlines()
            head = f"rank {e.error_index} of {world} failed: {lines[-1] if lines else e}"
        else:
            head = f"rank {e.error_index} of {world} exited abnormally: {e}"
        detail = f"\n{e}" if isinstance(e, mp.ProcessRaisedException) else ""
        raise DistributedWorkerError(f"{head}; all ranks stopped ({_describe(ctx.processes)}){detail}") from None
    finally:
        _stop(ctx.processes)
