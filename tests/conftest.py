"""Make ``import steadydancer_turbo`` resolve to *this* checkout's root.

The pack is installed editable as ``steadydancer_turbo`` (see pyproject.toml), but a test run from
another checkout or git worktree must test its own files, so the package is registered here from the
folder above ``tests/`` before any test imports it.
"""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "steadydancer_turbo"


def _register_pack():
    mod = sys.modules.get(PACKAGE)
    if mod is not None and pathlib.Path(mod.__file__).resolve().parent == ROOT:
        return
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = mod
    spec.loader.exec_module(mod)


_register_pack()

# The tests run tiny models: on a 2-core CI box, intra-op threading only adds contention
# (a tiny forward measured 1.5 s with 2 threads vs ~0.1 s with one).
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard requirement of the suite
    pass
