#!/usr/bin/env python3
"""Queue a shipped SteadyDancer workflow on a ComfyUI server and save the video it makes.

    python tools/run_workflow.py turbo --image person.png --video dance.mp4 --output out.mp4 \
        [--server http://127.0.0.1:8188 | --comfyui /path/to/ComfyUI [--python /path/to/python]] \
        [--turbo-steps N] [--guide-scale X] [--fetch-missing [--models-dir DIR]] [--set NODE_ID.input=value ...]

``turbo`` / ``dance`` name the API twins ``workflows_api/steadydancer-turbo.json`` / ``...-dance.json``; a
path to any API-format prompt works too. The reference image goes into the graph's ``LoadImage`` node and the
driving video into its ``LoadVideo`` node, after both are checked here (the image opened with PIL, the video's
first frame decoded with PyAV or OpenCV) and uploaded through ``/upload/image``. Before queueing, every file
name the graph asks for is checked against the server's ``/object_info`` lists, and the DWPose files against
``GET /models/dwpose``, so a missing model is reported with its folder and download URL (or, with
``--fetch-missing``, downloaded by tools/fetch_models.py) instead of failing mid-run. Progress, and the notes
nodes show on themselves (size / length adjustments, warnings), come from the ``/ws`` websocket; a server
that dies or restarts mid-run is reported as such (exit 3).

Runs with ComfyUI's own Python (it has aiohttp, which the client uses; PIL / PyAV for the local checks).
The pieces: tools/comfy_client.py (HTTP + websocket), tools/comfy_server.py (--comfyui), tools/prechecks.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import urllib.parse
from collections import Counter

TOOLS = pathlib.Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:              # the sibling modules, also when this file is loaded by path
    sys.path.insert(0, str(TOOLS))

from comfy_client import (ComfyClient, PromptRejected, RunError, ServerLost, ServerUnreachable,  # noqa: E402,F401
                          free_port, output_files, progress_printer, progress_text, wait_for_prompt)
from comfy_server import ComfyServer, comfy_python  # noqa: E402,F401
from prechecks import (MODEL_EXTS, VIDEO_EXTS, WORKFLOW_DIR, check_image, check_inputs,  # noqa: E402,F401
                       check_video, describe_missing, find_inputs, known_models, models_from_ui_workflow,
                       reachable)

PACK_ROOT = TOOLS.parent
API_DIR = PACK_ROOT / "workflows_api"
EXIT_CODES = """exit codes:
  0    the video was saved
  1    the run failed on the server (the failing node and its message are printed)
  2    bad usage or input (unknown workflow, UI-format JSON, --image not an image, --video not a video,
       a bad TURBO_STEPS / STEADYDANCER_GUIDE_SCALE value ...)
  3    server unreachable, --comfyui could not start one (with a --cpu hint when the log shows no GPU),
       or the server died / restarted while our prompt was queued or running
  4    a model file is missing on the server (file, folder and download URL printed), or
       --fetch-missing could not download it
  5    the server rejected the prompt (validation errors per node printed)
  130  cancelled with Ctrl-C (our prompt is interrupted, or removed from the queue)

environment (defaults that the flags override; --set overrides both):
  TURBO_STEPS=4..8            steps of the turbo sampler (--turbo-steps)
  STEADYDANCER_GUIDE_SCALE=X  text guidance of the official sampler (--guide-scale)
  TURBO_GUIDE_SCALE           reported as ignored unless 1: the distilled few-step path runs without CFG
  COMFYUI_PYTHON              with --comfyui: the Python that runs ComfyUI"""

# the nodes the toggles set: the one-node samplers, or the SamplerCustomAdvanced pieces the shipped workflows use
TURBO_SAMPLER = ("SteadyDancerTurboSampler", "SteadyDancerTurboSigmas")
OFFICIAL_SAMPLER = ("SteadyDancerSampler", "SteadyDancerGuider")
TURBO_ENV_STEPS = (4, 8)           # the toggle's range (the original start-up scripts' 4..8); the node takes 1-8


# ------------------------------------------------------------------------------------------------ the graph
def shipped_workflows():
    """{short name: file stem} of the shipped API twins ``workflows_api/steadydancer-<short>.json``, turbo first."""
    names = {p.stem[len("steadydancer-"):]: p.stem for p in API_DIR.glob("steadydancer-*.json")}
    order = {"turbo": 0, "dance": 1}
    return dict(sorted(names.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


def _names(sep=", ", quote="'"):
    return sep.join(f"{quote}{n}{quote}" for n in shipped_workflows()) or f"{quote}turbo{quote}"


def resolve_workflow(name):
    """(API prompt path, UI workflow path or None) for a shipped workflow's short name ('turbo', 'dance' ...)
    or a file path.

    The shipped API twins live in ``workflows_api/<name>.json`` next to the UI files in
    ``example_workflows/<name>.json`` (kept apart so ComfyUI's template browser lists only the UI files).
    """
    short = shipped_workflows().get(name)
    p = pathlib.Path(name)
    if short is None and p.is_file():
        ui = WORKFLOW_DIR / p.name
        return p, (ui if ui.is_file() and ui.resolve() != p.resolve() else None)
    short = short or name
    for cand in (API_DIR / f"{short}.json", WORKFLOW_DIR / f"{short}_api.json"):
        if cand.is_file():
            ui = WORKFLOW_DIR / f"{short}.json"
            return cand, (ui if ui.is_file() else None)
    raise RunError(f"no workflow {name!r}: give {_names()} or a path to an API-format JSON "
                   f"(looked in {API_DIR})", 2)


def load_prompt(path):
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable workflow JSON ({e})", 2)
    if "nodes" in data and "links" in data:
        twin = API_DIR / path.name
        short = {stem: n for n, stem in shipped_workflows().items()}.get(path.stem)
        if twin.is_file():
            use = (f"`{short}` (or {twin})" if short else str(twin))
        else:
            use = (f"{_names(' / ', '`')} for the shipped workflows (their API twins are "
                   f"{API_DIR}/<same name>.json), or export yours with Workflow > Export (API) in ComfyUI")
        raise RunError(f"{path} is a UI-format workflow; this command needs an API-format prompt: use {use}", 2)
    data = data.get("prompt", data)
    return data


def apply_overrides(prompt, sets):
    for s in sets or []:
        try:
            target, value = s.split("=", 1)
            nid, inp = target.split(".", 1)
        except ValueError:
            raise RunError(f"--set {s!r}: use NODE_ID.input=value", 2)
        if nid not in prompt:
            raise RunError(f"--set {s!r}: the workflow has no node {nid}", 2)
        try:
            prompt[nid]["inputs"][inp] = json.loads(value)
        except json.JSONDecodeError:
            prompt[nid]["inputs"][inp] = value


def set_media_inputs(prompt, image_name=None, video_name=None):
    images = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"]
    videos = [nid for nid, n in prompt.items() if n["class_type"] == "LoadVideo"]
    if image_name is not None:
        if len(images) != 1:
            raise RunError(f"the workflow has {len(images)} LoadImage nodes; use --set NODE.image=NAME", 2)
        prompt[images[0]]["inputs"]["image"] = image_name
    if video_name is not None:
        if len(videos) != 1:
            raise RunError(f"the workflow has {len(videos)} LoadVideo nodes; use --set NODE.file=NAME", 2)
        prompt[videos[0]]["inputs"]["file"] = video_name


def randomize_seeds(prompt, seed):
    for n in prompt.values():
        for k in ("seed", "noise_seed"):
            if k in n["inputs"] and not isinstance(n["inputs"][k], list):
                n["inputs"][k] = seed


def _env_number(env, name, kind):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw.strip())
    except ValueError:
        raise RunError(f"{name}={raw!r}: not a {'whole number' if kind is int else 'number'}", 2) from None
    if not math.isfinite(value):
        raise RunError(f"{name}={raw!r}: not a finite number", 2)
    return value


def inference_settings(args, env=None):
    """{input: (value, where it came from)} for the sampler inputs the flags / environment set, and the notes
    to print. A flag beats its environment variable."""
    env = os.environ if env is None else env
    settings, notes = {}, []
    steps = _env_number(env, "TURBO_STEPS", int)
    if steps is not None and not TURBO_ENV_STEPS[0] <= steps <= TURBO_ENV_STEPS[1]:
        raise RunError(f"TURBO_STEPS={steps}: the turbo sampler's toggle takes {TURBO_ENV_STEPS[0]} to "
                       f"{TURBO_ENV_STEPS[1]} steps (use --turbo-steps for 1-3)", 2)
    if args.turbo_steps is not None:
        if not 1 <= args.turbo_steps <= 8:
            raise RunError(f"--turbo-steps {args.turbo_steps}: the turbo sampler takes 1 to 8 steps", 2)
        settings["turbo_steps"] = (args.turbo_steps, "--turbo-steps")
    elif steps is not None:
        settings["turbo_steps"] = (steps, "TURBO_STEPS")
    scale = _env_number(env, "STEADYDANCER_GUIDE_SCALE", float)
    if args.guide_scale is not None:
        if not math.isfinite(args.guide_scale):
            raise RunError(f"--guide-scale {args.guide_scale}: not a finite number", 2)
        settings["text_guidance"] = (args.guide_scale, "--guide-scale")
    elif scale is not None:
        settings["text_guidance"] = (scale, "STEADYDANCER_GUIDE_SCALE")
    turbo_scale = env.get("TURBO_GUIDE_SCALE")
    if turbo_scale is not None and turbo_scale.strip() != "":
        try:
            is_one = float(turbo_scale) == 1.0
        except ValueError:
            is_one = False
        if not is_one:
            notes.append(f"TURBO_GUIDE_SCALE={turbo_scale} is ignored: the turbo sampler runs the distilled few-step "
                         f"path without CFG (one model pass per step; the step-distill LoRA has the guidance baked "
                         f"in), so it has no guidance scale. Unset it or set it to 1 to silence this note.")
    return settings, notes


def apply_inference_settings(prompt, settings):
    """Set the sampler inputs; returns the notes to print. A flag with no node to act on is an error (exit 2);
    an environment default with none is a note."""
    notes = []
    targets = {"turbo_steps": (TURBO_SAMPLER, "steps", "the turbo sampler's steps"),
               "text_guidance": (OFFICIAL_SAMPLER, "text_guidance", "the official sampler's text guidance")}
    for key, (value, source) in settings.items():
        class_type, inp, what = targets[key]
        ids = [nid for nid, n in prompt.items() if n.get("class_type") in class_type]
        if not ids:
            why = (f"the workflow has no {' or '.join(class_type)} node"
                   + (" (the turbo sampler runs without CFG: there is no text guidance to set)"
                      if key == "text_guidance" and any(n.get("class_type") in TURBO_SAMPLER for n in prompt.values())
                      else ""))
            if source.startswith("--"):
                raise RunError(f"{source} sets {what}, but {why}", 2)
            notes.append(f"{source}={value} is not used: {why}")
            continue
        for nid in ids:
            prompt[nid]["inputs"][inp] = value
        notes.append(f"{what}: {value} (from {source}, node {', '.join(ids)})")
    return notes


# ---------------------------------------------------------------------------------------- --fetch-missing
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def models_root(folder_paths):
    """The models/ folder from GET /internal/folder_paths (each kind's first path is models/<kind>)."""
    parents = Counter(pathlib.Path(paths[0]).parent for kind, paths in (folder_paths or {}).items()
                      if isinstance(paths, list) and paths and pathlib.Path(paths[0]).name == kind)
    return parents.most_common(1)[0][0] if parents else None


def find_models_dir(args, client, server):
    """Where --fetch-missing writes: --models-dir, the started server's models/, or the models/ folder a server
    on this machine reports; for a remote server, an error that says why."""
    if args.models_dir:
        d = pathlib.Path(args.models_dir).expanduser()
        if not d.is_dir():
            raise RunError(f"--models-dir {d}: no such folder", 2)
        return d
    if server is not None:
        return server.models_dir
    host = urllib.parse.urlparse(client.base).hostname
    advice = ("pass --models-dir PATH (that server's models folder as this machine sees it, e.g. a mounted "
              "volume), or run `python tools/fetch_models.py` on the server itself")
    if host not in LOCAL_HOSTS:
        raise RunError(f"--fetch-missing: the server {client.base} is not on this machine, so this command cannot "
                       f"know where its models folder is: {advice}", 2)
    root = models_root(client.folder_paths())
    if root is None:
        raise RunError(f"--fetch-missing: the server {client.base} did not say where its models folder is "
                       f"(GET /internal/folder_paths): {advice}", 2)
    if not root.is_dir():
        raise RunError(f"--fetch-missing: the server's models folder {root} is not on this machine (a container "
                       f"or another user's view?): {advice}", 2)
    return root


def fetch_missing_models(missing, models_dir, out):
    """Download the missing files that have a known folder and URL through tools/fetch_models.py; returns the
    paths written. FetchError -> exit 4."""
    wanted = [{"name": m["name"], "directory": m["directory"], "url": m["url"]}
              for m in missing if m["url"] and m["directory"]]
    if not wanted:
        return []
    try:
        import fetch_models
    except ImportError as e:
        raise RunError(f"--fetch-missing needs tools/fetch_models.py next to this command ({e})", 2) from None
    print(f"fetching {len(wanted)} missing model(s) (a file or a sharded folder each) into {models_dir}:", file=out, flush=True)
    for m in wanted:
        print(f"  {m['directory']}/{m['name']}  <- {m['url']}", file=out, flush=True)
    try:
        written = fetch_models.fetch_missing(wanted, pathlib.Path(models_dir), token=None, dry_run=False)
    except fetch_models.FetchError as e:
        raise RunError(f"--fetch-missing: {e}", 4) from None
    for p in written or []:
        print(f"  fetched {p}", file=out, flush=True)
    return list(written or [])


# ------------------------------------------------------------------------------------------------ the command
def precheck(client, prompt, ui_path):
    """(problems, missing entries) of the prompt against the server (see prechecks.find_inputs)."""
    hints = known_models()
    hints.update(models_from_ui_workflow(ui_path) if ui_path else {})
    listed = {}
    return find_inputs(
        prompt, client.object_info(), hints,
        lambda folder: listed[folder] if folder in listed else listed.setdefault(folder, client.model_files(folder)))


def missing_error(missing, fetched=None, models_dir=None):
    """RunError (exit 4) listing the missing files; after --fetch-missing (``fetched`` = the paths written), why
    they are still missing."""
    text = "missing model file(s) on the server:\n" + "\n".join(describe_missing(m) for m in missing)
    if fetched is None:
        text += ("\nPut the files in those folders (or list them in extra_model_paths.yaml) and try again; "
                 "ComfyUI re-reads the folders on every request. --fetch-missing downloads the ones with a URL.")
        return RunError(text, code=4)
    unknown = [m["name"] for m in missing if not (m["url"] and m["directory"])]
    if unknown:
        text += (f"\n--fetch-missing cannot download {', '.join(map(repr, unknown))}: no known download URL or "
                 f"folder (the pack knows the files its workflows list); get them by hand.")
    if len(unknown) < len(missing):
        text += (f"\n--fetch-missing wrote {len(fetched)} file(s) into {models_dir}, but the server still does not "
                 f"list them: is that the models folder this server reads?")
    return RunError(text, code=4)


def run(args, out=None):
    out = out or sys.stderr
    prompt_path, ui_path = resolve_workflow(args.workflow)
    prompt = load_prompt(prompt_path)
    for label, f in (("--image", args.image), ("--video", args.video)):
        if f and not pathlib.Path(f).is_file():
            raise RunError(f"{label} {f}: no such file", 2)
    if args.image:
        check_image(args.image)
    if args.video:
        check_video(args.video)
    settings, notes = inference_settings(args)
    for n in notes:
        print(f"note: {n}", file=out, flush=True)
    for n in apply_inference_settings(prompt, settings):
        print(n, file=out, flush=True)

    server, keep_log, log_path = None, False, None
    if args.comfyui:
        log_path = args.server_log or os.path.join(tempfile.gettempdir(), f"comfyui-run-{os.getpid()}.log")
        server = ComfyServer(args.comfyui, port=args.port, base_directory=args.base_directory,
                             python=args.python, cpu=args.cpu, log_path=log_path)
        print(f"starting ComfyUI from {server.comfyui_path} on {server.url} ...", file=out, flush=True)
        server.start()          # a start-up failure keeps the temporary log: the message names it
        url = server.url
    else:
        url = args.server
    client = None
    try:
        client = ComfyClient(url, timeout=args.http_timeout)
        if not client.alive():
            raise ServerUnreachable(url, "no answer on /system_stats")
        image_name = client.upload(args.image) if args.image else None
        video_name = client.upload(args.video) if args.video else None
        set_media_inputs(prompt, image_name, video_name)
        apply_overrides(prompt, args.set)
        if args.seed is not None:
            randomize_seeds(prompt, args.seed)

        problems, missing = precheck(client, prompt, ui_path)
        if missing and args.fetch_missing:
            models_dir = find_models_dir(args, client, server)
            fetched = fetch_missing_models(missing, models_dir, out)
            problems, missing = precheck(client, prompt, ui_path)
            if missing:
                raise missing_error(missing, fetched, models_dir)
        if missing:
            raise missing_error(missing)
        if problems:
            raise RunError("the workflow does not fit this server:\n" + "\n".join(problems), code=2)

        ws = client.websocket()
        prompt_id = None
        try:
            prompt_id = client.queue(prompt)
            print(f"queued {prompt_path.name} as {prompt_id}", file=out, flush=True)
            t0 = time.monotonic()
            hist = wait_for_prompt(client, ws, prompt_id, on_event=progress_printer(prompt, out),
                                   timeout=args.timeout, grace=args.server_grace)
        except KeyboardInterrupt:
            done = "no prompt was queued"
            if prompt_id:
                try:
                    done = f"prompt {prompt_id}: " + client.cancel(prompt_id)
                except (RunError, OSError, ValueError, KeyboardInterrupt) as e:
                    done = f"prompt {prompt_id}: could not cancel it ({e}); POST /interrupt to stop it"
            raise RunError(f"cancelled ({done})", 130) from None
        finally:
            ws.close()
        files = output_files(hist)
        videos = [f for f in files if pathlib.Path(f["filename"]).suffix.lower() in VIDEO_EXTS]
        if not videos:
            raise RunError(f"the run finished but produced no video (outputs: {files})")
        f = videos[-1]
        data = client.view(f["filename"], f.get("subfolder", ""), f.get("type", "output"))
        dest = pathlib.Path(args.output)
        if dest.is_dir():
            dest = dest / f["filename"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        print(f"done in {time.monotonic() - t0:.1f} s: {dest}", file=out, flush=True)
        return dest
    except RunError as e:
        if server and isinstance(e, (ServerLost, ServerUnreachable)):
            time.sleep(0.2)                                   # let a dying process be reaped
            how = server.exit_note()
            if how:
                e.args = (f"{e}\n  {how}",)
        if server and (e.code == 1 or isinstance(e, (ServerLost, ServerUnreachable))) and not args.server_log:
            keep_log = True                                   # a node failed / the server died: see its log
            e.args = (f"{e}\n  server log: {log_path}",)
        raise
    finally:
        if client is not None:
            client.close()
        if server:
            server.stop()
            if not args.server_log and not keep_log:
                pathlib.Path(log_path).unlink(missing_ok=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help=f"{_names()} (workflows_api/steadydancer-<name>.json), or a path to an "
                                    f"API-format workflow JSON")
    p.add_argument("--image", help="reference image (the person to animate)")
    p.add_argument("--video", help="driving dance video")
    p.add_argument("--output", "-o", default="steadydancer.mp4", help="where to save the video (file or folder)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--server", default="http://127.0.0.1:8188", help="URL of a running ComfyUI (default %(default)s)")
    g.add_argument("--comfyui", help="path to a ComfyUI checkout: start a server from it for this run")
    p.add_argument("--python", help="with --comfyui: the Python that runs ComfyUI (default: COMFYUI_PYTHON, "
                                    "ComfyUI/venv, ComfyUI/../venv, or this Python)")
    p.add_argument("--base-directory", help="with --comfyui: ComfyUI --base-directory (models/, custom_nodes/ ...)")
    p.add_argument("--port", type=int, help="with --comfyui: port (default: a free one)")
    p.add_argument("--cpu", action="store_true", help="with --comfyui: run ComfyUI with --cpu (needed without an NVIDIA GPU / driver)")
    p.add_argument("--server-log", help="with --comfyui: write the server log here")
    p.add_argument("--turbo-steps", type=int, metavar="N",
                   help="steps of the turbo sampler, 1-8 (default: TURBO_STEPS, else the workflow's)")
    p.add_argument("--guide-scale", type=float, metavar="X",
                   help="text guidance (CFG) of the official sampler (default: STEADYDANCER_GUIDE_SCALE, else the "
                        "workflow's); the turbo sampler has none")
    p.add_argument("--fetch-missing", action="store_true",
                   help="download the model files the pre-check finds missing (tools/fetch_models.py), then queue")
    p.add_argument("--models-dir", help="with --fetch-missing: the server's models folder (needed for a remote "
                                        "--server; default: asked of a server on this machine)")
    p.add_argument("--set", action="append", metavar="NODE.input=value",
                   help="override an input (value parsed as JSON when possible); repeatable")
    p.add_argument("--seed", type=int, help="set every seed input of the graph")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the run")
    p.add_argument("--http-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    # how long a server that dropped the websocket mid-run may take to answer again before it counts as gone
    p.add_argument("--server-grace", type=float, default=15.0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("cancelled (nothing was queued)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
