"""bench/comfy_e2e.py's --model-node: a core MODEL -> MODEL node (EasyCache for the step-caching measurement of
issue 15) goes between the shipped graphs' model chain and their sampling section, checked on the API twins."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("sd_comfy_e2e", ROOT / "bench" / "comfy_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sd_comfy_e2e"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["steadydancer-dance", "steadydancer-turbo", "steadydancer-long"])
def test_model_node_goes_between_the_model_chain_and_the_sampling_section(name):
    e2e = _bench()
    prompt = json.loads((ROOT / "workflows_api" / f"{name}.json").read_text())
    before = json.loads(json.dumps(prompt))
    feeds = {nid: n["inputs"]["model"] for nid, n in prompt.items()
             if isinstance(n["inputs"].get("model"), list)
             and any(k in n["class_type"] for k in ("Guider", "Sampler", "Sigmas"))}
    assert feeds, "the graph has no sampling section with a model input"
    got = e2e.insert_model_node(prompt, "EasyCache:reuse_threshold=0.2,start_percent=0.15,verbose=false")
    new = got["node"]
    assert new not in before
    assert prompt[new] == {"class_type": "EasyCache", "inputs": {
        "model": next(iter(feeds.values())), "reuse_threshold": 0.2, "start_percent": 0.15, "verbose": False}}
    for nid in feeds:                                   # every model input of the section now reads the new node
        assert prompt[nid]["inputs"]["model"] == [new, 0]
    changed = {nid for nid in before if prompt[nid] != before[nid]}
    assert changed == set(feeds)                        # nothing else was touched


def test_model_node_refuses_a_graph_fed_from_two_models():
    e2e = _bench()
    prompt = {"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {}},
              "3": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0]}},
              "4": {"class_type": "SteadyDancerOfficialSigmas", "inputs": {"model": ["2", 0]}}}
    with pytest.raises(e2e.rw.RunError, match="2 MODEL outputs"):
        e2e.insert_model_node(prompt, "EasyCache")


def test_queue_list_is_cold_then_warm_then_optional_reseed():
    b = _bench()
    assert b.parse_queues("cold,warm") == ["cold", "warm"]
    assert b.parse_queues(" cold, warm ,reseed") == ["cold", "warm", "reseed"]
    assert b.parse_queues("cold") == ["cold"]
    assert b.parse_queues("cold,warm,again") == ["cold", "warm", "again"]
    assert b.parse_queues("cold,warm,reseed,again") == ["cold", "warm", "reseed", "again"]
    for bad in ("warm,cold", "cold,reseed", "cold,warm,warm", "cold,hot", "", "cold,reseed,warm", "cold,again",
                "cold,again,warm"):
        with pytest.raises(SystemExit, match="--queues"):
            b.parse_queues(bad)


def test_tiny_official_steps_are_honoured_and_cold_steps_override_one_queue(tmp_path):
    b = _bench()
    args = b.build_parser().parse_args(["--comfyui", str(tmp_path), "--tiny", "--official-steps", "10"])
    run = b.parse_runs("official480")[0]
    prompt, _, info = b.prepare(run, args, "ref.png", "dance.mp4", seed=7)
    steps = {n["inputs"]["steps"] for n in prompt.values() if isinstance(n["inputs"].get("steps"), int)}
    assert steps == {10} and info["steps"] == 10 and info["workflow_steps"] == 40
    prompt, _, info = b.prepare(run, args, "ref.png", "dance.mp4", seed=7, steps_override=4)
    assert {n["inputs"]["steps"] for n in prompt.values() if isinstance(n["inputs"].get("steps"), int)} == {4}
    seeds = {n["inputs"]["noise_seed"] for n in prompt.values() if "noise_seed" in n["inputs"]}
    assert seeds == {7}
