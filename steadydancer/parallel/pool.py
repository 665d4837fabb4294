"""A persistent pool of worker processes, one per extra GPU, with this process as rank 0 (the ComfyUI process).

    pool = WorkerPool(devices=["cuda:0", "cuda:1", "cuda:2", "cuda:3"], layout=Layout(1, 4),
                      factory=("steadydancer.parallel.pool", "load_recipe", (recipe,)))  # each worker builds its model
    pool.start(model_rank0)            # starts the workers, waits until each has loaded its model, rendezvous
    latent = pool.sample("steadydancer.sampling.official:sample_official", cond, callback, seed=..., steps=40, ...)
    pool.shutdown()                    # also at interpreter exit; workers also exit when this process dies

- Workers are plain ``python steadydancer/parallel/_pool_worker.py`` subprocesses (not multiprocessing ``spawn``, which
  would re-import ComfyUI's ``main.py`` in every child). Each registers this pack under the same package name
  without running its ComfyUI ``__init__``, connects back over a local authenticated
  ``multiprocessing.connection`` socket (small commands and the conditioning; tensors of the serving mode below
  go by ``torch.distributed`` broadcast, never through the socket) and builds
  its own model replica with the ``factory`` spec ``(module, function, args)`` (a module path relative to the
  pack, or an absolute module). Before the rendezvous each worker checks its GPU exists and reports load errors,
  so a missing or full GPU is a clear error, never a hang.
- ``sample``: every rank runs the same sampler (``"module:function"``, same seed, CPU-drawn noise) on the
  parallel callable (distributed.parallelize). After each step all ranks agree on continuing (one tiny
  all-reduce): an exception in rank 0's callback (ComfyUI's interrupt) stops every rank after that step and the
  pool stays usable.
- Serving mode (``factory=None``; the ComfyUI Multi-GPU node): workers start without a model.
  ``load_weights(spec, tensors)`` makes each build the replica of ``spec`` (replica.py) and receive rank 0's
  tensors by broadcast (again whenever rank 0's weights change; no file is read). Rank 0 runs the sampler
  itself; every DiT call goes through ``served(replica0)``, which sends the call's inputs (broadcast) so that
  every rank runs the same distributed forward, and returns rank 0's output. There is no per-step agreement:
  between two forwards the workers just wait for the next command, so an interrupt between forwards needs no
  coordination. An error of rank 0's own forward shuts the pool down (the workers would wait in a collective).
- Any worker failure (exception, crash, killed process) tears the whole pool down and raises ``WorkerPoolError``
  naming the rank and GPU and, where there is one, the worker's own error. A watchdog thread notices a dead
  worker while rank 0 waits in a collective and aborts the NCCL communicators so rank 0 does not hang (gloo
  fails by itself: "Connection closed by peer").
"""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import pathlib
import pickle
import secrets
import subprocess
import sys
import threading
import time
import logging
import traceback
from multiprocessing.connection import Listener, wait
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import launch as dist_launch
from . import distributed as D
from . import replica

__all__ = ["WorkerPool", "WorkerPoolError", "run_sampler", "load_recipe", "resolve"]

log = logging.getLogger("steadydancer_turbo")
PACK = __name__.rsplit(".", 3)[0]                  # the pack's package name in this process (pack.steadydancer.parallel.pool)
PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOT = pathlib.Path(__file__).with_name("_pool_worker.py")


class WorkerPoolError(RuntimeError):
    pass


class _Stopped(Exception):
    """Another rank asked to stop after this step (interrupt)."""


def resolve(module: str, attr: str):
    """``module`` relative to the pack (``steadydancer.sampling.official``) or absolute (``_dist_workers``)."""
    try:
        mod = importlib.import_module(f"{PACK}.{module}")
    except ModuleNotFoundError:
        mod = importlib.import_module(module)
    return getattr(mod, attr)


def run_sampler(sampler: str, call, cond, device, callback=None, **kw):
    """Run ``sampler`` ("module:function", e.g. ``steadydancer.sampling.official:sample_official`` or
    ``turbo.rcm:sample_rcm``) as ``fn(call, cond, callback=..., device=..., **kw)``. The official sampler's
    guidance passes are batched (``batch_passes=True``) so that a guidance axis can split them."""
    mod, _, attr = sampler.partition(":")
    fn = resolve(mod, attr)
    if attr == "sample_official":
        kw.setdefault("batch_passes", True)
    return fn(call, cond, callback=callback, device=device, **kw)


def load_recipe(recipe: dict, device):
    """A worker's model from a loader recipe: ``path``, ``load`` (load_steadydancer keyword arguments),
    ``loras`` ([(path, strength)]), ``attention`` (backend name), ``compile`` (bool)."""
    from ..weights import speed_options as accel, loader
    model = loader.load_steadydancer(recipe["path"], device=device, **recipe.get("load", {}))
    if recipe.get("loras"):
        loader.apply_loras(model, list(recipe["loras"]))
    accel.use_attention(model, recipe.get("attention", "auto"))
    if recipe.get("compile"):
        accel.compile_blocks(model, fullgraph=False)
    return model


def _send(conn, obj) -> None:
    """Plain pickle over the socket (multiprocessing's own pickler would share tensor storage through file
    descriptors, which needs the multiprocessing authkey of a forked/spawned child)."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _args_meta(args) -> list:
    """What a worker needs to receive a forward's arguments: tensors by shape / dtype (their bytes follow by
    broadcast), lists of tensors (a per-sample text context), everything else by value."""
    meta = []
    for a in args:
        if torch.is_tensor(a):
            meta.append(("t", tuple(a.shape), a.dtype))
        elif isinstance(a, (list, tuple)) and a and all(torch.is_tensor(t) for t in a):
            meta.append(("list", [(tuple(t.shape), t.dtype) for t in a]))
        else:
            meta.append(("obj", a))
    return meta


def _send_args(args, device) -> None:
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else [a]):
            if torch.is_tensor(t) and t.numel():
                dist.broadcast(replica.as_bytes(t.detach().to(device).contiguous()), 0)


def _recv_args(meta, device) -> list:
    out = []
    for m in meta:
        if m[0] == "obj":
            out.append(m[1])
            continue
        ts = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in
              ([m[1:]] if m[0] == "t" else m[1])]
        for t in ts:
            if t.numel():
                dist.broadcast(replica.as_bytes(t), 0)
        out.append(ts[0] if m[0] == "t" else ts)
    return out


def _agree(stop: bool, device) -> bool:
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def worker_main(conn, rank: int) -> None:
    """A worker's life (called by _pool_worker.py): init message, model (sampling mode), rendezvous, then
    commands: ``sample`` (sampling mode), ``weights`` / ``forward`` (serving mode), ``stop``."""
    init = _recv(conn)
    world, port, backend, device = init["world"], init["port"], init["backend"], init["device"]
    try:
        torch.set_num_threads(init.get("threads") or torch.get_num_threads())
        idx = None
        if backend == "nccl":
            n = torch.cuda.device_count()
            idx = torch.device(device).index or 0
            if idx >= n:
                raise WorkerPoolError(f"GPU {device} does not exist (this machine shows {n} GPU(s))")
            torch.cuda.set_device(idx)
            free, total = torch.cuda.mem_get_info(idx)
            if free < 0.5 * total:
                _send(conn, ("note", f"{device}: only {free / 2**30:.1f} of {total / 2**30:.1f} GiB free "
                                   f"(another process is using this GPU)"))
        model = call = None
        if init["factory"] is not None:  # sampling mode: the worker builds its own model
            mod, fn, args = init["factory"]
            model = resolve(mod, fn)(*args, torch.device(device))
        _send(conn, ("loaded", None))
        dev = dist_launch.init_rank(rank, world, port, backend, init["timeout_s"], device=idx)
        ctx = D.init_parallel(init["layout"])
        if model is not None:
            call = D.parallelize(model, ctx)
        _send(conn, ("ready", None))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process ends
        _send(conn, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        os._exit(1)

    def callback(i, n, x0):
        if _agree(False, dev):
            raise _Stopped()

    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):  # rank 0 (ComfyUI) is gone: never outlive it
            os._exit(0)
        if msg[0] == "stop":
            break
        try:
            if msg[0] == "weights":  # serving mode: a replica from rank 0's tensors (replaces the old one)
                model = call = None
                gc.collect()
                model = replica.build(msg[1], dev)
                replica.broadcast(msg[1], model=model, device=dev)
                call = D.parallelize(model, ctx)
                _send(conn, ("weights_ok", None))
                continue
            if msg[0] == "forward":  # serving mode: one DiT forward with rank 0's inputs; rank 0 keeps the output
                with torch.no_grad():
                    call(*_recv_args(msg[1], dev))
                continue
            _, sampler, cond, kw = msg
            run_sampler(sampler, call, cond.to(dev), dev, callback, **kw)
            _send(conn, ("done", None))
        except _Stopped:
            _send(conn, ("interrupted", None))
        except BaseException as e:  # noqa: BLE001
            _send(conn, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            os._exit(1)  # the other ranks wait in collectives; rank 0 tears the pool down
    dist.destroy_process_group()
    conn.close()


class _Served:
    def __init__(self, pool, call, model):
        self._pool, self._call, self._model = pool, call, model

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model, name)

    def __call__(self, *args):
        return self._pool.forward(self._call, *args)


class WorkerPool:
    def __init__(self, devices: Sequence, layout: D.Layout, factory: tuple, backend: Optional[str] = None,
                 timeout_s: float = 900.0, load_timeout_s: float = 1800.0, threads: Optional[int] = None):
        if layout.world != len(devices):
            raise WorkerPoolError(f"layout {layout} needs {layout.world} devices, got {len(devices)}")
        self.devices = [str(d) for d in devices]
        self.layout, self.factory, self.threads = layout, factory, threads
        self.backend = backend or ("nccl" if self.devices[0].startswith("cuda") else "gloo")
        self.timeout_s, self.load_timeout_s = timeout_s, load_timeout_s
        self.procs: list = []      # Popen, rank i + 1
        self.conns: list = []      # Connection, rank i + 1
        self.notes: list = []
        self.call = None           # truthy once started
        self.ctx = self.model = None
        self.device = torch.device(self.devices[0])
        self._dead = threading.Event()
        self.weights_sent = 0      # serving mode: how many times the weights went out

    # ------------------------------------------------------------------ lifecycle
    @property
    def alive(self) -> bool:
        return self.call is not None and all(p.poll() is None for p in self.procs)

    @property
    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def start(self, model) -> None:
        """Start the workers, wait for their models, join the process group with ``model`` as rank 0's."""
        if dist.is_initialized():
            raise WorkerPoolError("torch.distributed is already initialized in this process; one pool at a time")
        if self.backend == "nccl":
            n = torch.cuda.device_count()
            missing = [d for d in self.devices if (torch.device(d).index or 0) >= n]
            if missing:
                raise WorkerPoolError(f"GPU(s) {', '.join(missing)} do not exist: this machine shows {n} GPU(s)")
        key = secrets.token_bytes(32)
        port, world = dist_launch.free_port(), self.layout.world
        try:
            with Listener(("127.0.0.1", 0), authkey=key) as listener:
                env = dict(os.environ, SD_POOL_ADDR=json.dumps(listener.address),
                           SD_PACK_ROOT=str(PACK_ROOT), SD_PACK_NAME=PACK, SD_POOL_SYSPATH=json.dumps(sys.path))
                for rank in range(1, world):
                    p = subprocess.Popen([sys.executable, "-u", str(BOOT), str(rank)], env=env, stdin=subprocess.PIPE)
                    self.procs.append(p)
                    p.stdin.write(key.hex().encode() + b"\n")  # the socket's key: on stdin, not in the environment
                    p.stdin.close()
                self.conns = [None] * (world - 1)
                self._accept(listener)
            for rank, conn in enumerate(self.conns, start=1):
                _send(conn, dict(world=world, port=port, backend=self.backend, device=self.devices[rank],
                               layout=self.layout, factory=self.factory, timeout_s=self.timeout_s,
                               threads=self.threads))
            self._wait_all("loaded", self.load_timeout_s)
            dev_idx = self.device.index if self.backend == "nccl" else None
            dist_launch.init_rank(0, world, port, self.backend, self.timeout_s, device=dev_idx)
            self.ctx, self.model = D.init_parallel(self.layout), model
            self.call = True  # started; the parallel callable is made per sample (see sample)
            self._wait_all("ready", 120.0)
        except BaseException:
            self.shutdown()
            raise
        atexit.register(self.shutdown)

    def _accept(self, listener) -> None:
        """Accept one connection per worker (each says its rank first); a worker that dies first is an error."""
        got, err = [], []

        def run():
            try:
                for _ in self.procs:
                    conn = listener.accept()
                    got.append(conn)
            except Exception as e:  # noqa: BLE001 - listener closed
                err.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        end = time.monotonic() + 300
        while t.is_alive():
            t.join(0.2)
            dead = [i + 1 for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead and t.is_alive():
                raise WorkerPoolError(f"multi-GPU worker rank {dead[0]} exited during start-up "
                                      f"(exit code {self.procs[dead[0] - 1].returncode}; see the console)")
            if time.monotonic() > end:
                raise WorkerPoolError("multi-GPU workers did not connect within 300 s")
        for conn in got:
            rank = int(conn.recv_bytes().decode())
            self.conns[rank - 1] = conn

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (politely, then SIGTERM / SIGKILL; ``graceful=False``: SIGTERM at once, for workers
        stuck in a collective) and leave the process group. Idempotent."""
        for c in self.conns if graceful else ():
            try:
                if c is not None:
                    _send(c, ("stop",))
            except Exception:  # noqa: BLE001 - connection already broken
                pass
        end = time.monotonic() + (10 if graceful else 0)
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.conns:
            if c is not None:
                c.close()
        if self.model is not None:
            D.disable_sequence_parallel(self.model)
        self.call = self.model = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - after an abort
                pass
        self.procs, self.conns = [], []

    # ------------------------------------------------------------------ replies
    def _replies(self, timeout: float):
        """(rank, kind, text) of the replies that arrive within ``timeout``."""
        out = []
        live = [c for c in self.conns if c is not None and not c.closed]
        for c in wait(live, timeout):
            rank = self.conns.index(c) + 1
            try:
                kind, text = _recv(c)
            except (EOFError, OSError):
                kind, text = "eof", None
            out.append((rank, kind, text))
        return out

    def _fail(self, head: str, errors=()):
        errors = list(errors)
        end = time.monotonic() + 3.0
        while not errors and time.monotonic() < end:  # a worker's own error message usually follows shortly
            errors += [(r, t) for r, k, t in self._replies(0.2) if k == "error"]
            if all(p.poll() is not None for p in self.procs):
                errors += [(r, t) for r, k, t in self._replies(0) if k == "error"]
                break
        codes = {i + 1: p.poll() for i, p in enumerate(self.procs)}
        self.shutdown()
        if errors:
            rank, text = errors[0]
            first = text.strip().splitlines()[0]
            log.error("SteadyDancer multi-GPU: rank %d on %s failed:\n%s", rank, self.devices[rank], text)
            err = WorkerPoolError(f"{head}: rank {rank} on {self.devices[rank]} failed: {first} (its traceback is "
                                  f"in the console)")
            err.detail = text
            raise err from None
        dead = [r for r, c in codes.items() if c not in (None, 0)]
        if dead:
            r = dead[0]
            raise WorkerPoolError(f"{head}: rank {r} on {self.devices[r]} died (exit code {codes[r]})") from None
        raise WorkerPoolError(head) from None

    def _wait_all(self, what: str, timeout_s: float, also=()) -> None:
        need = set(range(1, self.layout.world))
        end = time.monotonic() + timeout_s
        while need:
            for rank, kind, text in self._replies(0.5):
                if kind == "error":
                    self._fail(f"multi-GPU worker failed ({what})", [(rank, text)])
                elif kind == "eof":
                    self._fail(f"multi-GPU worker lost ({what})")
                elif kind == "note":
                    self.notes.append(text)
                elif kind == what or kind in also:
                    need.discard(rank)
            if need and any(p.poll() is not None for p in self.procs):
                self._fail(f"multi-GPU worker lost ({what})")
            if need and time.monotonic() > end:
                self._fail(f"multi-GPU workers not {what} after {timeout_s:g} s")

    # ------------------------------------------------------------------ serving (rank 0 drives the sampler)
    def load_weights(self, spec: dict, tensors) -> int:
        """Serving mode: every worker builds the replica of ``spec`` (replica.describe) and receives rank 0's
        ``tensors`` (spec order) by broadcast; replaces the workers' previous replica. Returns the bytes sent."""
        self._check_serving()
        self._command(("weights", spec))
        sent = self._guarded(lambda: replica.broadcast(spec, tensors=tensors, device=self.comm_device),
                             "sending the weights to the multi-GPU workers failed")
        self._wait_all("weights_ok", self.load_timeout_s)
        self.weights_sent += 1
        return sent

    def forward(self, call, *args):
        """Serving mode: one distributed DiT forward. The workers receive ``args`` (rank 0's inputs, by
        broadcast) and run their replica; rank 0 runs ``call(*args)`` (its own replica behind the same parallel
        wrapper) and returns its output. A worker that fails or dies raises ``WorkerPoolError`` naming it; an
        error of rank 0's own forward shuts the pool down (the workers wait inside a collective) and propagates."""
        self._check_serving()
        self._command(("forward", _args_meta(args)))

        def run():
            _send_args(args, self.comm_device)
            with torch.no_grad():
                return call(*args)

        return self._guarded(run, "multi-GPU forward failed")

    def served(self, model):
        """A DiT-like callable for the samplers: ``served(x, t, *args)`` is one distributed forward of rank 0's
        replica ``model`` (built by replica.build / bind) with the workers; attributes are ``model``'s."""
        return _Served(self, D.parallelize(model, self.ctx), model)

    @property
    def comm_device(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _check_serving(self) -> None:
        if self.call is None:
            raise WorkerPoolError("the multi-GPU pool is not running (start it first)")
        if not self.alive:
            self._fail("multi-GPU worker lost")

    def _command(self, msg) -> None:
        try:
            for c in self.conns:
                _send(c, msg)
        except (OSError, EOFError):
            self._fail("multi-GPU worker lost")

    def _guarded(self, fn, head: str):
        """Run rank 0's side of a collective step with the watchdog on; map failures to clear errors."""
        stop = threading.Event()
        self._dead.clear()
        watch = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        watch.start()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a worker failure shows up as a collective error here
            stop.set()
            end = time.monotonic() + 3.0
            while time.monotonic() < end and all(p.poll() is None for p in self.procs) and not self._pending():
                time.sleep(0.1)
            if self._dead.is_set() or not self.alive or self._pending():
                log.debug("SteadyDancer multi-GPU: rank 0 saw %s: %s", type(e).__name__, e)
                self._fail(head)  # names the worker that failed or died (rank 0's collective error is noise)
            self.shutdown(graceful=False)  # rank 0's own error: the workers are stuck in a collective
            raise
        finally:
            stop.set()
            watch.join()

    def _pending(self) -> bool:
        live = [c for c in self.conns if c is not None and not c.closed]
        return bool(wait(live, 0)) if live else False

    # ------------------------------------------------------------------ sampling
    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            if any(p.poll() is not None for p in self.procs):
                self._dead.set()
                if self.backend == "nccl":  # unblock rank 0's collectives (gloo errors out by itself)
                    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                    if abort is not None:
                        abort()
                return

    def sample(self, sampler: str, cond, callback=None, model=None, **kw):
        """Run ``sampler`` ("module:function") on all ranks; returns rank 0's latent. ``callback(step, total,
        x0)`` runs on rank 0 only; an exception from it stops every rank after the current step and is
        re-raised here (the pool stays up). ``model``: rank 0's model for this run (default: the one given to
        ``start``; the same weights as the workers'); sequence parallelism is switched on for the run only, so
        the module works unsharded in between."""
        if self.call is None:
            raise WorkerPoolError("the multi-GPU pool is not running (start it first)")
        if not self.alive:
            self._fail("multi-GPU worker lost before sampling")
        cpu_cond = cond.to("cpu")
        try:
            for c in self.conns:
                _send(c, ("sample", sampler, cpu_cond, kw))
        except (OSError, EOFError):
            self._fail("multi-GPU worker lost")
        user_error = []

        def cb(i, n, x0):
            try:
                if callback is not None:
                    callback(i, n, x0)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after all ranks agreed to stop
                user_error.append(e)
            if _agree(bool(user_error), self.device):
                raise _Stopped()

        stop = threading.Event()
        self._dead.clear()
        watch = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        watch.start()
        latent = None
        if model is not None:
            self.model = model
        call = D.parallelize(self.model, self.ctx)
        try:
            latent = run_sampler(sampler, call, cond.to(self.device), self.device, cb, **kw)
        except _Stopped:
            pass
        except Exception as e:  # noqa: BLE001 - a worker failure shows up as a collective error here
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            stop.set()
            self._fail(f"multi-GPU sampling failed ({type(e).__name__}: {first})")
        finally:
            stop.set()
            watch.join()
            if self.model is not None:
                D.disable_sequence_parallel(self.model)
        self._wait_all("done", 120.0, also=("interrupted",))
        if user_error:
            raise user_error[0]
        return latent
