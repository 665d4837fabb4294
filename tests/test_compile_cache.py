"""torch.compile's on-disk caches in a folder that survives restarts (issue 15): the core switch
(steadydancer/weights/speed_options.use_compile_cache, plain torch, takes a path) and the loader's use of it
(nodes/model_nodes.py: <ComfyUI user dir>/steadydancer/torch_compile_cache through the bridge). Checked against
torch's own resolvers (torch._inductor.runtime.cache_dir_utils) and, where a C++ compiler exists, against the
files a real inductor compile writes."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn as nn

accel = importlib.import_module("steadydancer_turbo.steadydancer.weights.speed_options")
cb = importlib.import_module("steadydancer_turbo.nodes.comfy_bridge")
mn = importlib.import_module("steadydancer_turbo.nodes.model_nodes")

ENVS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture
def clean(monkeypatch):
    """Env (monkeypatch) and torch's cache flags restored after each test."""
    import torch._functorch.config as fc
    import torch._inductor.config as ic
    for k in ENVS:
        monkeypatch.delenv(k, raising=False)
    flags = [(ic, "fx_graph_cache"), (ic, "autotune_local_cache"), (fc, "enable_autograd_cache")]
    saved = [getattr(m, n) for m, n in flags]  # torch's config modules: plain setattr (monkeypatch's undo deletes)
    for m, n in flags:
        setattr(m, n, False)
    yield ic, fc
    for (m, n), v in zip(flags, saved):
        setattr(m, n, v)


def test_cache_goes_to_the_folder_and_torch_resolves_it_there(clean, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
    ic, fc = clean
    os.environ["TRITON_CACHE_DIR"] = "/tmp/torchinductor_x/triton/0"  # what torch writes itself on a compile
    folder = tmp_path / "steadydancer" / "torch_compile_cache"
    got = accel.use_compile_cache(str(folder), user_env={})
    assert got == {"inductor": str(folder), "triton": None} and folder.is_dir()
    assert cache_dir() == str(folder)                          # torch's own resolver reads our folder
    assert triton_cache_dir(0) == str(folder / "triton" / "0")  # and Triton's kernels follow it
    assert ic.fx_graph_cache and ic.autotune_local_cache and fc.enable_autograd_cache


def test_user_set_folders_and_switches_are_respected(clean, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
    ic, fc = clean
    mine, tri = tmp_path / "mine", tmp_path / "tri"
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"  # a user who turned the FX graph cache off keeps it off
    got = accel.use_compile_cache(str(tmp_path / "ours"),
                                  user_env={"TORCHINDUCTOR_CACHE_DIR": str(mine), "TRITON_CACHE_DIR": str(tri)})
    assert got == {"inductor": str(mine), "triton": str(tri)} and not (tmp_path / "ours").exists()
    assert cache_dir() == str(mine) and triton_cache_dir(0) == str(tri)
    assert not ic.fx_graph_cache and fc.enable_autograd_cache
    # the default user_env is the environment as the pack was imported (torch overwrites os.environ later):
    # the Model Loader's module imports speed_options at the top, so ComfyUI's start takes the snapshot
    assert accel._USER_CACHE_ENV.keys() == set(accel.CACHE_ENV) and mn.accel is accel


def test_torchs_own_default_folders_are_not_a_users_choice(clean, tmp_path):
    """What the import-time snapshot holds in ComfyUI: torch's default folders, which torch wrote into os.environ
    itself before the pack was imported (`import torch._inductor.config`). They must not pin the cache there."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir
    default = default_cache_dir()
    folder = tmp_path / "ours"
    got = accel.use_compile_cache(str(folder), user_env={"TORCHINDUCTOR_CACHE_DIR": default,
                                                         "TRITON_CACHE_DIR": os.path.join(default, "triton", "0")})
    assert got == {"inductor": str(folder), "triton": None} and cache_dir() == str(folder)
    assert "TRITON_CACHE_DIR" not in os.environ
    # a user's folder inside torch's temp folder, but not torch's default itself, stays the user's
    mine = os.path.join(os.path.dirname(default), "my_inductor_cache")
    assert accel.use_compile_cache(str(folder), user_env={"TORCHINDUCTOR_CACHE_DIR": mine})["inductor"] == mine


def _comfy_user_dir(monkeypatch, path):
    monkeypatch.setattr(cb, "HAVE_COMFY", True)
    monkeypatch.setattr(cb, "folder_paths", types.SimpleNamespace(get_user_directory=lambda: str(path)))
    monkeypatch.setattr(mn, "_compile_cache", {})


def test_loader_points_the_cache_at_comfyui_user_folder_when_it_compiles(clean, monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    _comfy_user_dir(monkeypatch, tmp_path / "user")
    monkeypatch.setattr(accel, "_USER_CACHE_ENV", {})
    want = str(tmp_path / "user" / "steadydancer" / "torch_compile_cache")
    assert cb.compile_cache_folder() == want

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    m = Tiny()
    mn.apply_speed_options(m, mn.LoadOptions(attention="sdpa"))  # nothing compiles: torch's default stays
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not mn._compile_cache
    assert not mn.compiles(mn.LoadOptions())
    assert mn.compiles(mn.LoadOptions(fp8_matmul=True)) and mn.compiles(mn.LoadOptions(attention="flex_sparse"))
    mn.apply_speed_options(m, mn.LoadOptions(attention="sdpa", compile=True))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == want == cache_dir() and m._sd_compiled
    mn.apply_speed_options(m, mn.LoadOptions(attention="sdpa", compile=False))  # undo the compile for the test


def test_loader_respects_a_user_cache_dir(clean, monkeypatch, tmp_path):
    _comfy_user_dir(monkeypatch, tmp_path / "user")
    monkeypatch.setattr(accel, "_USER_CACHE_ENV", {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "own")})
    assert mn.use_compile_cache()["inductor"] == str(tmp_path / "own")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "own")
    assert not (tmp_path / "user").exists()


def test_outside_comfyui_torch_defaults_stay(clean, monkeypatch):
    monkeypatch.setattr(cb, "HAVE_COMFY", False)
    monkeypatch.setattr(mn, "_compile_cache", {})
    assert mn.use_compile_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor CPU needs a C++ compiler")
def test_a_real_compile_writes_its_fx_graph_cache_into_the_folder(tmp_path):
    """A fresh interpreter (as after a ComfyUI restart): torch's inductor config imported before the pack, as
    ComfyUI's start does (it writes torch's default folder into os.environ, and the pack's import-time snapshot
    sees it), then use_compile_cache with that default snapshot and one inductor compile on CPU; its FX graph
    cache entry must be in our folder, not in torch's default one."""
    folder = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import os, sys
        for k in {ENVS!r}:
            os.environ.pop(k, None)
        import importlib
        import torch
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        cache_dir()  # what `import torch._inductor.config` does at ComfyUI's start, before custom nodes load
        from steadydancer_turbo.steadydancer.weights import speed_options as accel
        accel = importlib.reload(accel)  # the pack's import-time snapshot, taken after that (conftest imported it)
        assert accel._USER_CACHE_ENV["TORCHINDUCTOR_CACHE_DIR"], accel._USER_CACHE_ENV
        got = accel.use_compile_cache({str(folder)!r})
        assert got == {{"inductor": {str(folder)!r}, "triton": None}}, got
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        x = torch.randn(16)
        torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ENVS}
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    boot = "import conftest\n" + code  # conftest makes steadydancer_turbo resolve to this checkout
    subprocess.run([sys.executable, "-c", boot], check=True, env=env, cwd=tests_dir, timeout=300)
    assert (folder / "fxgraph").is_dir() and any((folder / "fxgraph").rglob("*")), sorted(folder.iterdir())
