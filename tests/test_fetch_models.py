"""tools/fetch_models.py: the real huggingface_hub client against a stand-in hub on 127.0.0.1 (tests/_fake_hub.py,
reached through HF_ENDPOINT) serving tiny files under the real repository and file names.

Checked against the hub's own bytes and hashes: full fetch, skip of present files, a connection cut half-way (the
client resumes with a Range request), Ctrl-C then a resumed run, a corrupt download refused, 404 / 401 / 403, a
full disk before and during the download, the variant resolution from the repositories' file lists, and the
environment toggles. Also: the file table agrees with the shipped workflows' properties.models and the README, and
the official sharded folder has one name for the fetcher, the Model Loader's list and the run command's pre-check."""
import errno
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import sys

import pytest

pytest.importorskip("huggingface_hub")
pytest.importorskip("aiohttp")

from _fake_hub import GOOD_TOKEN, FakeHub  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sd_fetch_models", ROOT / "tools" / "fetch_models.py")
fm = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fm          # dataclasses look their module up while the file executes
spec.loader.exec_module(fm)

GGUF_NAMES = ("Wan21_I2V_SteadyDancer_fp16-Q4_K_M_fix_5d_tensor_from_fp8_e4m3fn_scaled_KJ.gguf",
              "Wan21_I2V_SteadyDancer_fp16-Q6_K_fix_5d_tensor_from_fp8_e4m3fn_scaled_KJ.gguf",
              "Wan21_I2V_SteadyDancer_fp16-Q8_0_fix_5d_tensor_from_fp8_e4m3fn_scaled_KJ.gguf")


def _blob(tag, n=300_000):
    """Deterministic bytes, different per file."""
    out, h = bytearray(), hashlib.sha256(tag.encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h
    return bytes(out[:n])


def _repos():
    repos = {}
    for f in fm.known_files():
        repos.setdefault(f.repo, {})[f.path] = _blob(f.path)
    repos["Kijai/WanVideo_comfy"]["SteadyDancer/Wan21_I2V_SteadyDancer_fp16.safetensors"] = _blob("fp16")
    repos["Kijai/WanVideo_comfy"]["SteadyDancer/README.md"] = b"# notes\n"
    repos["MCG-NJU/SteadyDancer-GGUF"] = {n: _blob(n, 50_000 + 1000 * i) for i, n in enumerate(GGUF_NAMES)}
    repos["MCG-NJU/SteadyDancer-GGUF"]["README.md"] = b"# GGUF\n"
    repos["MCG-NJU/SteadyDancer-14B"] = {
        "config.json": b'{"model_type": "i2v"}',
        "diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": {
            "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}).encode(),
        "diffusion_pytorch_model-00001-of-00002.safetensors": _blob("s1", 40_000),
        "diffusion_pytorch_model-00002-of-00002.safetensors": _blob("s2", 30_000),
        "models_t5_umt5-xxl-enc-bf16.pth": _blob("t5", 10_000),
    }
    return repos


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub(_repos()).start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER",
                "ENABLE_STEADYDANCER", "STEADYDANCER_VARIANT", "ENABLE_TURBO", "ENABLE_DWPOSE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fm, "_token_in_use", lambda token: bool(token or os.environ.get("HF_TOKEN")))
    yield h
    h.stop()


def _entries(*files):
    return [f.entry() for f in (files or fm.known_files())]


def _gets(hub):
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def _hidden(models):
    return [p for p in models.rglob(".*.part")]


# ------------------------------------------------------------------------------------ table vs. workflows
def test_file_table_is_what_the_workflows_and_readme_list():
    table = {f.name: f.entry() for f in fm.known_files()}
    seen = set()
    for wf in sorted((ROOT / "example_workflows").glob("*.json")):
        ui = json.loads(wf.read_text())
        for m in [m for n in ui["nodes"] for m in n.get("properties", {}).get("models", [])] + ui.get("models", []):
            assert m == table[m["name"]], (wf.name, m)
            seen.add(m["name"])
    assert seen == set(table), "a table entry no shipped workflow uses"
    readme = (ROOT / "README.md").read_text()
    for f in fm.known_files():
        assert f.url in readme and f.directory in readme and f.source.startswith("https://huggingface.co/")
    assert all(d in fm.FOLDERS for d in {f.directory for f in fm.known_files()})
    # a sharded folder has no single URL ComfyUI's missing-model dialog could download: never in properties.models
    # (neither the folder nor one of its shards); the README names it, its repository and its real size
    for f in fm.known_folders():
        assert f.name not in seen and not any(n.startswith("diffusion_pytorch_model") for n in seen)
        assert f.directory in fm.FOLDERS and f.source.startswith(f"https://huggingface.co/{f.repo}")
        assert f"`{f.directory}/{f.name}/`" in readme and f"https://huggingface.co/{f.repo}" in readme
    assert "fp32" in readme and "65.6 GB" in readme


# ---------------------------------------------------------------------------------------------- fetching
def test_full_fetch_then_present_files_are_skipped(hub, tmp_path):
    models = tmp_path / "models"
    written = fm.fetch_missing(_entries(), models)
    repos = _repos()
    assert len(written) == len(fm.known_files())
    for f in fm.known_files():
        target = models / f.directory / f.name
        assert target in written and target.read_bytes() == repos[f.repo][f.path]
    assert not _hidden(models)
    n_gets = len(_gets(hub))
    assert n_gets == len(written)
    assert fm.fetch_missing(_entries(), models) == []          # present and correct: nothing fetched
    assert len(_gets(hub)) == n_gets
    state = json.loads((models / fm.STATE_FILE).read_text())
    assert {pathlib.Path(p).name for p in state} == {f.name for f in fm.known_files()}


def test_cut_connection_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants, file_download
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)     # 10 MB chunks on the real hub: files here are tiny
    if hasattr(file_download, "DOWNLOAD_CHUNK_SIZE"):                # huggingface_hub < 1 imports it by name
        monkeypatch.setattr(file_download, "DOWNLOAD_CHUNK_SIZE", 16384)
    f = fm.DIT_FP8
    hub.cut_once.add((f.repo, f.path))
    out = fm.fetch_missing(_entries(f), tmp_path)
    data = _repos()[f.repo][f.path]
    assert out[0].read_bytes() == data
    ranges = [r[2] for r in _gets(hub)]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(ranges[1][len("bytes="):-1])
    assert ranges[1].endswith("-") and len(data) // 2 - 16384 <= start <= len(data) // 2, ranges


def test_ctrl_c_leaves_only_a_hidden_part_file_and_the_next_run_resumes(hub, tmp_path, monkeypatch):
    f = fm.DIT_FP8
    data = _repos()[f.repo][f.path]
    real = fm._http_get

    class Interrupting(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner

        def write(self, chunk):
            self.inner.write(chunk[:len(chunk) // 3])
            raise KeyboardInterrupt

    monkeypatch.setattr(fm, "_http_get", lambda url, fobj, *a: real(url, Interrupting(fobj), *a))
    with pytest.raises(KeyboardInterrupt):
        fm.fetch_missing(_entries(f), tmp_path)
    target = tmp_path / f.directory / f.name
    assert not target.exists()
    (part,) = _hidden(tmp_path)
    assert part.parent == target.parent and part.name.startswith(".") and part.suffix == ".part"
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    monkeypatch.setattr(fm, "_http_get", real)
    fm.fetch_missing(_entries(f), tmp_path)
    assert target.read_bytes() == data and not part.exists()
    assert _gets(hub)[-1][2] == f"bytes={kept}-"


def test_corrupt_download_is_refused_and_removed(hub, tmp_path):
    f = fm.ENCODERS[2]
    hub.corrupt.add((f.repo, f.path))
    with pytest.raises(fm.FetchError, match="checksum mismatch") as e:
        fm.fetch_missing(_entries(f), tmp_path)
    assert hashlib.sha256(_repos()[f.repo][f.path]).hexdigest() in str(e.value)
    assert not (tmp_path / f.directory / f.name).exists() and not _hidden(tmp_path)


def test_existing_file_that_differs_is_replaced(hub, tmp_path):
    f = fm.ENCODERS[1]
    target = tmp_path / f.directory / f.name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * len(_repos()[f.repo][f.path]))        # right size, wrong bytes
    jobs = fm.plan(fm.jobs_from_entries(_entries(f)), tmp_path)
    assert jobs[0].status == "replace"
    fm.fetch_missing(_entries(f), tmp_path)
    assert target.read_bytes() == _repos()[f.repo][f.path]


def test_stale_part_of_an_older_version_is_dropped_and_foreign_urls_refused(hub, tmp_path):
    f = fm.ENCODERS[2]
    stale = tmp_path / f.directory / f".{f.name}.0123456789abcdef.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old version bytes")
    fm.fetch_missing(_entries(f), tmp_path)
    assert not stale.exists() and not _hidden(tmp_path)
    with pytest.raises(fm.FetchError, match="not a Hugging Face file URL"):
        fm.fetch_missing([{"name": "x.safetensors", "directory": "loras",
                           "url": "https://civitai.com/a/b/resolve/main/x.safetensors"}], tmp_path)


def test_404_names_the_file_and_lists_the_folder(hub, tmp_path):
    entry = {"name": "Wan21_SteadyDancer_fp8_OLD.safetensors", "directory": "diffusion_models",
             "url": "https://huggingface.co/Kijai/WanVideo_comfy_fp8_scaled/resolve/main/SteadyDancer/"
                    "Wan21_SteadyDancer_fp8_OLD.safetensors"}
    with pytest.raises(fm.FetchError, match="404") as e:
        fm.fetch_missing([entry], tmp_path)
    assert "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors" in str(e.value)   # what the folder has now
    assert not any(tmp_path.rglob("*.safetensors"))


def test_gated_repo_needs_a_token(hub, tmp_path, monkeypatch):
    f = fm.TURBO_LORA
    hub.gated.add(f.repo)
    with pytest.raises(fm.FetchError, match="HF_TOKEN") as e:
        fm.fetch_missing(_entries(f), tmp_path)
    assert "401" in str(e.value) and f"https://huggingface.co/{f.repo}" in str(e.value)
    with pytest.raises(fm.FetchError, match="access refused"):
        fm.fetch_missing(_entries(f), tmp_path, token="hf_wrong")
    assert fm.fetch_missing(_entries(f), tmp_path, token=GOOD_TOKEN)[0].read_bytes() == _repos()[f.repo][f.path]
    (tmp_path / f.directory / f.name).unlink()
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)                        # the library reads HF_TOKEN itself
    assert fm.fetch_missing(_entries(f), tmp_path)[0].is_file()


def test_full_disk_is_refused_before_any_download(hub, tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10**12, 10**12 - 10**6, 10**6
    monkeypatch.setattr(fm.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(fm.FetchError, match="not enough disk space"):
        fm.fetch_missing(_entries(), tmp_path)
    assert _gets(hub) == [] and not any(tmp_path.rglob("*.*"))


def test_disk_full_during_download_keeps_the_final_name_free(hub, tmp_path, monkeypatch):
    def full(url, fobj, *a):
        fobj.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fm, "_http_get", full)
    f = fm.ENCODERS[0]
    with pytest.raises(fm.FetchError, match="disk is full"):
        fm.fetch_missing(_entries(f), tmp_path)
    assert not (tmp_path / f.directory / f.name).exists() and len(_hidden(tmp_path)) == 1


def test_offline_is_reported(tmp_path, monkeypatch):
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                        # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(fm.FetchError, match="offline"):
        fm.fetch_missing(_entries(fm.TURBO_LORA), tmp_path)


# ------------------------------------------------------------------------------------ variants and toggles
def test_variants_resolve_from_the_repository_file_lists(hub):
    (fp16,) = fm.resolve_variant("fp16")
    assert (fp16.path, fp16.directory) == ("SteadyDancer/Wan21_I2V_SteadyDancer_fp16.safetensors", "diffusion_models")
    names = [j.name for j in fm.resolve_variant("bf16")]
    assert names == ["SteadyDancer-14B/config.json",
                     "SteadyDancer-14B/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "SteadyDancer-14B/diffusion_pytorch_model-00002-of-00002.safetensors",
                     "SteadyDancer-14B/diffusion_pytorch_model.safetensors.index.json"]
    assert fm.resolve_variant("gguf")[0].path == GGUF_NAMES[0]                  # default Q4_K_M
    assert fm.resolve_variant("gguf:q8_0")[0].path == GGUF_NAMES[2]
    assert fm.resolve_variant(f"gguf:{GGUF_NAMES[1]}")[0].path == GGUF_NAMES[1]
    with pytest.raises(fm.FetchError) as e:
        fm.resolve_variant("gguf:Q3_K_S")
    assert all(q in str(e.value) for q in ("Q4_K_M", "Q6_K", "Q8_0"))
    with pytest.raises(fm.FetchError, match="unknown variant"):
        fm.resolve_variant("int4")


def test_bf16_shards_land_in_one_folder_and_verify_by_git_sha1(hub, tmp_path):
    jobs = fm.resolve_variant("bf16")
    fm.fetch(jobs, tmp_path, out=io.StringIO())
    folder = tmp_path / "diffusion_models" / "SteadyDancer-14B"
    assert sorted(p.name for p in folder.iterdir()) == sorted(j.name.split("/")[1] for j in jobs)
    assert (folder / "config.json").read_bytes() == b'{"model_type": "i2v"}'
    assert len([j for j in jobs if len(j.etag) == 40]) == 2                     # the two JSON files: not LFS


def _load_prechecks():
    spec = importlib.util.spec_from_file_location("sd_prechecks", ROOT / "tools" / "prechecks.py")
    pc = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(pc)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return pc


def test_the_fetched_official_folder_is_what_the_loader_lists_and_the_precheck_knows(hub, tmp_path, monkeypatch):
    """One name for the official sharded release everywhere: the folder --variant bf16 writes, the Model Loader's
    combo entry for it (nodes/comfy_bridge.py, the shard files hidden), the run command's pre-check hint and the
    entry --fetch-missing expands into the folder's files."""
    from steadydancer_turbo.nodes import comfy_bridge as cb
    pc = _load_prechecks()
    jobs = fm.resolve_variant("bf16")
    assert jobs[-1].name.endswith(".safetensors.index.json")           # the index last: see folder_jobs
    fm.fetch(jobs, tmp_path, out=io.StringIO())
    root = tmp_path / "diffusion_models"
    (root / "single.safetensors").write_bytes(b"x")
    monkeypatch.setattr(cb, "HAVE_COMFY", True)
    monkeypatch.setattr(cb, "get_folder_paths", lambda kind: [str(root)])
    monkeypatch.setattr(cb, "get_filename_list", lambda kind: sorted(
        str(p.relative_to(root)) for p in root.rglob("*.safetensors")))
    assert cb.get_model_list(cb.DIFFUSION_FOLDER) == [fm.DIT_OFFICIAL.name, "single.safetensors"]
    hint = pc.known_models()[fm.DIT_OFFICIAL.name]
    assert hint == fm.DIT_OFFICIAL.entry() and hint["directory"] == "diffusion_models"
    assert [(j.repo, j.path, j.name) for j in fm.jobs_from_entries([hint])] == [(j.repo, j.path, j.name) for j in jobs]
    # the pre-check: the folder absent from the loader's combo is a missing model with its folder and page,
    # not a "value not allowed"; an unknown name without a model extension still is
    info = {"SteadyDancerModelLoader": {"input": {"required": {"model_name": [["single.safetensors"], {}]}},
                                        "output_node": True}}
    for value, missing in ((fm.DIT_OFFICIAL.name, True), ("my-folder", False)):
        problems, found = pc.find_inputs({"1": {"class_type": "SteadyDancerModelLoader",
                                                "inputs": {"model_name": value}}}, info, pc.known_models())
        assert bool(found) == missing and bool(problems) != missing, (value, problems, found)
    assert found == [] and "is not one of the allowed values" in problems[0]
    problems, (entry,) = pc.find_inputs({"1": {"class_type": "SteadyDancerModelLoader",
                                              "inputs": {"model_name": fm.DIT_OFFICIAL.name}}}, info, pc.known_models())
    assert entry == {"name": "SteadyDancer-14B", "directory": "diffusion_models", "users": [
        "node 1 (SteadyDancerModelLoader).model_name"], "url": "https://huggingface.co/MCG-NJU/SteadyDancer-14B/tree/main"}


def _run(args, capsys):
    code = fm.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_environment_toggles_and_flags(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENABLE_STEADYDANCER", "true")
    monkeypatch.setenv("STEADYDANCER_VARIANT", "gguf:Q8_0")
    monkeypatch.setenv("ENABLE_DWPOSE", "1")
    monkeypatch.setenv("ENABLE_TURBO", "false")
    code, out, _ = _run(["--models-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 0
    listed = {f.name for f in fm.known_files() if f.name in out}
    assert GGUF_NAMES[2] in out and fm.TURBO_LORA.name not in out
    assert listed == {f.name for f in fm.ENCODERS + fm.dwpose_files()}
    assert "free" in out and "diffusion_models/" in out and "MB" in out
    assert not any(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [tmp_path / fm.STATE_FILE]
    code, out, _ = _run(["--models-dir", str(tmp_path), "--dry-run", "--turbo", "--no-dwpose",
                         "--variant", "fp8"], capsys)
    assert code == 0 and fm.TURBO_LORA.name in out and "yolox_l.onnx" not in out and fm.DIT_FP8.name in out
    monkeypatch.delenv("ENABLE_STEADYDANCER")                     # a variant alone still asks for the DiT
    code, out, _ = _run(["--models-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 0 and GGUF_NAMES[2] in out and fm.ENCODERS[0].name not in out
    monkeypatch.setenv("ENABLE_STEADYDANCER", "false")
    code, out, _ = _run(["--models-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 0 and GGUF_NAMES[2] not in out and "yolox_l.onnx" in out
    monkeypatch.setenv("ENABLE_TURBO", "maybe")
    code, _, err = _run(["--models-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "ENABLE_TURBO" in err
    for var in ("ENABLE_STEADYDANCER", "STEADYDANCER_VARIANT", "ENABLE_DWPOSE", "ENABLE_TURBO"):
        monkeypatch.delenv(var)
    code, _, err = _run(["--models-dir", str(tmp_path)], capsys)
    assert code == 2 and "nothing selected" in err


def test_all_fetches_the_turbo_set_and_exit_codes(hub, tmp_path, monkeypatch, capsys):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    monkeypatch.setenv("HF_HUB_ENABLE_HF_TRANSFER", "1")
    code, out, err = _run(["--comfyui", str(comfy), "--all"], capsys)
    if int(fm._hub().__version__.split(".")[0]) < 1 and importlib.util.find_spec("hf_transfer") is None:
        assert code == 1 and "pip install hf_transfer" in err            # the old client would fail on it
        monkeypatch.delenv("HF_HUB_ENABLE_HF_TRANSFER")
        code, out, err = _run(["--comfyui", str(comfy), "--all"], capsys)
    elif int(fm._hub().__version__.split(".")[0]) >= 1:
        assert "hf_transfer" in out                                      # said, not silently dropped
    assert code == 0 and f"{len(fm.known_files())} file(s) written" in out
    assert f"{fm.DIT_FP8.name}: 100% (0.3 MB of 0.3 MB)" in err        # progress as log lines without a terminal
    for f in fm.known_files():
        assert (comfy / "models" / f.directory / f.name).is_file()
    hub.gated.add("MCG-NJU/SteadyDancer-GGUF")
    code, _, err = _run(["--comfyui", str(comfy), "--variant", "gguf:Q4_K_M"], capsys)
    assert code == 1 and "HF_TOKEN" in err and "Traceback" not in err
    code, _, err = _run(["--comfyui", str(comfy), "--variant", "int4"], capsys)
    assert code == 2
    hub.gated.clear()
    code, _, err = _run(["--comfyui", str(comfy), "--variant", "gguf:Q3_K_S"], capsys)
    assert code == 2 and "Q8_0" in err


def test_the_run_pre_check_knows_every_dwpose_file_of_the_core_table():
    """known_models() takes dwpose/models.py's whole table (also the files no shipped workflow lists, such as the
    non-384 estimator), each with its URL and ComfyUI folder, from the one file loader in tools/model_files.py."""
    pc = _load_prechecks()
    spec = importlib.util.spec_from_file_location("_test_dwpose_models", ROOT / "dwpose" / "models.py")
    table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = table
    spec.loader.exec_module(table)
    known = pc.known_models()
    assert "dw-ll_ucoco.onnx" in table.MODEL_FILES
    for name, f in table.MODEL_FILES.items():
        assert known[name] == {"name": name, "url": f.url, "directory": table.COMFY_MODEL_SUBFOLDER}, name
