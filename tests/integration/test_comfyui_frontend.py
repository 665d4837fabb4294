"""The shipped UI workflows in the real ComfyUI frontend (headless Chromium): no missing node types, and
"Export (API)" (``app.graphToPrompt``) gives exactly the shipped API twins."""
import json

import pytest

from comfyui_harness import API_DIR, UI_DIR, WORKFLOWS

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


@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_export_equals_the_api_twin(converted, name):
    if name not in converted:
        pytest.skip(f"{name} not shipped")
    got = frontend.comparable(converted[name]["output"])
    want = frontend.comparable(json.loads((API_DIR / f"{name}.json").read_text()))
    diffs = [f"node {k}:\n  frontend: {json.dumps(got.get(k))}\n  shipped:  {json.dumps(want.get(k))}"
             for k in sorted(set(got) | set(want), key=lambda s: (len(s), s)) if got.get(k) != want.get(k)]
    assert not diffs, "Export (API) differs from the shipped twin:\n" + "\n".join(diffs)
