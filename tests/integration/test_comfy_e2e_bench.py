"""bench/comfy_e2e.py --tiny end to end in a real ComfyUI: make-files, then the turbo and official workflows queued
cold and warm on a fresh server each, the per-node table and JSON, the saved videos, and a rerun that resumes.

Checked against the server's own records, not the bench's arithmetic: the nodes timed on the cold queue are exactly
the nodes of the queued prompt (a fresh server caches nothing), the sum of the node times matches the server's
execution_start -> execution_success timestamps, the warm queue re-runs the nodes fed by the new input files while
the loaders come back as ComfyUI's execution_cached, and the mp4 decodes (PyAV) to the frame count and size asked.
"""
import json
import os
import pathlib
import subprocess
import sys

from comfyui_harness import PACK_ROOT, comfyui_path, models, run_workflow

BENCH = PACK_ROOT / "bench" / "comfy_e2e.py"
RUNS = ("turbo480", "official480")


def _run(cmd, timeout, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=PACK_ROOT,
                       env=None if env is None else {**os.environ, **env})
    return p.returncode, p.stdout, p.stderr


def test_tiny_e2e_bench_times_every_node_and_saves_the_videos(tmp_path):
    comfy = comfyui_path()
    python = run_workflow.comfy_python(comfy)
    models_dir, out = tmp_path / "models", tmp_path / "out"
    rc, so, se = _run([sys.executable, str(BENCH), "--tiny", "--make-files", str(models_dir), "--comfyui", str(comfy),
                       "--python", python], 600)
    assert rc == 0, se[-3000:]
    assert (models_dir / "input" / "dance.mp4").is_file() and (models_dir / "input" / "dance_warm.mp4").is_file()

    cmd = [python, str(BENCH), "--tiny", "--comfyui", str(comfy), "--models", str(models_dir), "--out", str(out),
           "--runs", ",".join(RUNS), "--queues", "cold,warm,reseed,again", "--save-intermediates"]
    rc, so, se = _run(cmd, 1500, env={"STEADYDANCER_TRACE_PASSES": "1"})  # the server traces every DiT pass
    assert rc == 0, (so + se)[-5000:]
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert md.strip() in so, "the table is printed"
    for key in RUNS:
        rec = res["runs"][key]
        assert rec["status"] == "done", rec
        cold, warm = rec["queues"]["cold"], rec["queues"]["warm"]
        prompt = set(cold["prompt_nodes"])
        timed = {n for n, e in cold["nodes"].items() if not e["cached"]}
        assert timed == prompt, f"{key}: cold timed {sorted(timed)} vs prompt {sorted(prompt)}"
        assert not cold["cached"], cold["cached"]
        for n, e in cold["nodes"].items():
            assert 0 < e["s"] < cold["total_s"], (key, n, e)
            assert e["peak_rss_gib"] and 0.1 < e["peak_rss_gib"] < 64, (key, n, e)
            assert f"| {n} {e['class_type']}" in md, (key, n)
        for q in (cold, warm):
            node_sum = sum(e["s"] for e in q["nodes"].values())
            assert abs(node_sum - q["server_execution_s"]) < 0.5 + 0.1 * q["server_execution_s"], (key, node_sum, q)
            assert node_sum <= q["total_s"] + 0.05, (key, node_sum, q["total_s"])
            n, w, h, _ = models.video_info(q["video"])
            assert (n, w, h) == (9, rec["width"], rec["height"]), (key, n, w, h)
        # warm: new file names -> the loaders of media re-run; model loaders come back cached from ComfyUI
        classes = {n: e["class_type"] for n, e in warm["nodes"].items()}
        assert set(classes) == prompt, (key, sorted(classes))
        cached = {classes[n] for n in warm["cached"]}
        assert {"VAELoader", "SteadyDancerModelLoader"} <= cached, (key, cached)
        for n, c in classes.items():
            if c in ("LoadVideo", "LoadImage", "SaveVideo"):
                assert not warm["nodes"][n]["cached"] and warm["nodes"][n]["s"] > 0, (key, n, warm["nodes"][n])
        # reseed: warm's files again, only a new noise seed -> ComfyUI's cache keeps media, poses and encodes
        reseed = rec["queues"]["reseed"]
        rcls = {n: e["class_type"] for n, e in reseed["nodes"].items()}
        assert reseed["seed"] != warm["seed"], (reseed["seed"], warm["seed"])
        rcached = {rcls[n] for n in reseed["cached"]}
        assert {"LoadVideo", "LoadImage", "SteadyDancerPoseExtract", "SteadyDancerPoseRetarget",
                "SteadyDancerConditioning"} <= rcached, (key, rcached)
        for n, c in rcls.items():
            if c in ("RandomNoise", "SamplerCustomAdvanced", "VAEDecode", "SaveVideo"):
                assert not reseed["nodes"][n]["cached"], (key, n, reseed["nodes"][n])
        assert "| reseed s |" in md
        # again: warm's content under new names, warm's seed -> everything fed by the media runs again, and on
        # the CPU the pose frames, the sampler's latent and the decoded frames come out bit-identical to warm's
        again = rec["queues"]["again"]
        acls = {n: e["class_type"] for n, e in again["nodes"].items()}
        assert again["seed"] == warm["seed"]
        for n, c in acls.items():
            if c in ("LoadVideo", "LoadImage", "SteadyDancerPoseExtract", "SteadyDancerConditioning",
                     "SamplerCustomAdvanced", "VAEDecode", "SaveLatent"):
                assert not again["nodes"][n]["cached"], (key, n, again["nodes"][n])
        for q in ("warm", "again"):
            files = rec["queues"][q]["intermediate_files"]
            assert len(files["poses"]) == 9 and len(files["frames"]) == 9 and len(files["latent"]) == 1, (key, files)
            assert len(files["negative_poses"]) == (9 if key.startswith("official") else 0), (key, files)
        rep = rec["repro"]
        for stage in ("poses", "latent", "frames") + (("negative_poses",) if key.startswith("official") else ()):
            assert rep[stage]["comparable"] and rep[stage]["identical"], (key, stage, rep[stage])
        assert rep["first_difference"] in (None, "video"), rep
        assert "Reproducibility (again" in md
        # the per-pass trace in the server's own log: one traced queue per queue, warm and again identical pass
        # by pass, cold and warm not (other inputs, other seed); the official guider batches its text-CFG passes
        # (2 a step; the tiny run's few steps leave no pose-guided 3-pass step), the turbo sampler runs one
        sys.path.insert(0, str(PACK_ROOT / "bench"))
        import pass_trace
        traced = pass_trace.parse(pathlib.Path(rec["server_log"]).read_text())
        assert len(traced) == 4, (key, [len(q) for q in traced])
        assert pass_trace.first_difference(traced[1], traced[3]) is None, (key, traced[1][:1], traced[3][:1])
        assert pass_trace.first_difference(traced[0], traced[1]) is not None
        batches = {p["batch"] for q in traced for p in q}
        assert batches == ({"2"} if key.startswith("official") else {"1"}), (key, batches)
    assert "ESTIMATE" in md and "**queue -> saved video**" in md

    rc, so, se = _run(cmd, 120)           # resumable: the finished runs are kept, nothing is queued again
    assert rc == 0, se[-3000:]
    assert all(f"[{k}] already done" in se for k in RUNS), se[-2000:]
    assert json.loads((out / "results.json").read_text())["runs"][RUNS[0]]["queues"]["cold"]["prompt_id"] == \
        res["runs"][RUNS[0]]["queues"]["cold"]["prompt_id"]
    assert pathlib.Path(res["runs"][RUNS[0]]["queues"]["cold"]["video"]).is_file()
