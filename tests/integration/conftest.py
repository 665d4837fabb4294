"""Session fixture ``comfy``: a real ComfyUI server with this pack (see comfyui_harness.py)."""
import os
import shutil

import pytest

from comfyui_harness import (FIXTURE_FOLDER, PACK_FOLDER, PACK_ROOT, HERE, Comfy, ModelShelf, comfyui_path, models,
                     required_models, run_workflow)


def _server_python(comfy):
    return run_workflow.comfy_python(comfy)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    path = comfyui_path()
    python = _server_python(path)
    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("custom_nodes", "models", "input", "output", "user", "temp"):
        (base / d).mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(PACK_ROOT, target_is_directory=True)
    (base / "custom_nodes" / FIXTURE_FOLDER).symlink_to(HERE / "fixture_pack", target_is_directory=True)

    shelf = ModelShelf(base / "models", path, python, cache=base / "model_cache")
    for directory, name in sorted(required_models()):
        if shelf.place(directory, name) is None:
            # umt5 / CLIP vision: never loaded (the fixture encoders replace them), but present as files so the
            # frontend and the run command's pre-check see a complete install
            (base / "models" / directory).mkdir(parents=True, exist_ok=True)
            (base / "models" / directory / name).write_bytes(b"")
    shelf.place("vae", "tiny_wan21_vae.safetensors", kind="vae")         # for the native-only test
    shelf.place("diffusion_models", "tiny_steadydancer_slow.safetensors", kind="dit")   # /interrupt test
    # a file that exists but is not a SteadyDancer DiT (the execution-error test)
    if "vae" in shelf.built:
        (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shelf.built["vae"], base / "models" / "diffusion_models" / "some_other_model.safetensors")

    image, video = models.build_media(base / "input" / "reference.png", base / "input" / "dance.mp4")
    # the Multi-GPU node may use CPU worker ranks when ComfyUI runs on the CPU (test-only switch, read by the server)
    os.environ.setdefault("STEADYDANCER_MULTIGPU_CPU", "1")
    # --cpu unless COMFYUI_TEST_GPU=1 (then the soak test also checks the GPU's memory)
    on_gpu = os.environ.get("COMFYUI_TEST_GPU", "") not in ("", "0")
    extra = ["--database-url", "sqlite:///:memory:"]
    front_end = os.environ.get("STEADYDANCER_FRONTEND_ROOT")   # another frontend build, e.g. the newest package
    if front_end:
        extra += ["--front-end-root", front_end]
    server = run_workflow.ComfyServer(path, base_directory=base, python=python, cpu=not on_gpu, extra_args=extra,
                                      log_path=base / "server.log")
    server.start(timeout=240)
    c = None
    try:
        c = Comfy(server, base, shelf)
        yield c
    finally:
        if c is not None:
            c.client.close()
        server.stop()


