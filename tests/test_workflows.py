"""The shipped workflows against our node definitions and a vendored description of the ComfyUI 0.33 core nodes.

- example_workflows/*.json (UI format 0.4, what the frontend loads) must only use node types that exist, wire
  outputs to inputs of the same type on the right slots, and carry exactly as many widget values as the frontend
  expects (positional, incl. upload and control_after_generate extras and V3 dynamic-combo sub-widgets).
- workflows_api/*.json (what POST /prompt takes) must equal the real ComfyUI 0.33 frontend's "Export (API)" of the
  UI graph, committed in tests/data/frontend_api/ (made by tests/integration/test_comfyui_frontend.py in headless
  Chromium, which also re-checks it live when a ComfyUI checkout exists); our converter must reproduce it too.

Regenerate the API twins after editing a UI workflow: ``python tests/test_workflows.py --write``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "tests" / "data" / "object_info_core_subset.json"
UI_DIR = ROOT / "example_workflows"
API_DIR = ROOT / "workflows_api"
FRONTEND_EXPORT_DIR = ROOT / "tests" / "data" / "frontend_api"
WORKFLOWS = ["steadydancer-dance", "steadydancer-turbo", "steadydancer-long"]
UI_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
FILE_COMBOS = {("VAELoader", "vae_name"), ("CLIPLoader", "clip_name"), ("CLIPVisionLoader", "clip_name")}  # server's files
MODEL_FOLDERS = {"text_encoders", "clip_vision", "vae", "diffusion_models", "loras", "dwpose"}


# ------------------------------------------------------------------------------------------- object_info
def pack_object_info() -> dict:
    """What ComfyUI's /object_info reports for our V1 nodes (server.node_info), built from the classes."""
    import steadydancer_turbo as pack

    info = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        info[name] = {
            "input": spec,
            "input_order": {k: list(v.keys()) for k, v in spec.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name,
            "display_name": pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "category": cls.CATEGORY,
            "output_node": getattr(cls, "OUTPUT_NODE", False),
        }
    return info


def object_info() -> dict:
    info = json.loads(CORE.read_text())
    ours = pack_object_info()
    assert not set(info) & set(ours)
    info.update(ours)
    return info


def _inputs(node_info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the order the frontend creates them (input_order if present)."""
    spec = node_info["input"]
    order = node_info.get("input_order") or {k: list(v) for k, v in spec.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, spec[section][name], section == "optional"))
    return out


def _type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    t = _type(spec)
    return (t in WIDGET_TYPES or t == DYNAMIC_COMBO) and not _opts(spec).get("forceInput", False)


def combo_options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else _opts(spec).get("options", [])


UPLOAD_SOCKET = "IMAGEUPLOAD"   # the socket type frontend 1.49.6 gives an upload button (LoadImage and LoadVideo)


def walk_widgets(node_info: dict, values: list) -> list[tuple[str, object, object, str]]:
    """The frontend's widgets of a node in widgets_values order: (key, value, spec, role).

    role: "value" (an input's widget), "control" (INT control_after_generate, UI only), "upload" (the upload
    button, UI only) or "default" (a hidden legacy widget absent from widgets_values, exported with its default).
    Raises on too few or too many values."""
    values = list(values)
    out = []

    def pop(key):
        if not values:
            raise AssertionError(f"too few widget values at {key}")
        return values.pop(0)

    def take(name, spec, prefix=""):
        key = prefix + name
        v = pop(key)
        out.append((key, v, spec, "value"))
        t, o = _type(spec), _opts(spec)
        if t == "INT" and o.get("control_after_generate"):
            out.append(("control_after_generate", pop("control_after_generate"), None, "control"))  # "fixed" ...
        if o.get("image_upload") or o.get("video_upload"):
            out.append(("upload", pop("upload"), None, "upload"))
        if t == DYNAMIC_COMBO:
            chosen = [opt for opt in o["options"] if opt["key"] == v]
            assert chosen, f"{key}: {v!r} is not one of {[x['key'] for x in o['options']]}"
            inner = chosen[0]["inputs"]
            for section in ("required", "optional"):
                for sub, sub_spec in inner.get(section, {}).items():
                    if is_widget(sub_spec):
                        take(sub, sub_spec, key + ".")

    for name, spec, _ in _inputs(node_info):
        if is_widget(spec):
            if _opts(spec).get("hidden") and not values:
                # a hidden legacy widget (SaveVideo's top-level codec): the frontend creates it with its default
                # and exports it (verified with frontend 1.49.6: "codec": "auto" next to "format.codec")
                default = _opts(spec).get("default", (combo_options(spec) or [{"key": None}])[0])
                out.append((name, default["key"] if isinstance(default, dict) else default, spec, "default"))
                continue
            take(name, spec)
    if values:
        raise AssertionError(f"{len(values)} widget values left over: {values}")
    return out


def widget_values_to_api(node_info: dict, values: list, linked: set) -> dict:
    """Map positional widgets_values to API inputs the way the frontend's graphToPrompt does: a widget whose
    input is linked keeps its (ignored) value in widgets_values and is exported as the link instead."""
    return {key: v for key, v, _, role in walk_widgets(node_info, values)
            if role in ("value", "default") and key not in linked}


def ui_to_api(ui: dict, info: dict) -> dict:
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):
            continue
        ni = info[node["type"]]
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                linked[inp["name"]] = [str(l[1]), l[2]]
        inputs = widget_values_to_api(ni, node.get("widgets_values") or [], set(linked))
        inputs.update(linked)
        ordered = {}
        for name, _, _ in _inputs(ni):
            for k in list(inputs):
                if k == name or k.startswith(name + "."):
                    ordered[k] = inputs.pop(k)
        ordered.update(inputs)
        api[str(node["id"])] = {"inputs": ordered, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or ni.get("display_name") or node["type"]}}
    return api


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def info():
    return object_info()


def load_ui(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_a_valid_graph(name, info):
    ui = load_ui(name)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"])
    assert ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(l[0] for l in ui["links"])
    for n in ui["nodes"]:
        assert n["type"] in info or n["type"] in UI_ONLY, f"unknown node type {n['type']}"
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        s, d = nodes[src], nodes[dst]
        s_out = info[s["type"]]["output"]
        assert src_slot < len(s_out) and s_out[src_slot] == typ, (link_id, s["type"], src_slot, typ)
        assert link_id in (s["outputs"][src_slot]["links"] or [])
        inp = d["inputs"][dst_slot]
        assert inp["link"] == link_id and inp["type"] == typ
        spec = dict((k, v) for k, v, _ in _inputs(info[d["type"]]))[inp["name"]]
        assert _type(spec) in (typ, "*"), (d["type"], inp["name"], _type(spec), typ)
    for n in ui["nodes"]:
        if n["type"] in UI_ONLY:
            continue
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for iname, spec, optional in _inputs(info[n["type"]]):
            if not optional and not is_widget(spec):
                assert iname in linked, f"{n['type']} #{n['id']}: required input {iname} is not connected"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_node_slots_match_definitions(name, info):
    """Each node's input slots as frontend 1.49.6 saves them: every socket input of the definition once, plus
    optionally one slot per widget carrying ``"widget": {"name": ...}`` (how a widget converted to an input is
    stored; a link into it replaces the widget's value). Slot links agree with the links table, and
    ``widgets_values_named`` (written by the frontend) agrees with the positional ``widgets_values``."""
    ui = load_ui(name)
    links = {l[0]: l for l in ui["links"]}
    for n in ui["nodes"]:
        for slot, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None:
                _, _, _, dst, dst_slot, typ = links[inp["link"]]
                assert (dst, dst_slot, typ) == (n["id"], slot, inp["type"]), (n["type"], inp["name"], inp["link"])
        for slot, out in enumerate(n.get("outputs", [])):
            for link_id in out.get("links") or []:
                assert links[link_id][1:3] == [n["id"], slot], (n["type"], out["name"], link_id)
        if n["type"] in UI_ONLY:
            continue
        ni = info[n["type"]]
        where = f"{n['type']} #{n['id']}"
        widgets = walk_widgets(ni, n.get("widgets_values") or [])
        widget_types = {key: (UPLOAD_SOCKET if role == "upload" else _type(spec))
                        for key, _, spec, role in widgets if role in ("value", "upload", "default")}
        sockets = {k: _type(spec) for k, spec, _ in _inputs(ni) if not is_widget(spec)}
        names = [i["name"] for i in n.get("inputs", [])]
        assert len(names) == len(set(names)), f"{where}: duplicate input slots {names}"
        assert sorted(k for k in names if k in sockets) == sorted(sockets), f"{where}: socket inputs {names}"
        top_level = {k for k, _, _ in _inputs(ni)}
        for inp in n.get("inputs", []):
            if "widget" in inp:
                assert inp["widget"] == {"name": inp["name"]}, (where, inp)
                assert inp["name"] in widget_types, f"{where}: {inp['name']} is not a widget of this node"
                assert inp["type"] == widget_types[inp["name"]], (where, inp["name"], inp["type"])
                if inp.get("link") is not None:
                    assert inp["name"] in top_level, f"{where}: a link into sub-widget {inp['name']}"
            else:
                assert inp["name"] in sockets, f"{where}: {inp['name']} is not a socket input (widget slot without 'widget'?)"
                assert inp["type"] == sockets[inp["name"]], (where, inp["name"], inp["type"])
        if "widgets_values_named" in n:
            named = {key: v for key, v, _, role in widgets if role != "default"}
            assert n["widgets_values_named"] == named, f"{where}: widgets_values_named disagrees with widgets_values"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_video_is_saved_at_the_resampled_frame_rate(name):
    """Create Video takes its fps from Resample Frames (a widget converted to an input), not a constant."""
    api = json.loads((API_DIR / f"{name}.json").read_text())
    (resample,) = [k for k, v in api.items() if v["class_type"] == "SteadyDancerResampleFrames"]
    (create,) = [v for v in api.values() if v["class_type"] == "CreateVideo"]
    import steadydancer_turbo as pack
    fps_slot = list(pack.NODE_CLASS_MAPPINGS["SteadyDancerResampleFrames"].RETURN_NAMES).index("fps")
    assert create["inputs"]["fps"] == [resample, fps_slot]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_widget_values_match_definitions(name, info):
    ui = load_ui(name)
    for n in ui["nodes"]:
        if n["type"] in UI_ONLY:
            continue
        ni = info[n["type"]]
        api_inputs = widget_values_to_api(ni, n.get("widgets_values") or [], set())  # raises on a count mismatch
        specs = dict((k, v) for k, v, _ in _inputs(ni))
        for key, v in api_inputs.items():
            if "." in key:
                continue
            spec = specs[key]
            t, o = _type(spec), _opts(spec)
            if t == "COMBO":
                opts = combo_options(spec)
                if opts and not (o.get("image_upload") or o.get("video_upload")) and (n["type"], key) not in FILE_COMBOS:
                    assert v in opts, f"{n['type']}.{key}: {v!r} not in {opts}"
            elif t in ("INT", "FLOAT"):
                assert isinstance(v, (int, float)) and not isinstance(v, bool), (n["type"], key, v)
                assert o.get("min", -1e300) <= v <= o.get("max", 1e300), (n["type"], key, v)
                if t == "INT":
                    assert float(v).is_integer()
            elif t == "BOOLEAN":
                assert isinstance(v, bool), (n["type"], key, v)
            elif t == "STRING":
                assert isinstance(v, str)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_model_loaders_carry_download_entries(name, info):
    ui = load_ui(name)
    loaders = {"CLIPLoader": "clip_name", "CLIPVisionLoader": "clip_name", "VAELoader": "vae_name",
               "SteadyDancerModelLoader": "model_name", "SteadyDancerLoraLoader": "lora_name",
               "SteadyDancerPoseExtract": None}
    seen = []
    for n in ui["nodes"]:
        if n["type"] not in loaders:
            continue
        models = n["properties"].get("models")
        assert models, f"{n['type']} #{n['id']} has no properties.models"
        inputs = widget_values_to_api(info[n["type"]], n["widgets_values"], set())
        names = {m["name"] for m in models}
        if loaders[n["type"]]:
            assert inputs[loaders[n["type"]]] in names
        else:
            assert {inputs["detector"], inputs["estimator"]} <= names
        for m in models:
            assert m["directory"] in MODEL_FOLDERS
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])
            assert "/resolve/" in m["url"]
        seen += models
    top = ui.get("models", [])
    assert sorted(map(json.dumps, top)) == sorted(set(map(json.dumps, seen)))
    if name.endswith(("turbo", "long")):
        assert any(m["name"].startswith("lightx2v_I2V_14B_480p_cfg_step_distill") for m in seen)


def _frontend():
    """tests/integration/comfyui_frontend.py (stdlib only at import): its ``comparable`` reduction of a prompt."""
    spec = importlib.util.spec_from_file_location("_comfyui_frontend", ROOT / "tests" / "integration" /
                                                  "comfyui_frontend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frontend_export(name):
    return json.loads((FRONTEND_EXPORT_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_committed_frontend_export_is_of_the_current_ui_workflow(name):
    src = _frontend_export(name)["_source"]
    sha = hashlib.sha256((UI_DIR / f"{name}.json").read_bytes()).hexdigest()
    assert src["ui_sha256"] == sha, (
        f"example_workflows/{name}.json changed since its real-frontend export was made: re-export it with "
        "STEADYDANCER_WRITE_FRONTEND_EXPORT=1 COMFYUI_PATH=... pytest tests/integration/test_comfyui_frontend.py")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_twin_equals_the_real_frontend_export(name):
    """workflows_api/<name>.json against ComfyUI 0.33's own "Export (API)" of the UI workflow (committed)."""
    api = json.loads((API_DIR / f"{name}.json").read_text())
    assert _frontend().comparable(api) == _frontend_export(name)["prompt"]
    for node in api.values():
        assert set(node) == {"inputs", "class_type", "_meta"}
        assert node["_meta"]["title"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_converter_equals_the_real_frontend_export(name, info):
    """ui_to_api (what ``--write`` uses) reproduces the real frontend's conversion of both shipped graphs."""
    assert _frontend().comparable(ui_to_api(load_ui(name), info)) == _frontend_export(name)["prompt"]


def test_api_twins_are_not_listed_as_templates():
    """ComfyUI lists <pack>/{example_workflows,example,examples,workflow,workflows}/*.json as templates; an API
    prompt there would show up as a broken workflow."""
    for folder in ("example_workflows", "example", "examples", "workflow", "workflows"):
        for f in (ROOT / folder).glob("*.json"):
            data = json.loads(f.read_text())
            assert "nodes" in data and "links" in data, f"{f} is not a UI workflow"


def _api(name):
    return json.loads((API_DIR / f"{name}.json").read_text())


def _source(api, ref, class_type):
    """The node a link ``[id, slot]`` comes from, checked to be of ``class_type``; returns its inputs."""
    assert isinstance(ref, list), f"{ref!r} is not a link (expected {class_type})"
    node = api[ref[0]]
    assert node["class_type"] == class_type, (ref, node["class_type"], class_type)
    return node["inputs"]


def _one(api, class_type):
    (nid,) = [k for k, v in api.items() if v["class_type"] == class_type]
    return nid, api[nid]["inputs"]


# The one-node samplers' settings the workflows had before they were rebuilt on SamplerCustomAdvanced (the
# SamplerCustomAdvanced pieces reproduce those nodes exactly: nodes/sampler_nodes.py builds them from the same
# pieces; tests/integration/test_comfyui_workflows.py compares the latents in a real ComfyUI).
OFFICIAL = {"seed": 106060, "steps": 40, "shift": 3.0, "text_guidance": 5.0, "pose_guidance": 1.0,
            "pose_guidance_start": 0.1, "pose_guidance_end": 0.4, "solver": "unipc"}
TURBO = {"seed": 42, "steps": 4, "schedule": "shift", "shift": 5.0, "sigma_max": 200.0, "mode": "sde"}


def _sampler_section(name):
    """SamplerCustomAdvanced's inputs traced back: (noise, guider, sampler, sigmas, conditioning id) inputs."""
    api = _api(name)
    sca, i = _one(api, "SamplerCustomAdvanced")
    cond, _ = _one(api, "SteadyDancerConditioning")
    assert i["latent_image"] == [cond, 2]
    decode, d = _one(api, "VAEDecode")
    assert d["samples"] == [sca, 0]
    return api, i, cond


def test_official_graph_is_the_official_sampler_on_sampler_custom_advanced():
    api, i, cond = _sampler_section("steadydancer-dance")
    loader, _ = _one(api, "SteadyDancerModelLoader")
    assert _source(api, i["noise"], "RandomNoise") == {"noise_seed": OFFICIAL["seed"]}
    g = _source(api, i["guider"], "SteadyDancerGuider")
    assert g == {"model": [loader, 0], "positive": [cond, 0], "negative": [cond, 1],
                 **{k: OFFICIAL[k] for k in ("text_guidance", "pose_guidance", "pose_guidance_start",
                                             "pose_guidance_end")}}
    assert _source(api, i["sampler"], "SteadyDancerSamplerUniPC") == {"solver": OFFICIAL["solver"]}
    assert _source(api, i["sigmas"], "SteadyDancerOfficialSigmas") == {"steps": 40, "shift": 3.0}  # no model: shift 3
    # pose guidance needs the negative poses on the conditioning node
    (retarget,) = [k for k, v in api.items() if v["class_type"] == "SteadyDancerPoseRetarget"]
    assert api[cond]["inputs"]["negative_pose_frames"] == [retarget, 2]
    assert not [v for v in api.values() if v["class_type"] in ("SteadyDancerLoraLoader", "SteadyDancerSampler")]


@pytest.mark.parametrize("name", ["steadydancer-turbo", "steadydancer-long"])
def test_turbo_graphs_are_the_turbo_sampler_on_sampler_custom_advanced(name):
    """Turbo and long: BasicGuider on the LoRA'd model (long: through Context Windows on Model), the rCM sampler
    with float32 timesteps (the one-node sampler's choice for the shift schedule), the turbo sigmas; the long
    graph's noise is the context windows' own draw from the same Context Windows node."""
    api, i, cond = _sampler_section(name)
    loader, _ = _one(api, "SteadyDancerModelLoader")
    lora, lora_in = _one(api, "SteadyDancerLoraLoader")
    assert lora_in["model"] == [loader, 0] and lora_in["strength"] == 1.0
    g = _source(api, i["guider"], "BasicGuider")
    assert g["conditioning"] == [cond, 0]
    if name == "steadydancer-long":
        ctx, _ = _one(api, "SteadyDancerContextOptions")
        assert _source(api, g["model"], "SteadyDancerApplyContextWindows") == {"model": [lora, 0], "context": [ctx, 0]}
        assert _source(api, i["noise"], "SteadyDancerContextNoise") == {"noise_seed": TURBO["seed"],
                                                                         "context": [ctx, 0]}
    else:
        assert g["model"] == [lora, 0]
        assert _source(api, i["noise"], "RandomNoise") == {"noise_seed": TURBO["seed"]}
    assert _source(api, i["sampler"], "SteadyDancerSamplerRCM") == {"mode": "sde", "timestep_rounding": "float32"}
    assert _source(api, i["sigmas"], "SteadyDancerTurboSigmas") == {k: TURBO[k] for k in ("steps", "schedule",
                                                                                          "shift", "sigma_max")}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_pose_preview_shows_the_retargeted_pose_frames(name):
    api = _api(name)
    retarget, _ = _one(api, "SteadyDancerPoseRetarget")
    _, preview = _one(api, "PreviewImage")
    assert preview == {"images": [retarget, 1]}
    assert pack_object_info()["SteadyDancerPoseRetarget"]["output_name"][1] == "pose_frames"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_groups_and_note(name):
    """Five groups (the browser test checks that every node lies inside one and that nothing overlaps once a
    video is loaded), one short Markdown note outside them, and a thumbnail where ComfyUI's template browser
    looks for it: <name>.jpg next to the JSON (frontends 1.49.6 and 1.58.1 ask /api/workflow_templates/<pack>/<name>.jpg)."""
    ui = load_ui(name)
    assert sorted(g["title"] for g in ui["groups"]) == ["inputs", "models", "output", "poses", "sampling"]
    (note,) = [n for n in ui["nodes"] if n["type"] in UI_ONLY - {"Reroute", "PrimitiveNode"}]
    text = note["widgets_values"][0]
    assert len(text) < 900 and "ComfyUI/models/" in text
    thumb = UI_DIR / f"{name}.jpg"
    assert thumb.exists(), thumb
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 400_000     # a JPEG, small enough for a template card


TITLE_H = 30   # LiteGraph.NODE_TITLE_HEIGHT of frontends 1.49.6 and 1.58.1: a node's rectangle starts above its pos


def _saved_layout(ui):
    return {"nodes": [{"id": str(n["id"]), "type": n["type"],
                       "rect": [n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H]}
                      for n in ui["nodes"]],
            "groups": [{"title": g["title"], "rect": g["bounding"]} for g in ui["groups"]]}


def test_layout_check_finds_overlaps_and_nodes_outside_groups():
    """comfyui_frontend.layout_problems (what the browser test applies to the measured layout) on hand geometry."""
    lp = _frontend().layout_problems
    g = [{"title": "a", "rect": [0, 0, 100, 100]}, {"title": "b", "rect": [200, 0, 100, 100]}]
    ok = {"nodes": [{"id": "1", "type": "X", "rect": [10, 10, 40, 40]}, {"id": "2", "type": "X", "rect": [50, 10, 40, 40]},
                    {"id": "3", "type": "MarkdownNote", "rect": [0, -80, 300, 70]}], "groups": g}
    assert lp(ok) == []                                                  # touching edges are not an overlap
    bad = json.loads(json.dumps(ok))
    bad["nodes"][1]["rect"][0] = 49                                      # 1 px into node 1
    bad["nodes"].append({"id": "4", "type": "X", "rect": [150, 10, 100, 40]})   # across groups a / b: in neither
    problems = lp(bad)
    assert len(problems) == 2 and "node 1 (X)" in problems[0] and "node 2 (X)" in problems[0]
    assert "node 4 (X)" in problems[1] and "inside 0 groups" in problems[1]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_saved_layout_has_no_overlaps(name):
    """The positions and sizes as saved (Load Video already sized for a portrait video): no overlaps, every node
    in one group. The browser test checks the layout the frontend really draws, after the video has loaded."""
    assert _frontend().layout_problems(_saved_layout(load_ui(name))) == []
    (video,) = [n for n in load_ui(name)["nodes"] if n["type"] == "LoadVideo"]
    w, h = video["size"]
    assert h - 80 >= w * 16 / 9, "Load Video leaves no room for a 9:16 video preview"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_dwpose_download_urls_match_the_core_model_table(name):
    models = pytest.importorskip("steadydancer_turbo.dwpose.models")
    for n in load_ui(name)["nodes"]:
        for m in n["properties"].get("models", []):
            if m["directory"] == "dwpose":
                assert m["url"] == models.MODEL_FILES[m["name"]].url


def test_long_graph_windows_the_turbo_sampler_at_161_frames():
    """The long workflow: 161 frames on Resample Frames (Conditioning takes them all), one Context Windows node
    (81 / 16 frames) on the model, the noise and the Colour Guard (off: strength 0) that sits between VAE Decode
    and Create Video."""
    api = _api("steadydancer-long")
    (_, resample), (_, cond) = _one(api, "SteadyDancerResampleFrames"), _one(api, "SteadyDancerConditioning")
    assert resample["max_frames"] == 161 and cond["length"] == 0
    (ctx, c), (_, guard) = _one(api, "SteadyDancerContextOptions"), _one(api, "SteadyDancerColourGuard")
    decode, _ = _one(api, "VAEDecode")
    _, create = _one(api, "CreateVideo")
    assert (c["window_frames"], c["overlap_frames"], c["anchor_frames"], c["noise"]) == (81, 16, 0, "freenoise")
    (guard_id,) = [k for k, v in api.items() if v["class_type"] == "SteadyDancerColourGuard"]
    assert guard["context"] == [ctx, 0] and guard["images"] == [decode, 0] and create["images"] == [guard_id, 0]
    assert guard["strength"] == 0.0


if __name__ == "__main__":
    if "--write" in sys.argv:
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest  # noqa: F401  (registers the pack from this checkout)

        API_DIR.mkdir(exist_ok=True)
        inf = object_info()
        for w in WORKFLOWS:
            out = ui_to_api(load_ui(w), inf)
            (API_DIR / f"{w}.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
            print("wrote", API_DIR / f"{w}.json")
