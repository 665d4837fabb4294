#!/usr/bin/env python3
"""Download the SteadyDancer model files into a ComfyUI ``models/`` folder, safely and resumably.

    python tools/fetch_models.py --comfyui /workspace/ComfyUI --all                 # the turbo workflow's set
    python tools/fetch_models.py --comfyui ~/ComfyUI --variant gguf:Q4_K_M --encoders --dwpose --dry-run
    ENABLE_STEADYDANCER=true STEADYDANCER_VARIANT=fp8 ENABLE_TURBO=true ENABLE_DWPOSE=true \
        python tools/fetch_models.py --comfyui /workspace/ComfyUI                  # a container start script

Every file goes through the same steps: its size and sha256 (the hub's LFS etag; git's blob sha1 for small
non-LFS files) come from the hub first; a file already in place with that size and hash is skipped; the
bytes go to a hidden ``.<name>.<hash>.part`` file beside the target (no ComfyUI loader lists ``.part``
files), which a later run resumes with an HTTP range request; only when the whole file matches the hub's
size and hash is it renamed to its final name (an atomic rename on the same disk). So a cut connection, a
full disk or Ctrl-C never leaves a half-written file where a loader would pick it up. The free disk space
is checked for the whole set before the first byte is fetched.

All hub traffic goes through ``huggingface_hub`` (``get_hf_file_metadata``, ``HfApi.list_repo_tree``,
``file_download.http_get`` with its progress bars and retries): ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_PROGRESS_BARS`` and, on huggingface_hub < 1.0, ``HF_HUB_ENABLE_HF_TRANSFER``
work as usual. Importable: :func:`fetch_missing` is what ``run_workflow.py --fetch-missing`` calls.

Exit codes: 0 done (or nothing to do), 1 a download failed (message printed), 2 bad usage, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import time

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
STATE_FILE = ".steadydancer-fetch.json"   # under models/: files already verified (size, mtime, sha256)
DISK_MARGIN = 256 * 2**20                 # keep this much free beyond the downloads
RETRIES = 5                               # resumes of one file after a dropped connection


def _load_table():
    """tools/model_files.py (the file table), loaded by path so this works as a script and as an import."""
    name = "_steadydancer_model_files"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name("model_files.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod         # its dataclasses look the module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


_t = _load_table()
FetchError, NotFound, BadChoice = _t.FetchError, _t.NotFound, _t.BadChoice
HubFile, parse_hf_url = _t.HubFile, _t.parse_hf_url
HUB, FOLDERS, DIT_FP8, TURBO_LORA, ENCODERS = _t.HUB, _t.FOLDERS, _t.DIT_FP8, _t.TURBO_LORA, _t.ENCODERS
dwpose_files, known_files = _t.dwpose_files, _t.known_files
FP16_REPO, FP16_FOLDER, FP16_KNOWN = _t.FP16_REPO, _t.FP16_FOLDER, _t.FP16_KNOWN
GGUF_REPO, GGUF_DEFAULT_QUANT, VARIANTS, QUANT_RE = _t.GGUF_REPO, _t.GGUF_DEFAULT_QUANT, _t.VARIANTS, _t.QUANT_RE
DIT_OFFICIAL, known_folders = _t.DIT_OFFICIAL, _t.known_folders

# ------------------------------------------------------------------------------------------------ jobs
@dataclasses.dataclass
class Job:
    repo: str
    revision: str
    path: str                 # in the repository
    directory: str            # ComfyUI models/ subfolder
    name: str                 # file name under that folder (may contain a sub-folder)
    size: int | None = None   # from the hub
    etag: str | None = None   # sha256 (LFS) or git blob sha1
    url: str | None = None    # where the bytes come from (after the hub's redirect)
    status: str = ""          # "present" | "replace" | "resume" | "download"
    partial_bytes: int = 0

    def target(self, models_dir):
        return pathlib.Path(models_dir) / self.directory / self.name

    def partial(self, models_dir):
        t = self.target(models_dir)
        return t.with_name(f".{t.name}.{(self.etag or 'unknown')[:16]}.part")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise FetchError("huggingface_hub is not installed: <python> -m pip install 'huggingface_hub>=0.34'") from None
    return huggingface_hub


def _endpoint():
    return (os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")


def _token_in_use(token):
    if token:
        return True
    try:
        return bool(_hub().get_token())
    except Exception:  # noqa: BLE001 - only for the wording of an error message
        return bool(os.environ.get("HF_TOKEN"))


def explain(e, what, token=None):
    """A FetchError for an exception raised by huggingface_hub (or the network / the disk)."""
    if isinstance(e, FetchError):
        return e
    from huggingface_hub import utils as hu
    page = f"{HUB}/{what.split(':')[0]}" if "/" in what else HUB
    status = getattr(getattr(e, "response", None), "status_code", None)
    have_token = _token_in_use(token)
    if isinstance(e, hu.GatedRepoError) or status == 403 or (status == 401 and have_token):
        if have_token:
            return FetchError(f"{what}: access refused ({status}). Accept the model's terms at {page} with the "
                              f"account of your token, or check the token (HF_TOKEN) has read access.")
        return FetchError(f"{what}: the hub needs a token ({status or 'gated or private repository'}). Accept the "
                          f"terms at {page}, create a read token at {HUB}/settings/tokens and set HF_TOKEN=hf_... "
                          f"(or pass --token).")
    if isinstance(e, hu.RepositoryNotFoundError) or status == 401:
        return FetchError(f"{what}: repository not found ({status}), or private and no valid token was sent "
                          f"(set HF_TOKEN).")
    if isinstance(e, hu.RevisionNotFoundError):
        return FetchError(f"{what}: the revision does not exist on the hub.")
    if isinstance(e, hu.EntryNotFoundError) or status == 404:
        return NotFound(f"{what}: not found on the hub (404); the file may have been renamed or removed "
                          f"(see {page}).")
    if isinstance(e, hu.OfflineModeIsEnabled):
        return FetchError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it and run again.")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(f"{what}: the disk is full ({e}). Free some space and run again: the part already "
                          f"downloaded is kept and resumed.")
    if _is_network(e):
        return FetchError(f"{what}: cannot reach {_endpoint()} ({type(e).__name__}: {e}). Are you offline? Run again "
                          f"when the network is back: finished files are kept and the current one resumes.")
    if status:
        return FetchError(f"{what}: the hub answered HTTP {status} ({e}).")
    return FetchError(f"{what}: {type(e).__name__}: {e}")


def _is_network(e):
    """A connection / timeout / broken-stream error of requests (huggingface_hub < 1) or httpx (>= 1)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return (type(e).__module__.split(".")[0] in ("requests", "httpx", "httpx2", "urllib3", "httpcore")
            and getattr(getattr(e, "response", None), "status_code", None) is None)


def list_folder(repo, folder="", revision="main", token=None, recursive=False):
    """[(path, size)] of the files in a repository folder (the hub's tree listing)."""
    hub = _hub()
    try:
        entries = hub.HfApi(endpoint=_endpoint(), token=token).list_repo_tree(
            repo, path_in_repo=folder or None, recursive=recursive, revision=revision)
        return [(e.path, e.size) for e in entries if hasattr(e, "size") and not hasattr(e, "tree_id")]
    except Exception as e:  # noqa: BLE001 - translated for the user
        raise explain(e, f"{repo}:{folder or '/'}", token) from None


def _gib(n):
    return "?" if n is None else (f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB")


def resolve_variant(variant, token=None, revision="main"):
    """The DiT job(s) for ``fp8`` | ``fp16`` | ``bf16`` | ``gguf[:QUANT or file name]``."""
    kind, _, arg = (variant or "fp8").partition(":")
    kind = kind.strip().lower()
    if kind not in VARIANTS or (arg and kind != "gguf"):
        raise BadChoice(f"unknown variant {variant!r}: use fp8, fp16, bf16, gguf or gguf:QUANT (e.g. gguf:Q4_K_M)")
    if kind == "fp8":
        return [job_for(DIT_FP8)]
    if kind == "fp16":
        files = [p for p, _ in list_folder(FP16_REPO, FP16_FOLDER, revision, token)
                 if p.lower().endswith("fp16.safetensors")]
        if not files:
            raise FetchError(f"no *fp16.safetensors file in {HUB}/{FP16_REPO}/tree/{revision}/{FP16_FOLDER} any more")
        files.sort(key=lambda p: (p.rsplit("/", 1)[-1] != FP16_KNOWN, p))
        return [Job(FP16_REPO, revision, files[0], "diffusion_models", files[0].rsplit("/", 1)[-1])]
    if kind == "bf16":
        return folder_jobs(DIT_OFFICIAL, token, revision)
    files = [(p, s) for p, s in list_folder(GGUF_REPO, "", revision, token, recursive=True)
             if p.lower().endswith(".gguf")]
    want = (arg or GGUF_DEFAULT_QUANT).strip()
    by_quant = {}
    for p, s in files:
        m = QUANT_RE.search(p.rsplit("/", 1)[-1])
        if m:
            by_quant.setdefault(m.group(1).upper(), []).append((p, s))
    exact = [(p, s) for p, s in files if p.rsplit("/", 1)[-1] == want]
    chosen = exact or by_quant.get(want.upper(), [])
    if not chosen:
        avail = ", ".join(f"{q} ({_gib(max(s or 0 for _, s in v))})" for q, v in sorted(by_quant.items())) or "none"
        raise BadChoice(f"no {want} GGUF file in {HUB}/{GGUF_REPO}. Available quants: {avail}. "
                         f"Use --variant gguf:QUANT, or gguf:<exact file name>.")
    chosen.sort(key=lambda ps: ps[0])
    if len(chosen) > 1:
        print(f"note: several {want} files in {GGUF_REPO}: {', '.join(p for p, _ in chosen)}; taking "
              f"{chosen[-1][0]} (pass gguf:<file name> for another)", flush=True)
    p = chosen[-1][0]
    return [Job(GGUF_REPO, revision, p, "diffusion_models", p.rsplit("/", 1)[-1])]


def folder_jobs(folder, token=None, revision=None):
    """Jobs for a sharded checkpoint folder (model_files.HubFolder): config.json, the shards, then the index last,
    so an unfinished fetch never leaves an index next to missing shards (the Model Loader lists a folder as a
    model once it holds an index)."""
    revision = revision or folder.revision
    files = [p for p, _ in list_folder(folder.repo, "", revision, token)
             if p == "config.json" or re.fullmatch(r"diffusion_pytorch_model.*\.safetensors(\.index\.json)?", p)]
    if not any(p.endswith(".index.json") for p in files):
        raise FetchError(f"{HUB}/{folder.repo} no longer has diffusion_pytorch_model*.safetensors shards")
    files.sort(key=lambda p: (p.endswith(".index.json"), p))
    return [Job(folder.repo, revision, p, folder.directory, f"{folder.name}/{p}") for p in files]


def job_for(f: HubFile):
    return Job(f.repo, f.revision, f.path, f.directory, f.name)


def jobs_from_entries(missing):
    """Jobs for ``[{"name", "directory", "url"}]`` entries (the workflows' properties.models form; an entry naming
    a sharded folder of the table, e.g. ``SteadyDancer-14B`` in ``diffusion_models``, gets all its files)."""
    jobs = []
    folders = {(f.directory, f.name): f for f in known_folders()}
    for m in missing:
        try:
            name, directory, url = m["name"], m["directory"], m["url"]
        except (KeyError, TypeError):
            raise FetchError(f"a model entry needs name, directory and url: {m!r}") from None
        if (directory, name) in folders and url == folders[directory, name].url:
            jobs += folder_jobs(folders[directory, name])
            continue
        if not name or "/" in directory or ".." in pathlib.PurePath(name).parts or os.path.isabs(name):
            raise FetchError(f"refusing an unsafe target {directory!r}/{name!r}")
        repo, revision, path = parse_hf_url(url)
        jobs.append(Job(repo, revision, path, directory, name))
    return jobs


# --------------------------------------------------------------------------------------------- planning
def _load_state(models_dir):
    try:
        return json.loads((pathlib.Path(models_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_state(models_dir, state):
    if state == _load_state(models_dir):
        return
    p = pathlib.Path(models_dir) / STATE_FILE
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, p)
    except OSError:
        pass  # only a cache of hashes already checked


def file_digest(path, etag, label=None):
    """sha256 of the file (LFS etag), or git's blob sha1 when the etag is 40 hex digits (small non-LFS files)."""
    from huggingface_hub.utils import tqdm
    size = os.path.getsize(path)
    if size >= 64 * 2**20 and not sys.stderr.isatty():
        print(f"  checking the sha256 of {label or path} ({_gib(size)})", file=sys.stderr, flush=True)
    h = hashlib.sha1(b"blob %d\0" % size) if etag and len(etag) == 40 else hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {label or path}",
                                     disable=size < 64 * 2**20, leave=False) as bar:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _is_verified(job, models_dir, state):
    t = job.target(models_dir)
    try:
        st = t.stat()
    except OSError:
        return False
    if job.size is not None and st.st_size != job.size:
        return False
    rec = state.get(str(t))
    if rec and rec.get("etag") == job.etag and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return True
    if not job.etag or file_digest(t, job.etag, job.name) != job.etag:
        return False
    state[str(t)] = {"etag": job.etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return True


def plan(jobs, models_dir, token=None):
    """Ask the hub for each file's size and hash (HEAD, like hf_hub_download) and decide what to do with it."""
    hub = _hub()
    state = _load_state(models_dir)
    for job in jobs:
        what = f"{job.repo}:{job.path}"
        url = hub.hf_hub_url(job.repo, job.path, revision=job.revision, endpoint=_endpoint())
        try:
            meta = hub.get_hf_file_metadata(url, token=token)
        except Exception as e:  # noqa: BLE001 - translated for the user
            err = explain(e, what, token)
            if isinstance(err, NotFound):
                folder = job.path.rsplit("/", 1)[0] if "/" in job.path else ""
                try:
                    there = [p.rsplit("/", 1)[-1] for p, _ in list_folder(job.repo, folder, job.revision, token)]
                    err = FetchError(f"{err} Files in {job.repo}/{folder or ''}: {', '.join(there[:30]) or 'none'}")
                except FetchError:
                    pass
            raise err from None
        job.size, job.etag, job.url = meta.size, meta.etag, meta.location or url
        if not job.etag:
            raise FetchError(f"{what}: the hub sent no checksum (etag) for this file; refusing to download blind")
        part = job.partial(models_dir)
        job.partial_bytes = part.stat().st_size if part.is_file() else 0
        if _is_verified(job, models_dir, state):
            job.status = "present"
        elif job.target(models_dir).exists():
            job.status = "replace"
        else:
            job.status = "resume" if job.partial_bytes else "download"
    _save_state(models_dir, state)
    return jobs


def _anchor(path):
    path = pathlib.Path(path)
    while not path.exists():
        path = path.parent
    return path


def disk_needs(jobs, models_dir):
    """{existing folder on each disk: (bytes still to fetch, bytes free)} for the jobs not yet present."""
    per_dev = {}
    for job in jobs:
        if job.status == "present":
            continue
        anchor = _anchor(job.target(models_dir).parent)
        dev = os.stat(anchor).st_dev
        need = max((job.size or 0) - min(job.partial_bytes, job.size or 0), 0)
        a, n = per_dev.get(dev, (anchor, 0))
        per_dev[dev] = (a, n + need)
    return {str(a): (n, shutil.disk_usage(a).free) for a, n in per_dev.values()}


def check_disk(jobs, models_dir):
    for folder, (need, free) in disk_needs(jobs, models_dir).items():
        if need + DISK_MARGIN > free:
            raise FetchError(f"not enough disk space on {folder}: the downloads need {_gib(need)} (+{_gib(DISK_MARGIN)} "
                             f"margin), {_gib(free)} is free. Free some space, or pick a smaller variant "
                             f"(--variant gguf:Q4_K_M).")


def describe(jobs, models_dir, out=None):
    """The dry-run table: file, size, target folder, what would happen; then the free space per disk."""
    out = out or sys.stdout
    print(f"models folder: {models_dir}", file=out)
    for job in jobs:
        what = {"present": "present, checked", "replace": "present but differs: re-download",
                "resume": f"resume ({_gib(job.partial_bytes)} already here)", "download": "download"}[job.status]
        print(f"  {job.name:<66} {_gib(job.size):>10}  {job.directory + '/':<18} {what}", file=out)
    total = sum(j.size or 0 for j in jobs if j.status != "present")
    print(f"to download: {_gib(total)}", file=out)
    for folder, (need, free) in disk_needs(jobs, models_dir).items():
        print(f"  disk of {folder}: {_gib(free)} free, {_gib(need)} needed"
              + ("" if need + DISK_MARGIN <= free else "  <- NOT ENOUGH"), file=out)


# ------------------------------------------------------------------------------------------------ download
class _LogProgress:
    """Progress as log lines (every 10%) for a start script's log, where tqdm's bars stay hidden (no terminal).
    Wraps the .part file object; everything else goes to the file."""

    def __init__(self, f, have, total, name):
        self._f, self._done, self._total, self._name = f, have, total, name
        self._next = (have * 10 // total + 1) if total else 11

    def write(self, chunk):
        n = self._f.write(chunk)
        self._done += len(chunk)
        if self._total and self._done * 10 // self._total >= self._next:
            self._next = self._done * 10 // self._total + 1
            print(f"  {self._name}: {100 * self._done // self._total}% ({_gib(self._done)} of {_gib(self._total)})",
                  file=sys.stderr, flush=True)
        return n

    def __getattr__(self, attr):
        return getattr(self._f, attr)


def _http_get(url, fileobj, resume_size, headers, expected_size, name):
    """huggingface_hub's own streaming download (progress bar, retries that resume with a Range header)."""
    from huggingface_hub.file_download import http_get
    http_get(url, fileobj, resume_size=resume_size, headers=headers, expected_size=expected_size,
             displayed_filename=name)


def download(job, models_dir, state=None, token=None):
    """Fetch one planned job to its .part file, check size and hash, then rename it to the final name."""
    target, part = job.target(models_dir), job.partial(models_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.part"):   # parts of an older version of this file
        if stale != part:
            stale.unlink()
    have = part.stat().st_size if part.is_file() else 0
    if job.size is not None and have > job.size:
        part.unlink()
        have = 0
    what = f"{job.repo}:{job.path}"
    from huggingface_hub.utils import build_hf_headers
    tries = RETRIES
    while job.size is None or have < job.size:
        try:
            with open(part, "ab") as f:
                sink = f if sys.stderr.isatty() else _LogProgress(f, have, job.size, job.name)
                _http_get(job.url, sink, have, build_hf_headers(token=token), job.size, job.name)
                f.flush()
                os.fsync(f.fileno())
            break
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - translated for the user
            now = part.stat().st_size if part.is_file() else 0
            if _is_network(e) and tries > 0:       # the connection dropped: resume from what the .part holds
                print(f"connection lost after {_gib(now)}; resuming", file=sys.stderr, flush=True)
                if now <= have:
                    time.sleep(2)
                have, tries = now, tries - 1
                continue
            if isinstance(e, OSError) and "Consistency check failed" in str(e):
                raise FetchError(f"{what}: the download stopped early ({e}). Run again to resume.") from None
            raise explain(e, what, token) from None
        if job.size is None:
            break
    got = part.stat().st_size
    if job.size is not None and got != job.size:
        raise FetchError(f"{what}: got {got} bytes, the hub says {job.size}. Run again to resume.")
    digest = file_digest(part, job.etag, job.name)
    if digest != job.etag:
        part.unlink()
        raise FetchError(f"{what}: checksum mismatch (got {digest}, the hub says {job.etag}); the corrupt download "
                         f"was deleted and {target.name} was not touched. Run again to fetch it anew.")
    os.replace(part, target)
    st = target.stat()
    if state is not None:
        state[str(target)] = {"etag": job.etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return target


def fetch(jobs, models_dir, token=None, dry_run=False, out=None):
    """Plan, check disk space, download. Returns the written paths (dry run: the paths that would be written)."""
    models_dir, out = pathlib.Path(models_dir), out or sys.stdout
    _transfer_note(out)
    plan(jobs, models_dir, token)
    todo = [j for j in jobs if j.status != "present"]
    if dry_run:
        describe(jobs, models_dir, out)
        return [j.target(models_dir) for j in todo]
    for j in jobs:
        if j.status == "present":
            print(f"ok       {j.directory}/{j.name} (present, size and sha256 match the hub)", file=out, flush=True)
    check_disk(todo, models_dir)
    state = _load_state(models_dir)
    written = []
    try:
        for i, job in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {job.directory}/{job.name} ({_gib(job.size)}"
                  + (f", resuming after {_gib(job.partial_bytes)}" if job.status == "resume" else "")
                  + (", replacing a file that differs from the hub" if job.status == "replace" else "") + ")",
                  file=out, flush=True)
            written.append(download(job, models_dir, state, token))
    finally:
        _save_state(models_dir, state)
    return written


def fetch_missing(missing, models_dir, token=None, dry_run=False):
    """Download ``missing`` (``[{"name", "directory", "url"}]``, as in the workflows' properties.models) into
    ``models_dir/<directory>/<name>``. Returns the written paths. Raises :class:`FetchError` with a message for the
    user; Ctrl-C (KeyboardInterrupt) goes through, leaving only a resumable hidden ``.part`` file."""
    return fetch(jobs_from_entries(missing), models_dir, token=token, dry_run=dry_run)


def _transfer_note(out):
    if not _truthy_env("HF_HUB_ENABLE_HF_TRANSFER"):
        return
    hub = _hub()
    if int(hub.__version__.split(".")[0]) >= 1:
        print(f"note: HF_HUB_ENABLE_HF_TRANSFER is set, but huggingface_hub {hub.__version__} no longer uses "
              f"hf_transfer; downloads use its regular (resumable) HTTP path.", file=out)
    elif importlib.util.find_spec("hf_transfer") is None:
        raise FetchError("HF_HUB_ENABLE_HF_TRANSFER is set but the hf_transfer package is not installed: "
                         "pip install hf_transfer, or unset the variable.")


# ----------------------------------------------------------------------------------------------- command
TRUE, FALSE = {"1", "true", "yes", "on", "y"}, {"0", "false", "no", "off", "n", ""}


def _truthy_env(name, env=None):
    v = (env if env is not None else os.environ).get(name)
    if v is None:
        return None
    s = v.strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise FetchError(f"{name}={v!r}: use true/false (or 1/0)")


def selection(args, env=None):
    """What to fetch, from the flags, then the environment: (variant or None, turbo, dwpose, encoders)."""
    env = os.environ if env is None else env
    steady = _truthy_env("ENABLE_STEADYDANCER", env)
    env_variant = (env.get("STEADYDANCER_VARIANT") or "").strip() or None
    variant = args.variant or env_variant
    # a variant named in the environment asks for the DiT unless ENABLE_STEADYDANCER says false
    want_dit = bool(args.variant or args.all or steady or (steady is None and env_variant))

    def pick(flag, env_name):
        if flag is not None:
            return flag
        return bool(args.all or _truthy_env(env_name, env))
    encoders = args.encoders if args.encoders is not None else bool(args.all or steady)
    return ((variant or "fp8") if want_dit else None, pick(args.turbo, "ENABLE_TURBO"),
            pick(args.dwpose, "ENABLE_DWPOSE"), encoders)


def default_models_dir():
    """The models/ folder of the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>), if any."""
    if PACK_ROOT.parent.name == "custom_nodes" and (PACK_ROOT.parent.parent / "models").is_dir():
        return PACK_ROOT.parent.parent / "models"
    return None


def build_jobs(variant, turbo, dwpose, encoders, token=None):
    jobs = resolve_variant(variant, token) if variant else []
    jobs += [job_for(TURBO_LORA)] if turbo else []
    jobs += [job_for(f) for f in ENCODERS] if encoders else []
    jobs += [job_for(f) for f in dwpose_files()] if dwpose else []
    return jobs


def parser():
    p = argparse.ArgumentParser(
        prog="fetch_models.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download SteadyDancer model files into ComfyUI's models folders (resumable, checksum-checked).",
        epilog="environment (flags win): ENABLE_STEADYDANCER=true (the DiT + encoders), STEADYDANCER_VARIANT, "
               "ENABLE_TURBO, ENABLE_DWPOSE, HF_TOKEN, HF_ENDPOINT, HF_HUB_ENABLE_HF_TRANSFER\n"
               "exit codes: 0 done, 1 a download failed, 2 bad usage, 130 interrupted (run again to resume)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder (files go to PATH/models/<folder>/)")
    where.add_argument("--models-dir", metavar="DIR", help="a models folder (default: the ComfyUI this pack is in)")
    p.add_argument("--variant", metavar="V", help="SteadyDancer DiT: fp8 (16.4 GB, default), fp16, bf16 (the "
                   "official release: 7 fp32 shards, ~65.6 GB, cast to bf16 at load), gguf[:QUANT] (e.g. "
                   "gguf:Q4_K_M, gguf:Q8_0; default Q4_K_M)")
    bo = argparse.BooleanOptionalAction
    p.add_argument("--turbo", action=bo, default=None, help="the lightx2v step-distill LoRA (turbo workflow)")
    p.add_argument("--dwpose", action=bo, default=None, help="DWPose yolox_l.onnx + dw-ll_ucoco_384.onnx")
    p.add_argument("--encoders", action=bo, default=None, help="umt5 text encoder, clip_vision_h, Wan 2.1 VAE")
    p.add_argument("--all", action="store_true", default=None, help="DiT + turbo LoRA + encoders + DWPose")
    p.add_argument("--dry-run", action="store_true", help="list files, sizes, folders and free disk; fetch nothing")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    return p


def main(argv=None, out=None):
    args = parser().parse_args(argv)
    out = out or sys.stdout
    try:
        variant, turbo, dwpose, encoders = selection(args)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.comfyui:
        models_dir = pathlib.Path(args.comfyui).expanduser() / "models"
        if not pathlib.Path(args.comfyui).expanduser().is_dir():
            print(f"error: --comfyui {args.comfyui}: no such folder", file=sys.stderr)
            return 2
    elif args.models_dir:
        models_dir = pathlib.Path(args.models_dir).expanduser()
    else:
        models_dir = default_models_dir()
        if models_dir is None:
            print("error: where is ComfyUI? Pass --comfyui PATH or --models-dir DIR", file=sys.stderr)
            return 2
    if not (variant or turbo or dwpose or encoders):
        print("error: nothing selected. Pass --all, or --variant V / --turbo / --dwpose / --encoders "
              "(or set ENABLE_STEADYDANCER / ENABLE_TURBO / ENABLE_DWPOSE)", file=sys.stderr)
        return 2
    try:
        jobs = build_jobs(variant, turbo, dwpose, encoders, args.token)
        written = fetch(jobs, models_dir, token=args.token, dry_run=args.dry_run, out=out)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, BadChoice) else 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written under a final name; the part already downloaded is kept in a "
              "hidden .part file and the same command resumes it.", file=sys.stderr)
        return 130
    if not args.dry_run:
        print(f"done: {len(written)} file(s) written, {len(jobs) - len(written)} already present.", file=out)
        if variant and variant.startswith("bf16"):
            print(f"note: the official shards (fp32, cast to the loader's compute dtype at load) are in "
                  f"{models_dir}/{DIT_OFFICIAL.directory}/{DIT_OFFICIAL.name}/; pick {DIT_OFFICIAL.name!r} as the "
                  f"Model Loader's model_name (refresh the page after the download).", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
