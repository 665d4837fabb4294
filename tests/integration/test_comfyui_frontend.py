"""The shipped UI workflows in the real ComfyUI frontend (headless Chromium): no missing node types, no node
overlapping another once Load Video shows its video (and every node inside its group), and "Export (API)"
(``app.graphToPrompt``) gives exactly the shipped API twins and the committed frontend export
(tests/data/frontend_api/, which the default suite checks the twins and our converter against).

The frontend is the one ComfyUI bundles (its comfyui_frontend_package), or the build at STEADYDANCER_FRONTEND_ROOT
(the ``static`` folder of another comfyui_frontend_package wheel, passed as ``--front-end-root``).
Refresh the committed export after editing a UI workflow: run this file with STEADYDANCER_WRITE_FRONTEND_EXPORT=1
(with the bundled frontend).
"""
import hashlib
import json
import os
import pathlib

import pytest

from comfyui_harness import API_DIR, UI_DIR, WORKFLOWS

EXPORT_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "frontend_api"

frontend = pytest.importorskip("comfyui_frontend")


@pytest.fixture(scope="module")
def converted(comfy):
    pytest.importorskip("aiohttp")
    if frontend.find_chromium() is None:
        pytest.skip("no chromium (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    names = [n for n in WORKFLOWS if (UI_DIR / f"{n}.json").exists() and (API_DIR / f"{n}.json").exists()]
    if not names:
        pytest.skip("example_workflows/ and workflows_api/ are not in this checkout yet")
    uis = [json.loads((UI_DIR / f"{n}.json").read_text()) for n in names]
    return dict(zip(names, frontend.convert_workflows(comfy.url + "/", uis)))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_knows_every_node_type(converted, name):
    if name not in converted:
        pytest.skip(f"{name} not shipped")
    r = converted[name]
    assert r["missing"] == [], f"node types the frontend does not know: {r['missing']}"
    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    assert r["nodeCount"] == len(ui["nodes"])
    # every model file and input the graph names exists on this server, so the frontend flags no node
    assert r["flagged"] == [], f"nodes the frontend marks as broken: {r['flagged']}"


GROUPS = {"inputs", "models", "poses", "sampling", "output"}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_node_overlaps_another_after_a_video_is_loaded(converted, name):
    """The layout as the user sees it once the driving video is loaded: Load Video has grown to show the video
    (the fixture clip is portrait, 96x160), then no two node rectangles (title bars included) overlap, and every
    node but the note lies wholly inside exactly one of the five groups."""
    if name not in converted:
        pytest.skip(f"{name} not shipped")
    lay = converted[name]["layout"]
    assert [v for v in lay["videos"] if v["w"] > 0], f"the Load Video preview did not load: {lay['videos']}"
    (v,) = [v for v in lay["videos"] if v["w"] > 0]
    (load_video,) = [n for n in lay["nodes"] if n["type"] == "LoadVideo"]
    w, h = load_video["size"]
    assert h > w * v["h"] / v["w"], f"Load Video ({w}x{h}) does not hold its {v['w']}x{v['h']} preview"
    assert {g["title"] for g in lay["groups"]} == GROUPS
    problems = frontend.layout_problems(lay)
    assert not problems, f"{converted[name]['frontendVersion']}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_export_equals_the_api_twin(converted, name):
    if name not in converted:
        pytest.skip(f"{name} not shipped")
    got = frontend.comparable(converted[name]["output"])
    want = frontend.comparable(json.loads((API_DIR / f"{name}.json").read_text()))
    diffs = [f"node {k}:\n  frontend: {json.dumps(got.get(k))}\n  shipped:  {json.dumps(want.get(k))}"
             for k in sorted(set(got) | set(want), key=lambda s: (len(s), s)) if got.get(k) != want.get(k)]
    assert not diffs, "Export (API) differs from the shipped twin:\n" + "\n".join(diffs)


def _versions(frontend_version):
    import subprocess

    code = "import comfyui_version as v; print(f'ComfyUI {v.__version__}')"
    py = os.environ.get("COMFYUI_PYTHON", "python")
    r = subprocess.run([py, "-c", code], cwd=os.environ.get("COMFYUI_PATH"), capture_output=True, text=True)
    return f"{r.stdout.strip() or 'ComfyUI unknown'}, frontend {frontend_version}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_export_equals_the_committed_export(converted, name):
    """tests/data/frontend_api/<name>.json is this frontend's Export (API) of the current UI workflow."""
    if name not in converted:
        pytest.skip(f"{name} not shipped")
    ui_text = (UI_DIR / f"{name}.json").read_text()
    got = frontend.comparable(converted[name]["output"])
    path = EXPORT_DIR / f"{name}.json"
    if os.environ.get("STEADYDANCER_WRITE_FRONTEND_EXPORT"):
        if os.environ.get("STEADYDANCER_FRONTEND_ROOT"):
            pytest.fail("write the committed export with ComfyUI's bundled frontend (unset STEADYDANCER_FRONTEND_ROOT); "
                        "other frontends are compared against it")
        EXPORT_DIR.mkdir(exist_ok=True)
        doc = {"_source": {"ui_workflow": f"example_workflows/{name}.json",
                           "ui_sha256": hashlib.sha256(ui_text.encode()).hexdigest(),
                           "made_by": "tests/integration/test_comfyui_frontend.py (app.graphToPrompt in headless "
                                      "Chromium, the menu's Export (API)), reduced by comfyui_frontend.comparable",
                           "versions": _versions(converted[name]["frontendVersion"])},
               "prompt": got}
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    doc = json.loads(path.read_text())
    assert doc["prompt"] == got
    assert doc["_source"]["ui_sha256"] == hashlib.sha256(ui_text.encode()).hexdigest()


def test_templates_and_thumbnails_are_served(comfy):
    """ComfyUI lists the pack's example_workflows as templates and serves each thumbnail where the frontend's
    template browser asks for it (/api/workflow_templates/<pack folder>/<name>.jpg: frontends 1.49.6 and 1.58.1
    give every custom-node template mediaSubtype "jpg")."""
    import urllib.request

    from comfyui_harness import PACK_FOLDER

    with urllib.request.urlopen(comfy.url + "/api/workflow_templates", timeout=30) as r:
        listed = json.load(r)
    assert sorted(listed[PACK_FOLDER]) == sorted(WORKFLOWS)
    for name in WORKFLOWS:
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg", timeout=30) as r:
            body = r.read()
            assert r.headers["Content-Type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff", name
