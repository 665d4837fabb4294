"""The Multi-GPU node inside ComfyUI 0.33's own process (multigpu_checks.py, run with ComfyUI's Python): rank 0 is
ComfyUI, rank 1 a CPU worker process (gloo; the test-only STEADYDANCER_MULTIGPU_CPU=1), the tiny float / fp8 /
GGUF models. References: the same MODEL sampled by the same ComfyUI path without the node.

Measured (2 CPU ranks): official sampler 8.3e-7 (sequence) / 9.8e-7 (2 x sequence), rCM 2.3e-7 / 0; core
LoraLoaderModelOnly after the node 2.0e-7 - 6.7e-7 on float / fp8 / GGUF at strengths 1 and 0.5.
"""
import pytest

from comfyui_harness import run_checks


@pytest.fixture(scope="module")
def results():
    r = run_checks("multigpu_checks.py", "MULTIGPU_RESULTS")
    assert "multigpu_error" not in r, r["multigpu_error"]
    return r


@pytest.mark.parametrize("layout", ["sequence", "2 x sequence"])
def test_multigpu_model_equals_the_one_process_model(results, layout):
    assert results[f"{layout}_official_rel"] <= 1e-6   # official sampler, text + pose CFG, passes batched
    assert results[f"{layout}_rcm_rel"] <= 1e-6        # rCM turbo
    assert results[f"{layout}_weights_sent"] == 1


def test_context_windows_run_on_the_multigpu_model(results):
    assert results["windows_rcm_rel"] <= 1e-6  # 7 latent frames in windows of 3: one distributed pass per window


def test_freed_model_stops_its_workers(results):
    assert results["freed_model_workers_gone"]


@pytest.mark.parametrize("kind", ["f32", "fp8", "gguf"])
def test_core_lora_after_the_node_reaches_the_workers(results, kind):
    for n, s in enumerate(("1.0", "0.5"), start=1):
        assert results[f"lora_{kind}_s{s}_rel"] <= 1e-6
        assert results[f"lora_{kind}_s{s}_vs_no_lora_rel"] > 1e-2   # the LoRA matters: the check can fail
        assert results[f"lora_{kind}_s{s}_weights_sent"] == n        # a strength change re-sends the weights
    assert results["lora_model_file_reads"] == 0


def test_interrupt_leaves_the_pool_usable(results):
    assert results["interrupt_raised"] and results["interrupt_pool_alive"]
    assert results["after_interrupt_rcm_rel"] <= 1e-6


def test_killed_worker_is_a_clear_error_and_the_next_run_restarts(results):
    err = results["killed_error"]
    assert err == "WorkerPoolError: multi-GPU forward failed: rank 1 on cpu died (exit code -9)", err
    assert results["killed_workers_gone"]
    assert results["after_kill_rcm_rel"] <= 1e-6 and results["after_kill_new_pids"]


def test_unload_models_stops_the_workers(results):
    assert results["unload_workers_gone"]
    assert results["after_unload_rcm_rel"] <= 1e-6
    assert results["final_workers_gone"]
