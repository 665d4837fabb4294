#!/usr/bin/env python3
"""Queue -> saved video in a real ComfyUI server with this pack: per-node wall time, peak VRAM and host RAM, for
the shipped workflows on full-size random-weight files in the real formats (issue 15).

1. Write the model files (every ``properties.models`` entry of example_workflows/steadydancer-{turbo,dance}.json,
   random weights, real formats and key sets; see bench/_e2e_files.py) and the inputs (81-frame 832x480 16 fps
   driving video, reference image) into a ComfyUI models tree:

       python bench/comfy_e2e.py --make-files /data/models --comfyui /path/to/ComfyUI [--dit fp8|bf16|both]

2. Run the benchmark: for each run a fresh ComfyUI server (``main.py --listen 127.0.0.1 --port P --base-directory
   BASE``, BASE/custom_nodes linking this pack and BASE/models -> the models tree; ``--cpu`` without a GPU), run
   with this Python (``sys.executable``, the current environment: PYTHONPATH, TORCHINDUCTOR_CACHE_DIR ... pass
   through), then two queues through the run command's API (tools/run_workflow.py: upload, pre-check, queue,
   websocket wait, video download): ``cold`` = the first queue after the server start, ``warm`` = a second queue
   with the models loaded and new inputs (same files under new names, new seed: every node but the loaders and
   the text encode runs again, as for a user's next dance); ``--queues cold,warm,reseed`` adds a third queue with
   warm's files and only a new noise seed (a user's re-roll: the poses and encodes come back cached), and
   ``--cold-steps N`` makes the cold queue a shorter warm-up (loading + compiling; labelled in the table);
   ``again`` (after warm) queues warm's content under new names with warm's seed and compares the two videos, and
   with ``--save-intermediates`` the pose frames, the sampler's latent and the decoded frames too, naming the first
   stage where they differ (bench/_e2e_repro.py):

       python bench/comfy_e2e.py --comfyui /path/to/ComfyUI --models /data/models --out bench/logs/e2e \
           [--runs turbo480,turbo720,official480,official720] [--official-steps 8]

   A run is ``<turbo|official><480|720>[:bf16]`` (480 = 832x480, 720 = 1280x720, 81 frames; ``:bf16`` = the bf16
   DiT file from ``--dit bf16``). Per node: wall time from the server's websocket messages (``executing`` to the
   next ``executing`` / ``execution_success``, stamped on arrival here; ``execution_cached`` nodes are marked
   cached), the peak device memory in use during the node (NVML, every 50 ms) and the peak RSS of the server
   process with its children (psutil). ``--official-steps N`` runs the official sampler with N steps and adds an
   extrapolated total for the workflow's steps from the measured per-step time (labelled as an estimate).
   OUTDIR gets results.json (everything, rewritten after every queue: a killed run keeps what finished; a rerun
   skips the runs already done unless --force), results.md (the tables, also printed), server logs and videos.
   ``--input NAME=VALUE`` sets a widget input on every node that has it (``compile=true``, ``attention=...``); give
   each such variant its own OUTDIR (results are keyed by run name).

3. ``--tiny``: the same flow on a CPU against tiny models (tests/integration's), with the umt5 / CLIP vision encode
   nodes swapped for the test fixture pack's (no tiny variant of those exists that ComfyUI's loaders accept):

       python bench/comfy_e2e.py --tiny --make-files /tmp/e2e/models --comfyui /work/comfyui
       /work/comfyui/venv/bin/python bench/comfy_e2e.py --tiny --comfyui /work/comfyui --models /tmp/e2e/models \
           --out /tmp/e2e/out
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (ROOT / "tools", BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _e2e_files as F  # noqa: E402
import _e2e_repro as R  # noqa: E402
import run_workflow as rw  # noqa: E402

PACK_FOLDER = "ComfyUI-SteadyDancer-Turbo"
FIXTURE_FOLDER = "steadydancer_test_fixtures"
SIZES = {"480": (832, 480), "720": (1280, 720)}
TINY_SIZES = {"480": (96, 64), "720": (128, 80)}
TINY_FRAMES, TINY_STEPS = 9, 2
RUN_RE = re.compile(r"^(turbo|official|dance)(480|720)(?::(fp8|bf16))?$")
ENV_KEYS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "PYTHONPATH",
            "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
GIB = 2 ** 30


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the prompt
def parse_runs(text):
    runs = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        m = RUN_RE.match(item)
        if not m:
            raise SystemExit(f"--runs: {item!r} is not <turbo|official><480|720>[:bf16]")
        runs.append(dict(key=item, workflow="turbo" if m[1] == "turbo" else "dance", res=m[2], dit=m[3] or "fp8"))
    return runs


QUEUES = ("cold", "warm", "reseed", "again")


def parse_queues(text):
    """``cold,warm[,reseed][,again]``: cold = the first queue after the server start; warm = new input files
    (same content, new names) and a new seed; reseed = warm's files again with only a new noise seed (a user's
    re-roll: ComfyUI's cache keeps the poses and the encodes); again = warm's content under new names with warm's
    seed (everything but the loaders and text encodes runs again: is the result the same? bench/_e2e_repro.py)."""
    qs = [q.strip() for q in text.split(",") if q.strip()]
    if not qs or qs[0] != "cold" or any(q not in QUEUES for q in qs) or len(set(qs)) != len(qs) \
            or any(q in qs and "warm" not in qs[:qs.index(q)] for q in ("reseed", "again")):
        raise SystemExit(f"--queues {text!r}: give cold, then warm, then optionally reseed and again (each once)")
    return qs


def again_copy(path, out):
    """A byte-identical copy of warm's input file under a new name (the ``again`` queue's upload)."""
    p = pathlib.Path(path)
    dest = pathlib.Path(out) / "inputs_again" / f"{p.stem}_again{p.suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p, dest)
    return dest


def prepare(run, args, image_name, video_name, seed, steps_override=None):
    """The API prompt of a run: the shipped twin with the inputs, size, seed, steps and DiT file set (everything
    found by input names, not node ids). ``steps_override`` sets the sampler steps of this queue (``--cold-steps``).
    Returns (prompt, UI path, info)."""
    prompt_path, ui_path = rw.resolve_workflow(run["workflow"])
    prompt = rw.load_prompt(prompt_path)
    w, h = (TINY_SIZES if args.tiny else SIZES)[run["res"]]
    if args.tiny:
        harness = F._load("sd_e2e_harness", ROOT / "tests" / "integration" / "comfyui_harness.py")
        prompt = harness.small(prompt, w, h, TINY_FRAMES)
    for node in prompt.values():
        ins = node["inputs"]
        if isinstance(ins.get("width"), int) and isinstance(ins.get("height"), int):
            ins.update(width=w, height=h)
    rw.set_media_inputs(prompt, image_name, video_name)
    rw.randomize_seeds(prompt, seed)
    info = {"workflow": prompt_path.stem, "width": w, "height": h, "seed": seed}
    steps = [n["inputs"]["steps"] for n in prompt.values() if isinstance(n["inputs"].get("steps"), int)]
    info["workflow_steps"] = max(steps) if steps else None
    want = args.official_steps if run["workflow"] == "dance" else None
    if args.tiny:
        want = want or TINY_STEPS
    if steps_override is not None:
        want = steps_override
    if want is not None:
        for n in prompt.values():
            if isinstance(n["inputs"].get("steps"), int):
                n["inputs"]["steps"] = want
    info["steps"] = want if (want is not None and steps) else info["workflow_steps"]
    for item in args.input or []:
        name, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        hit = [nid for nid, n in prompt.items() if name in n["inputs"] and not isinstance(n["inputs"][name], list)]
        if not hit:
            raise rw.RunError(f"--input {item}: no node of {prompt_path.name} has a widget input {name!r}", 2)
        for nid in hit:
            prompt[nid]["inputs"][name] = value
        info.setdefault("inputs", {})[name] = value
    for spec in args.model_node or []:
        info.setdefault("model_nodes", []).append(insert_model_node(prompt, spec, prompt_path.name))
    fp8_name = F.dit_name(F.workflow_models())
    info["dit"] = fp8_name
    if run["dit"] == "bf16":
        hits = 0
        for n in prompt.values():
            for k, v in n["inputs"].items():
                if v == fp8_name:
                    n["inputs"][k], hits = F.BF16_DIT_NAME, hits + 1
        if not hits:
            raise rw.RunError(f"{run['key']}: no node of {prompt_path.name} takes {fp8_name}", 2)
        info["dit"] = F.BF16_DIT_NAME
    return prompt, ui_path, info


def insert_model_node(prompt, spec, where="the workflow"):
    """``--model-node CLASS[:name=value,...]``: put a MODEL -> MODEL node (core EasyCache, ModelSamplingSD3,
    TorchCompileModel, ...) between the model chain and the sampling section: every ``model`` input of a guider /
    sampler / sigmas node that the chain feeds is rewired to the new node, which takes that chain's MODEL. Values
    are parsed as JSON when they can be. Returns the spec as recorded in results.json."""
    cls, _, rest = spec.partition(":")
    inputs = {}
    for item in filter(None, rest.split(",")):
        name, _, raw = item.partition("=")
        try:
            inputs[name] = json.loads(raw)
        except json.JSONDecodeError:
            inputs[name] = raw
    consumers = [(nid, n) for nid, n in prompt.items()
                 if isinstance(n["inputs"].get("model"), list)
                 and any(k in n["class_type"] for k in ("Guider", "Sampler", "Sigmas", "KSampler"))]
    sources = {tuple(n["inputs"]["model"]) for _, n in consumers}
    if len(sources) != 1:
        raise rw.RunError(f"--model-node {spec}: {where} feeds its sampling section from {len(sources)} MODEL "
                          f"outputs ({sorted(sources)}); expected one", 2)
    (source,) = sources
    new_id = str(max(int(k) for k in prompt if k.isdigit()) + 1)
    prompt[new_id] = {"class_type": cls, "inputs": {"model": list(source), **inputs}}
    for _, n in consumers:
        n["inputs"]["model"] = [new_id, 0]
    return {"class_type": cls, "node": new_id, "inputs": inputs}


# ------------------------------------------------------------------------------------------------ timing
def node_windows(events, t_end):
    """[(node id, t0, t1)] from the (arrival time, type, data) websocket events of one prompt, the cached node
    ids, the progress events per node and the server's own timestamps (ms) per message type."""
    windows, cached, progress, stamps = [], [], {}, {}
    cur, cur_t = None, None
    for ts, typ, d in events:
        if "timestamp" in d:
            stamps.setdefault(typ, d["timestamp"])
        if typ == "execution_cached":
            cached += [str(n) for n in d.get("nodes", []) or []]
        elif typ == "progress" and d.get("node") is not None:
            progress.setdefault(str(d["node"]), []).append((ts, d.get("value"), d.get("max")))
        if typ in ("executing", "execution_success", "execution_error", "execution_interrupted"):
            if cur is not None:
                windows.append((cur, cur_t, ts))
            n = d.get("node") if typ == "executing" else None
            cur, cur_t = (str(n), ts) if n is not None else (None, None)
    if cur is not None:
        windows.append((cur, cur_t, t_end))
    return windows, cached, progress, stamps


def per_step(progress, windows, steps):
    """The sampler's step times: the node whose progress bar counts ``steps`` (else the one with the most progress
    events); per step = the median gap between its progress events, first step = its start to the first event
    (it carries warm-up / compilation)."""
    if not progress:
        return None
    cands = [nid for nid, ev in progress.items() if steps and ev[-1][2] == steps] or list(progress)
    nid = max(cands, key=lambda n: (len(progress[n]), sum(t1 - t0 for m, t0, t1 in windows if m == n)))
    ts = [t for t, _, _ in progress[nid]]
    start = min((t0 for m, t0, _ in windows if m == nid), default=None)
    diffs = sorted(b - a for a, b in zip(ts, ts[1:]))
    return {"node": nid, "steps_seen": len(ts), "max": progress[nid][-1][2],
            "per_step_s": diffs[len(diffs) // 2] if diffs else None,
            "first_step_s": ts[0] - start if start is not None else None}


def measure_queue(client, monitor, prompt, args, steps=None):
    """Queue once and follow it; returns the result dict of this queue."""
    events = []
    ws = client.websocket()
    try:
        t_q = time.monotonic()
        pid = client.queue(prompt)
        hist = rw.wait_for_prompt(client, ws, pid, on_event=lambda t, d: events.append((time.monotonic(), t, d)),
                                  timeout=args.timeout)
        t_done = time.monotonic()
    finally:
        ws.close()
    videos = [f for f in rw.output_files(hist) if pathlib.Path(f["filename"]).suffix.lower() in rw.VIDEO_EXTS]
    if not videos:
        raise rw.RunError(f"the run finished but produced no video (outputs: {rw.output_files(hist)})")
    data = client.view(videos[-1]["filename"], videos[-1].get("subfolder", ""), videos[-1].get("type", "output"))
    t_fetch = time.monotonic()
    windows, cached, progress, stamps = node_windows(events, t_done)
    nodes, order = {}, []
    for nid, t0, t1 in windows:
        n = prompt.get(nid, {})
        e = nodes.setdefault(nid, {"class_type": n.get("class_type", "?"), "title": (n.get("_meta") or {}).get("title"),
                                   "s": 0.0, "cached": False, "peak_vram_gib": None, "peak_rss_gib": None})
        if nid not in order:
            order.append(nid)
        e["s"] += t1 - t0
        v, r = monitor.peak(t0, t1) if monitor else (None, None)
        for key, val in (("peak_vram_gib", v), ("peak_rss_gib", r)):
            if val is not None:
                e[key] = max(e[key] or 0.0, val / GIB)
    for nid in cached:
        n = prompt.get(nid, {})
        nodes.setdefault(nid, {"class_type": n.get("class_type", "?"), "title": (n.get("_meta") or {}).get("title"),
                               "s": 0.0, "peak_vram_gib": None, "peak_rss_gib": None})["cached"] = True
    v, r = monitor.peak(t_q, t_done) if monitor else (None, None)
    first = windows[0][1] if windows else t_done
    out = {"prompt_id": pid, "total_s": t_done - t_q, "to_first_node_s": first - t_q, "fetch_s": t_fetch - t_done,
           "nodes": nodes, "order": order, "cached": cached, "prompt_nodes": sorted(prompt),
           "peak_vram_gib": v / GIB if v is not None else None, "peak_rss_gib": r / GIB if r is not None else None,
           "sampler": per_step(progress, windows, steps), "video_bytes": len(data), "video_name": videos[-1]["filename"]}
    if "execution_start" in stamps and "execution_success" in stamps:
        out["server_execution_s"] = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    return out, data


# ------------------------------------------------------------------------------------------------ a run
def make_base(base, models, tiny):
    if base.exists():
        shutil.rmtree(base)
    for d in ("custom_nodes", "input", "output", "user", "temp"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    if tiny:
        (base / "custom_nodes" / FIXTURE_FOLDER).symlink_to(ROOT / "tests" / "integration" / "fixture_pack",
                                                            target_is_directory=True)
    (base / "models").symlink_to(pathlib.Path(models).resolve(), target_is_directory=True)


def have_gpu():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001
        return False


def do_run(run, args, results, save):
    from _e2e_monitor import Monitor

    out = pathlib.Path(args.out)
    key = run["key"].replace(":", "-")
    base = out / "base" / key
    make_base(base, args.models, args.tiny)
    cpu = args.cpu or args.tiny or not have_gpu()
    extra = ["--database-url", "sqlite:///:memory:"] + list(args.server_arg or [])
    server = rw.ComfyServer(args.comfyui, base_directory=base, python=args.python or sys.executable, cpu=cpu,
                            extra_args=extra, log_path=out / "logs" / f"{key}.log")
    rec = results["runs"][run["key"]] = {"status": "running", "spec": run, "cpu": cpu, "queues": {},
                                         "server_log": str(server.log_path)}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    save()
    client = monitor = None
    try:
        t0 = time.monotonic()
        log(f"[{run['key']}] starting ComfyUI from {server.comfyui_path} on {server.url} (log {server.log_path})")
        server.start(timeout=args.start_timeout)
        rec["server_start_s"] = time.monotonic() - t0
        client = rw.ComfyClient(server.url, timeout=120)
        results["server"] = client.system_stats()
        monitor = Monitor(server.proc.pid).start()
        rec["nvml"] = monitor.gpu_name or monitor.nvml_error
        idle = monitor.baseline_vram()
        rec["vram_idle_gib"] = idle / GIB if idle is not None else None
        inputs = pathlib.Path(args.models) / "input"
        queues = parse_queues(args.queues)
        for qi, qname in enumerate(queues):
            img, vid = inputs / F.INPUTS[0], inputs / F.INPUTS[1]
            if qname != "cold":  # warm: the same files under new names; reseed: warm's files again
                img, vid = F.warm_name(img), F.warm_name(vid)
            if qname == "again":  # warm's bytes under a third pair of names
                img, vid = again_copy(img, out), again_copy(vid, out)
            t_up = time.monotonic()
            if qname != "reseed":  # a re-roll uploads nothing (an upload would touch the file: LoadVideo re-runs)
                names = client.upload(img), client.upload(vid)
            upload_s = time.monotonic() - t_up
            steps = args.cold_steps if qname == "cold" else None
            seed = 1000 + (queues.index("warm") if qname == "again" else qi)
            prompt, ui_path, info = prepare(run, args, *names, seed=seed, steps_override=steps)
            tag = f"sdrepro_{key}_{qname}"
            if args.save_intermediates:
                R.insert_savers(prompt, tag)
            rec.update(info)  # the later queues' info (the workflow's steps) replaces a shortened cold queue's
            if qname == "cold" and steps is not None:
                rec["cold_steps"] = steps
            problems, missing = rw.precheck(client, prompt, ui_path)
            if missing:
                raise rw.missing_error(missing)
            if problems:
                raise rw.RunError("the workflow does not fit this server:\n" + "\n".join(problems), 2)
            log(f"[{run['key']}] queue {qname}: {info['workflow']} {info['width']}x{info['height']}, "
                f"steps {info['steps']}, DiT {info['dit']}")
            q, video = measure_queue(client, monitor, prompt, args, steps=info["steps"])
            q["upload_s"] = upload_s
            q["seed"], q["steps"] = info["seed"], info["steps"]
            vpath = out / "videos" / f"{key}-{qname}{pathlib.Path(q['video_name']).suffix}"
            vpath.write_bytes(video)
            q["video"] = str(vpath)
            if args.save_intermediates:
                q["intermediates"] = str(out / "intermediates" / key / qname)
                q["intermediate_files"] = R.collect(base / "output", tag, q["intermediates"])
            est = None if (qname == "cold" and steps is not None) else estimate(q, info)
            if est:
                q["estimate"] = est
            rec["queues"][qname] = q
            log(f"[{run['key']}] {qname}: queue -> video {q['total_s']:.1f} s ({vpath})")
            save()
        if "again" in rec["queues"]:
            a, w = rec["queues"]["again"], rec["queues"]["warm"]
            rec["repro"] = R.compare(a.get("intermediates"), w.get("intermediates"), a["video"], w["video"])
            rec["repro"]["first_difference"] = R.first_difference(rec["repro"])
            log(f"[{run['key']}] again vs warm: first difference at {rec['repro']['first_difference']}")
        rec["status"] = "done"
    except rw.RunError as e:
        rec.update(status="failed", error=str(e))
        log(f"[{run['key']}] failed: {e}\n  server log: {server.log_path}")
    finally:
        if monitor:
            monitor.stop()
        if client:
            client.close()
        server.stop()
        save()
        if not args.keep_base:
            shutil.rmtree(base, ignore_errors=True)


def estimate(q, info):
    """Extrapolated queue -> video at the workflow's own steps when fewer were run (an estimate, labelled so)."""
    s, run_steps, wf_steps = q.get("sampler"), info.get("steps"), info.get("workflow_steps")
    if not s or not s.get("per_step_s") or not run_steps or not wf_steps or run_steps >= wf_steps:
        return None
    extra = (wf_steps - run_steps) * s["per_step_s"]
    return {"label": f"ESTIMATE: {run_steps} steps measured, {wf_steps} extrapolated at "
                     f"{s['per_step_s']:.3f} s/step", "steps": wf_steps, "per_step_s": s["per_step_s"],
            "total_s": q["total_s"] + extra, "sampler_s": q["nodes"].get(s["node"], {}).get("s", 0.0) + extra}


# ------------------------------------------------------------------------------------------------ the report
def _f(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def _multi(values, nd=1):
    return " / ".join(_f(v, nd) or "-" for v in values)


def table(results):
    lines = []
    srv = results.get("server", {}).get("system", {})
    devs = results.get("server", {}).get("devices", [])
    lines.append(f"ComfyUI {srv.get('comfyui_version', '?')}, torch {srv.get('pytorch_version', '?')}, "
                 f"device {devs[0].get('name') if devs else '?'}, {results.get('date', '')}")
    for key, rec in results.get("runs", {}).items():
        lines.append("")
        lines.append(f"### {key}: {rec.get('workflow', '?')} {rec.get('width')}x{rec.get('height')}, steps "
                     f"{rec.get('steps')}, DiT {rec.get('dit')}, {'CPU' if rec.get('cpu') else 'GPU'}"
                     + (f", inputs {rec['inputs']}" if rec.get("inputs") else "") + "; "
                     f"server start {_f(rec.get('server_start_s'))} s"
                     + (f", idle VRAM {_f(rec['vram_idle_gib'])} GiB" if rec.get("vram_idle_gib") is not None else "")
                     + f"; {rec.get('status')}"
                     + (f": {rec['error'].splitlines()[0]}" if rec.get("error") else ""))
        qs = rec.get("queues", {})
        names = [q for q in QUEUES if q in qs] or ["cold", "warm"]
        heads = [q + (f" ({rec['cold_steps']} steps)" if q == "cold" and rec.get("cold_steps") else "")
                 for q in names]
        Q = [qs.get(q, {}) for q in names]
        slash = " / ".join(names)
        lines.append("")
        lines.append("| node | " + " | ".join(f"{h} s" for h in heads) + f" | peak VRAM GiB {slash} | "
                     f"peak RAM GiB {slash} |")
        lines.append("|---|" + "---:|" * (len(names) + 2))
        order = []
        for q in Q:
            order += [n for n in q.get("order", []) if n not in order]
        for q in Q:
            order += [n for n in q.get("nodes", {}) if n not in order]
        for nid in order:
            es = [q.get("nodes", {}).get(nid, {}) for q in Q]
            e = next(x for x in es if x)
            label = f"{nid} {e.get('class_type')}" + (f" ({e['title']})" if e.get("title") and
                                                       e["title"] != e.get("class_type") else "")
            cells = ["cached" if x.get("cached") else _f(x.get("s"), 2) for x in es]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_multi([x.get('peak_vram_gib') for x in es])} | "
                         f"{_multi([x.get('peak_rss_gib') for x in es])} |")
        lines.append("| queue -> first node | " + " | ".join(_f(q.get("to_first_node_s"), 2) for q in Q) + " | | |")
        lines.append("| **queue -> saved video** | " + " | ".join(f"**{_f(q.get('total_s'))}**" for q in Q) +
                     f" | {_multi([q.get('peak_vram_gib') for q in Q])} | {_multi([q.get('peak_rss_gib') for q in Q])} |")
        ests = [q.get("estimate") for q in Q]
        if any(ests):
            first = next(e for e in ests if e)
            lines.append(f"| ESTIMATE queue -> video at {first['steps']} steps | " +
                         " | ".join(_f((e or {}).get("total_s")) for e in ests) + f" | {first['label']} | |")
        for qn, q in zip(names, Q):
            s = q.get("sampler")
            if s and s.get("per_step_s"):
                lines.append(f"| {qn} sampler {s['node']}: per step (2nd on) | {_f(s['per_step_s'], 3)} s | "
                             f"first step {_f(s.get('first_step_s'), 2)} s | {s['steps_seen']} steps |"
                             + " |" * (len(names) - 1))
        if rec.get("repro"):
            lines += ["", f"Reproducibility (again = warm's content under new names, warm's seed); first difference: "
                          f"{rec['repro'].get('first_difference') or 'none'}", ""]
            lines += R.table_lines(rec["repro"])
    return "\n".join(lines) + "\n"


def bench(args):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", {})
    results.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   host=platform.node(), python=sys.executable, tiny=bool(args.tiny), models=str(args.models),
                   comfyui=str(args.comfyui), env={k: os.environ.get(k) for k in ENV_KEYS if os.environ.get(k)})

    def save():
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        (out / "results.md").write_text(table(results))

    for run in parse_runs(args.runs):
        if results["runs"].get(run["key"], {}).get("status") == "done" and not args.force:
            log(f"[{run['key']}] already done in {path} (--force to run it again)")
            continue
        do_run(run, args, results, save)
    save()
    print(table(results))
    failed = [k for k, r in results["runs"].items() if r.get("status") != "done"]
    return 1 if failed else 0


def make_files(args):
    d = pathlib.Path(args.make_files)
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.tiny:
        python = args.python or rw.comfy_python(args.comfyui)
        for path, note in F.make_tiny(d, args.comfyui, python).items():
            log(f"{path}: {note}")
    else:
        dits = ("fp8", "bf16") if args.dit == "both" else (args.dit,)
        only = tuple(k.strip() for k in args.only.split(",")) if args.only else F.KINDS
        bad = [k for k in only if k not in F.KINDS]
        if bad:
            raise SystemExit(f"--only {args.only}: unknown kind(s) {bad}; choose from {', '.join(F.KINDS)}")
        F.make_full(d, args.comfyui, dits=dits, log=log, only=only)
    if args.check_files and not args.tiny:
        problems = F.check_files(d, args.comfyui, log=log)
        if problems:
            log("check-files: PROBLEMS:\n  " + "\n  ".join(problems))
            return 1
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    log(f"make-files: {size / 1e9:.2f} GB in {d}, {time.perf_counter() - t:.1f} s")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-files", metavar="DIR", help="write the model files and inputs into the models tree DIR")
    p.add_argument("--dit", choices=("fp8", "bf16", "both"), default="fp8", help="with --make-files: which DiT files")
    p.add_argument("--check-files", action="store_true", help="with --make-files: then load the umt5 / CLIP vision / "
                   "VAE files with ComfyUI's own loaders, encode once, report missing keys and non-finite outputs")
    p.add_argument("--only", help=f"with --make-files: write only these kinds ({', '.join(F.KINDS)})")
    p.add_argument("--comfyui", required=True, help="ComfyUI checkout (main.py; its classes give the key sets)")
    p.add_argument("--models", help="the models tree from --make-files (its input/ has the video and image)")
    p.add_argument("--out", help="results folder (results.json, results.md, logs/, videos/)")
    p.add_argument("--runs", default="turbo480,turbo720,official480,official720",
                   help="comma list of <turbo|official><480|720>[:bf16] (default %(default)s)")
    p.add_argument("--official-steps", type=int, help="steps of the official sampler (default: the workflow's); "
                   "with fewer, an extrapolated total at the workflow's steps is added, labelled ESTIMATE")
    p.add_argument("--queues", default="cold,warm", help="queues per run: cold,warm[,reseed][,again] (default "
                   "%(default)s; reseed = warm's files with only a new noise seed, a user's re-roll; again = warm's "
                   "content under new names with warm's seed, compared with warm)")
    p.add_argument("--save-intermediates", action="store_true", help="save the pose frames, the sampler's latent "
                   "and the decoded frames of every queue (core SaveImage / SaveLatent; their time is in the "
                   "totals); with an again queue, say at which stage warm and again first differ")
    p.add_argument("--cold-steps", type=int, help="sampler steps of the cold queue only (a shorter warm-up: "
                   "loading and compiling; the table says so); the other queues keep theirs")
    p.add_argument("--tiny", action="store_true", help="tiny models, CPU (see above)")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (default: only when no NVIDIA GPU)")
    p.add_argument("--python", help="Python that runs ComfyUI (default: this one)")
    p.add_argument("--server-arg", action="append", metavar="ARG", help="extra ComfyUI argument (repeatable), "
                   "e.g. --server-arg=--highvram")
    p.add_argument("--input", action="append", metavar="NAME=VALUE", help="set the widget input NAME on every node "
                   "that has it (value parsed as JSON when it can be), e.g. --input compile=true "
                   "--input attention=sage; repeatable; recorded in results.json")
    p.add_argument("--model-node", action="append", metavar="CLASS[:NAME=VALUE,...]", help="insert a core MODEL -> "
                   "MODEL node before the sampling section (repeatable, in order), e.g. --model-node "
                   "EasyCache:reuse_threshold=0.2,start_percent=0.15,end_percent=0.95,verbose=false")
    p.add_argument("--force", action="store_true", help="run again the runs results.json has as done")
    p.add_argument("--keep-base", action="store_true", help="keep each run's ComfyUI base directory")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait for one queue")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to start")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.make_files:
        return make_files(args)
    if not (args.models and args.out):
        raise SystemExit("give --make-files DIR, or --models DIR --out OUTDIR to run the benchmark")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
