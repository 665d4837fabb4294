"""Place tiny random models under the real file names the shipped workflows ask for (for trying the pack
end to end without downloading 20+ GB). The outputs are noise; only the plumbing is real.

    python tests/integration/make_tiny_models.py /path/to/ComfyUI/models --comfyui /path/to/ComfyUI \
        [--python /path/to/comfyui/python] [--custom-nodes /path/to/ComfyUI/custom_nodes] [--media DIR]

Also links the test-only fixture node pack (stand-ins for the umt5 and CLIP vision encoders, which have no
tiny variant the native loaders accept) when --custom-nodes is given, and writes a swapped, CPU-sized copy
of each API workflow (``<name>.tiny.json``) next to --media for the run command.
"""
import argparse
import importlib.util
import json
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def skip_reason(shelf, directory, name):
    """Why a file was not placed: no tiny version of that kind exists, or building it failed."""
    kind = shelf.kind_of(directory, name)
    if kind is None:
        return (f": no tiny version of this encoder exists that ComfyUI's native {directory} loader accepts; "
                f"the *.tiny.json workflows (--media) use the fixture encoder nodes SDTestTextEncode / "
                f"SDTestClipVisionEncode instead (link them with --custom-nodes)")
    return f": building the tiny {kind} model failed ({shelf.errors.get(kind, 'unknown error')})"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("models_dir")
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--python", help="ComfyUI's interpreter (builds the VAE with ComfyUI's own class)")
    ap.add_argument("--custom-nodes", help="ComfyUI custom_nodes folder: link the fixture encoder pack there")
    ap.add_argument("--media", help="folder for reference.png, dance.mp4 and the *.tiny.json workflows")
    a = ap.parse_args(argv)

    spec = importlib.util.spec_from_file_location("_sd_tests_conftest", ROOT / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))       # registers steadydancer_turbo
    sys.path.insert(0, str(HERE))
    import comfyui_harness as harness

    python = a.python or harness.run_workflow.comfy_python(a.comfyui)
    shelf = harness.ModelShelf(pathlib.Path(a.models_dir), a.comfyui, python)
    for directory, name in sorted(harness.required_models()):
        dst = shelf.place(directory, name)
        print(f"{'placed ' if dst else 'skipped'} models/{directory}/{name}{'' if dst else skip_reason(shelf, directory, name)}")
    shutil.rmtree(shelf.cache, ignore_errors=True)
    for kind, err in shelf.errors.items():
        print(f"could not build {kind}: {err}", file=sys.stderr)
    if a.custom_nodes:
        link = pathlib.Path(a.custom_nodes) / harness.FIXTURE_FOLDER
        if not link.exists():
            link.symlink_to(HERE / "fixture_pack", target_is_directory=True)
        print(f"linked {link}")
    if a.media:
        media = pathlib.Path(a.media)
        media.mkdir(parents=True, exist_ok=True)
        harness.models.build_media(media / "reference.png", media / "dance.mp4")
        for name in harness.WORKFLOWS:
            p = harness.API_DIR / f"{name}.json"
            if p.exists():
                tiny = harness.small(json.loads(p.read_text()), 64, 96, 9, steps=3 if name.endswith("dance") else None)
                (media / f"{name}.tiny.json").write_text(json.dumps(tiny, indent=1))
                print(f"wrote {media / (name + '.tiny.json')}")
    return 1 if shelf.errors else 0


if __name__ == "__main__":
    sys.exit(main())
