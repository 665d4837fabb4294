"""Entry point of one multi-GPU worker process (started by parallel.pool.WorkerPool as ``python _pool_worker.py RANK``).

Registers the pack under the package name rank 0 uses (without running its ComfyUI ``__init__``), connects back
to rank 0 and hands over to ``parallel.pool.worker_main``. Configuration comes from the environment rank 0 sets.
"""
import importlib
import importlib.util
import json
import os
import pathlib
import sys


def main() -> None:
    rank = int(sys.argv[1])
    for p in reversed(json.loads(os.environ["SD_POOL_SYSPATH"])):
        if p not in sys.path:
            sys.path.insert(0, p)
    name, root = os.environ["SD_PACK_NAME"], pathlib.Path(os.environ["SD_PACK_ROOT"])
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
    from multiprocessing.connection import Client
    addr = json.loads(os.environ["SD_POOL_ADDR"])
    conn = Client(tuple(addr) if isinstance(addr, list) else addr, authkey=bytes.fromhex(sys.stdin.readline().strip()))
    conn.send_bytes(str(rank).encode())
    importlib.import_module(f"{name}.steadydancer.parallel.pool").worker_main(conn, rank)


if __name__ == "__main__":
    main()
