"""Plant known bugs one at a time and report which default-suite tests catch each (a mutation check).

    python tools/mutation_check.py            # every mutant; exit 1 if any survives
    python tools/mutation_check.py --list     # the table only
    python tools/mutation_check.py temporal_silu hsigmoid_scale

Each mutant is a small source edit (``old`` must occur exactly once in ``file``; tests/test_mutation_table.py
checks that in the default suite, so the table cannot silently rot). For each, the tracked files are copied to
a temporary folder, the edit is applied there (this checkout is never modified) and the listed test files run
with the current Python (about 5-20 s per mutant; all of them: ~4-6 min on a shared 2-core box). Not part
of the default suite.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIT_TESTS = ["tests/test_dit_official_parity.py", "tests/test_dit_steadydancer.py"]
DWPOSE_TESTS = ["tests/test_dwpose_threshold.py", "tests/test_dwpose_draw.py", "tests/test_dwpose_geometry.py",
                "tests/test_dwpose_retarget.py", "tests/test_dwpose_pipeline.py"]

# name -> (what it plants, file, old, new, tests to run)
MUTANTS = {
    "spatial_groupnorm_residual": (
        "spatial module: GroupNorm residual (+ q) dropped", "steadydancer/model/pose_modules.py",
        "q = group_norm_fp32(torch.matmul(phi, q.to(cd)), self.bn2) + q",
        "q = group_norm_fp32(torch.matmul(phi, q.to(cd)), self.bn2)", DIT_TESTS),
    "temporal_silu": (
        "temporal module: the SiLU after each FactorConv3d dropped", "steadydancer/model/pose_modules.py",
        "x = m(x, cd) if isinstance(m, FactorConv3d) else F.silu(x)",
        "x = m(x, cd) if isinstance(m, FactorConv3d) else x", DIT_TESTS),
    "temporal_inner_silu": (
        "temporal module: the SiLU inside FactorConv3d dropped", "steadydancer/model/pose_modules.py",
        "return apply_cd(self.temporal, F.silu(apply_cd(self.spatial, x, cd)), cd)",
        "return apply_cd(self.temporal, apply_cd(self.spatial, x, cd), cd)", DIT_TESTS),
    "layernorm2d_unbiased": (
        "LayerNorm2D with unbiased variance", "steadydancer/model/pose_modules.py",
        "var = x.var(dim=1, keepdim=True, unbiased=False)",
        "var = x.var(dim=1, keepdim=True, unbiased=True)", DIT_TESTS),
    "layernorm2d_fp32_in_bf16": (
        "LayerNorm2D upcast to fp32 in a bf16 run (official: bf16 under autocast)", "steadydancer/model/pose_modules.py",
        "        mean = x.mean(dim=1, keepdim=True)\n", "        x = x.float()\n        mean = x.mean(dim=1, keepdim=True)\n",
        DIT_TESTS),
    "align_ffn_residual": (
        "alignment unit: FFN residual dropped", "steadydancer/model/pose_modules.py",
        "out = self.norm2(out + f)", "out = self.norm2(f)", DIT_TESTS),
    "hsigmoid_scale": (
        "spatial module: hsigmoid on the dynamic scale removed", "steadydancer/model/pose_modules.py",
        "scale = hsigmoid(apply_cd(self.fc_scale, y, cd)).view(b, -1, 1, 1)",
        "scale = apply_cd(self.fc_scale, y, cd).view(b, -1, 1, 1)", DIT_TESTS),
    "hsigmoid_everywhere": (
        "hsigmoid is the identity (SE and scale)", "steadydancer/model/layers.py",
        "return F.relu6(x + 3.0) / 3.0", "return x", DIT_TESTS),
    "spatial_branch_skipped": (
        "fused pose = cond + temporal (spatial branch skipped)", "steadydancer/model/dit.py",
        "fused = cond + temporal + spatial\n", "fused = cond + temporal\n", DIT_TESTS),
    "align_raw_pose": (
        "alignment unit fed the raw pose latent instead of the fused one", "steadydancer/model/dit.py",
        "aligned = self.condition_embedding_align(fused, x, cd)",
        "aligned = self.condition_embedding_align(cond, x, cd)", DIT_TESTS),
    "fuse_channel_order": (
        "patch_embedding_fuse input: fused / aligned channels swapped", "steadydancer/model/dit.py",
        "torch.cat([x, y, fused, aligned.to(acc)], dim=1)", "torch.cat([x, y, aligned.to(acc), fused], dim=1)",
        DIT_TESTS),
    "ref_token_order": (
        "reference-frame tokens swapped (first pose before reference image)", "steadydancer/model/dit.py",
        "tok = torch.cat([vid, rx, rc], dim=2)", "tok = torch.cat([vid, rc, rx], dim=2)", DIT_TESTS),
    "ref_rope_positions": (
        "RoPE: reference frames at the time positions of the first video frames", "steadydancer/model/dit.py",
        "freqs = self.block_freqs(grid, tok.device)",
        "freqs = self.block_freqs(grid, tok.device); freqs = torch.cat([freqs[-2 * grid[1] * grid[2]:], "
        "freqs[:-2 * grid[1] * grid[2]]])", DIT_TESTS),
    "dwpose_threshold_0_4": (
        "DWPose keypoint threshold 0.3 -> 0.4", "dwpose/keypoints.py",
        "KEYPOINT_THRESHOLD = 0.3", "KEYPOINT_THRESHOLD = 0.4", DWPOSE_TESTS),
    "dwpose_presence_strict": (
        "keypoint presence test >= -> >", "dwpose/keypoints.py",
        "return (pts[..., 2] >= threshold)", "return (pts[..., 2] > threshold)", DWPOSE_TESTS),
    "api_twin_value": (
        "shipped API twin: a widget value edited by hand (steps 40 -> 30)", "workflows_api/steadydancer-dance.json",
        '"steps": 40,', '"steps": 30,', ["tests/test_workflows.py"]),
    "sparse_topk_smallest": (
        "sparse attention: top-k keeps the smallest block scores", "steadydancer/kernels/sparse_attention.py",
        "idx = scores.topk(kept, dim=-1, sorted=False).indices",
        "idx = scores.topk(kept, dim=-1, sorted=False, largest=False).indices",
        ["tests/test_sparse_attention.py"]),
}


def tracked_files():
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def copy_tree(dst: Path):
    for rel in tracked_files():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def apply(tree: Path, file: str, old: str, new: str):
    path = tree / file
    src = path.read_text()
    n = src.count(old)
    if n != 1:
        raise SystemExit(f"{file}: {old!r} occurs {n} times (the mutation table is stale)")
    path.write_text(src.replace(old, new))


def run_mutant(name, python=sys.executable):
    what, file, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant_{name}_") as tmp:
        tree = Path(tmp) / "pack"
        copy_tree(tree)
        apply(tree, file, old, new)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("STEADYDANCER_OFFICIAL_PATH", None)         # the default suite: stored official numbers only
        r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf",
                            *tests], cwd=tree, capture_output=True, text=True, env=env)
    failed = sorted(set(re.findall(r"^FAILED (\S+?)(?: - |$)", r.stdout, re.M)))
    errors = sorted(set(re.findall(r"^ERROR (\S+)", r.stdout, re.M)))
    return what, r.returncode, failed + errors, r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutation table and exit")
    ap.add_argument("-v", action="store_true", help="print pytest's output for surviving mutants")
    a = ap.parse_args(argv)
    names = a.names or list(MUTANTS)
    if a.list:
        for n in names:
            print(f"{n:28s} {MUTANTS[n][0]}  [{MUTANTS[n][1]}]")
        return 0
    survivors = 0
    print(f"{'mutant':28s} {'caught':6s} catching tests")
    for n in names:
        what, rc, failed, out = run_mutant(n)
        caught = rc != 0 and bool(failed)
        survivors += not caught
        # distinct test functions (parameters folded), file name shortened
        funcs = sorted({re.sub(r"\[.*\]$", "", f).replace("tests/", "").replace(".py::", "::") for f in failed})
        print(f"{n:28s} {'yes' if caught else 'NO':6s} {len(failed)} failed: {', '.join(funcs)}", flush=True)
        if not caught and a.v:
            print(out[-3000:])
    print(f"{len(names) - survivors}/{len(names)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
