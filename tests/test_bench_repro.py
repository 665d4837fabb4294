"""bench/_e2e_repro.py (the e2e bench's reproducibility check): where the core savers go in the shipped graphs,
and the stage differences against hand-computed numbers, read back from files written by the real writers
(PIL PNGs, safetensors with ComfyUI's SaveLatent key)."""
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _e2e_repro as R  # noqa: E402


@pytest.mark.parametrize("name", ["steadydancer-dance", "steadydancer-turbo"])
def test_savers_take_the_pose_preview_the_sampler_latent_and_the_decoded_frames(name):
    prompt = json.loads((ROOT / "workflows_api" / f"{name}.json").read_text())
    before = json.loads(json.dumps(prompt))
    ids = R.insert_savers(prompt, "tagX")
    (dec,) = [nid for nid, n in before.items() if n["class_type"] == "VAEDecode"]
    (prev,) = [nid for nid, n in before.items() if n["class_type"] == "PreviewImage"]
    # the pose preview becomes a SaveImage of the same frames (the retarget node's pose output)
    assert ids["poses"] == prev
    assert prompt[prev] == {"class_type": "SaveImage", "inputs": {"images": before[prev]["inputs"]["images"],
                                                                  "filename_prefix": "tagX/poses"}}
    src = before[dec]["inputs"]["samples"]
    assert before[src[0]]["class_type"] == "SamplerCustomAdvanced"
    assert prompt[ids["latent"]] == {"class_type": "SaveLatent",
                                     "inputs": {"samples": src, "filename_prefix": "tagX/latent"}}
    assert prompt[ids["frames"]] == {"class_type": "SaveImage",
                                     "inputs": {"images": [dec, 0], "filename_prefix": "tagX/frames"}}
    negs = [n["inputs"]["negative_pose_frames"] for n in before.values() if "negative_pose_frames" in n["inputs"]]
    if name == "steadydancer-dance":   # the official graph encodes negative poses: their frames are saved too
        assert len(negs) == 1 and prompt[ids["negative_poses"]] == {
            "class_type": "SaveImage", "inputs": {"images": negs[0], "filename_prefix": "tagX/negative_poses"}}
    else:
        assert not negs and "negative_poses" not in ids
    assert {n for n in prompt if prompt[n] != before.get(n)} == {prev, *ids.values()}


def test_savers_refuse_a_graph_without_one_decode_and_one_preview():
    with pytest.raises(ValueError, match="one VAEDecode and one PreviewImage"):
        R.insert_savers({"1": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0]}}}, "t")


def _write(d, stage, arrays):
    from PIL import Image
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        if stage == "latent":
            save_file({"latent_tensor": a.astype(np.float32), "latent_format_version_0": np.array([])},
                      str(d / f"latent_{i:05d}_.latent"))
        else:
            Image.fromarray(a).save(d / f"{stage}_{i:05d}_.png")


def test_compare_names_the_first_stage_that_differs_with_hand_numbers(tmp_path):
    rng = np.random.default_rng(0)
    poses = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    lat = rng.standard_normal((1, 4, 2, 3, 5)).astype(np.float32)
    frames = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    for name in ("warm", "again"):
        _write(tmp_path / name, "poses", poses)
    lat2 = lat.copy()
    lat2[0, 1, 0, 2, 3] += 0.5                                   # one latent value moved by 0.5
    _write(tmp_path / "warm", "latent", [lat])
    _write(tmp_path / "again", "latent", [lat2])
    fr2 = [f.copy() for f in frames]
    fr2[1][3, 4, 0] = 255 - fr2[1][3, 4, 0]                      # one pixel of frame 1 changed
    _write(tmp_path / "warm", "frames", frames)
    _write(tmp_path / "again", "frames", fr2)

    c = R.compare(tmp_path / "again", tmp_path / "warm")
    assert c["poses"]["identical"] and c["poses"]["rel_l2"] == 0.0 and math.isinf(c["poses"]["psnr_db"])
    lt = c["latent"]
    assert not lt["identical"] and lt["items_differing"] == 1
    assert lt["max_abs"] == pytest.approx(0.5)
    assert lt["rel_l2"] == pytest.approx(0.5 / np.linalg.norm(lat.astype(np.float64)), rel=1e-6)
    fd = c["frames"]
    d = abs(255 - 2 * int(frames[1][3, 4, 0])) / 255.0
    assert fd["items_differing"] == 1 and fd["max_abs"] == pytest.approx(d)
    n = sum(f.size for f in frames)
    assert fd["psnr_db"] == pytest.approx(10 * math.log10(n / d ** 2))
    assert R.first_difference(c) == "latent"
    lines = "\n".join(R.table_lines(c))
    assert "| poses | yes | 0 |" in lines and "| latent | no | 1 |" in lines


def test_compare_marks_missing_or_mismatched_stages_not_comparable(tmp_path):
    _write(tmp_path / "a", "poses", [np.zeros((4, 4, 3), np.uint8)] * 2)
    _write(tmp_path / "b", "poses", [np.zeros((4, 4, 3), np.uint8)] * 3)
    c = R.compare(tmp_path / "a", tmp_path / "b")
    _write(tmp_path / "a", "negative_poses", [np.zeros((4, 4, 3), np.uint8)])
    c = R.compare(tmp_path / "a", tmp_path / "b")
    assert c["poses"] == {"comparable": False, "items": [2, 3]}        # negative_poses_* are not poses_*
    assert c["negative_poses"] == {"comparable": False, "items": [1, 0]}
    assert "latent" not in c and "frames" not in c                    # no saver on either side: not a stage
    assert R.first_difference(c) is None
    assert "not comparable" in "\n".join(R.table_lines(c))


def _traced_log(caplog, queues):
    """A server log as ComfyUI writes it: 'got prompt' per queue, then one traced line per DiT pass, written by
    the pack's own tracer (nodes/native_model._trace_pass) from the given tensors."""
    import logging

    import torch

    from steadydancer_turbo.nodes import native_model as nm
    lines = []
    for passes in queues:
        lines.append("got prompt")
        for t, x, pose, out in passes:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="steadydancer_turbo"):
                nm._trace_pass(torch.tensor(t), out, x=x, pose=pose, ref_x=None)
            lines += [r.getMessage() for r in caplog.records]
        lines.append("Prompt executed in 1.00 seconds")
    return "\n".join(lines)


def test_pass_trace_names_the_first_pass_and_field_that_differ(caplog):
    import torch

    import pass_trace as PT
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    pose = torch.full((2, 2), 0.25)
    out = torch.ones(2, 3, 4)
    same = [([999.0, 999.0], x, pose, out), ([937.0, 937.0], x + 1, pose, out * 2)]
    tiny = x.clone()
    tiny[1, 2, 3] += 2 ** -10                 # one element changed by ~1e-3: the float64 sum must still differ
    log = _traced_log(caplog, [same[:1], [], same, [same[0], ([937.0, 937.0], x + 1, pose, out * 2 + 2 ** -20)],
                               [same[0], ([937.0, 937.0], tiny + 1, pose * 0, out * 2)]])
    queues = PT.parse(log)
    assert [len(q) for q in queues] == [1, 2, 2, 2]  # the prompt without a traced pass is left out
    # the line carries the hand sums: x = 0 + 1 + ... + 23 = 276, pose = 4 x 0.25 = 1, out = 24
    assert queues[0][0] == {"batch": "2", "t": "999,999", "x": "276", "pose": "1", "ref_x": "-", "out": "24"}
    assert queues[1][1]["x"] == "300" and queues[1][1]["out"] == "48"
    assert PT.first_difference(queues[1], queues[1]) is None
    assert PT.first_difference(queues[1], queues[2]) == (1, ["out"])          # same inputs, other output
    assert PT.first_difference(queues[1], queues[3]) == (1, ["x", "pose"])     # the inputs already differ
    assert float(queues[3][1]["x"]) - 300 == 2 ** -10
    assert PT.first_difference(queues[0], queues[1]) == (1, ["missing"])
    text = PT.report(queues, (1, 2))
    assert "first difference at pass 1 (of 2 / 2): out" in text and "not reproducible" in text
    assert "all 2 passes identical" in PT.report(queues, (1, 1))
