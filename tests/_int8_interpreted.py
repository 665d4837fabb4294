"""Worker of tests/test_int8_sparse_attention.py: runs our int8 top-k sparse Triton kernels in Triton's CPU
interpreter and prints one JSON line of measurements (the test asserts on them).

A separate process because ``TRITON_INTERPRET=1`` must be set before the kernels are decorated (``triton.jit``
reads it then), and the test process may have imported them already.

References are independent of the kernel: float64 attention restricted to the same kept blocks
(``sparse_attention_reference``), the float64 block quantizer of tests/_int8_ref.py, and dense float64 / bf16
attention.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (steadydancer_turbo = this checkout)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from steadydancer_turbo.steadydancer.kernels import backends  # noqa: E402
from steadydancer_turbo.steadydancer.kernels import int8_sparse as I8  # noqa: E402
from steadydancer_turbo.steadydancer.kernels.attention import attention  # noqa: E402
from steadydancer_turbo.steadydancer.kernels.sparse_attention import (  # noqa: E402
    SparseAttentionConfig, select_kv_blocks, sparse_attention_reference)
from steadydancer_turbo.steadydancer.weights import speed_options as accel  # noqa: E402
from _int8_ref import blockwise_sparse_reference, dequant, quant_ref, structured_inputs as inputs  # noqa: E402

F64 = torch.float64


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def dense(q, k, v, dtype):
    out = F.scaled_dot_product_attention(*(t.to(dtype).transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


def kernel_case(b, n, h, d, bq, bk, topk, seed):
    q, k, v = inputs(b, n, h, d, seed)
    cfg = SparseAttentionConfig(topk=topk, block_q=bq, block_k=bk)
    idx = select_kv_blocks(q, k, cfg)
    out = I8.int8_sparse_attention(q, k, v, idx, bq, bk)
    r = dict(shape=[b, n, h, d], blocks=[bq, bk], topk=topk, kept=idx.shape[-1], nk=math.ceil(n / bk),
             dtype=str(out.dtype).replace("torch.", ""), finite=bool(torch.isfinite(out).all()))
    # the quantizer against the float64 one
    for name, x, blk, smooth in (("q", q, bq, False), ("k", k, bk, True)):
        x8, s = I8.quantize_blocks(x, blk, smooth=smooth)
        want, s_ref = quant_ref(x, blk, smooth)
        diff = (x8.double() - want).abs()
        r[f"quant_{name}"] = dict(max_int_diff=diff.max().item(), frac_diff=(diff > 0).double().mean().item(),
                                  scale_rel=((s.double() - s_ref).abs() / s_ref).max().item())
    # attention: vs the same 8-bit scheme in float64 (independent quantizer), vs exact float64 on the kept
    # blocks, vs dense
    qv, qs = quant_ref(q, bq, False)
    kv, ks = quant_ref(k, bk, True)
    deq = sparse_attention_reference(dequant(qv, qs, bq), dequant(kv, ks, bk), v.double(), idx, bq, bk,
                                     scale=1 / math.sqrt(d))
    exact = sparse_attention_reference(q.double(), k.double(), v.double(), idx, bq, bk)
    r["blockwise_reference_vs_dense_mask_reference"] = max_abs(blockwise_sparse_reference(q, k, v, idx, bq, bk),
                                                               exact)
    d64, d16 = dense(q, k, v, F64), dense(q, k, v, torch.bfloat16)
    r.update(vs_8bit_float64=dict(rel_l2=rel_l2(out, deq), max_abs=max_abs(out, deq)),
             vs_exact_sparse=dict(rel_l2=rel_l2(out, exact), max_abs=max_abs(out, exact)),
             scheme_8bit_vs_exact_sparse=rel_l2(deq, exact),
             vs_dense_float64=rel_l2(out, d64), vs_dense_bf16=rel_l2(out, d16),
             exact_sparse_vs_dense_bf16=rel_l2(exact, d16), bf16_dense_vs_float64=rel_l2(d16, d64))
    last_rows = slice((n - 1) // bq * bq, n)  # the partial last query block
    r["last_block_vs_8bit_float64"] = rel_l2(out[:, last_rows], deq[:, last_rows])
    return r


def backend_case():
    """Through the registry as the DiT calls it: block selection + kernel, and dense cross-attention."""
    q, k, v = inputs(2, 300, 2, 128, seed=5)
    name = accel.sparse(0.7, kernel="int8")
    out = attention(q, k, v, name)
    idx = select_kv_blocks(q, k, SparseAttentionConfig(topk=0.7))
    exact = sparse_attention_reference(q.double(), k.double(), v.double(), idx, 128, 128)
    qc = q[:, :40]
    cross = attention(qc, k, v, name)
    return dict(name=name, problem=backends.int8_sparse_problem("cpu"), settings=backends.sparse_settings(name),
                rel_l2_vs_exact_sparse=rel_l2(out, exact), dtype=str(out.dtype).replace("torch.", ""),
                cross_vs_dense_bf16=max_abs(cross, dense(qc, k, v, torch.bfloat16)))


def compiled_case():
    """A DiT block with the int8 backend under dynamo: graph breaks, and a compiled (aot_eager: no C++ compiler
    needed) call that must give the eager bytes (the same kernels run)."""
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT, rope_freqs

    cfg = SteadyDancerConfig.tiny()
    torch.manual_seed(0)
    m = SteadyDancerDiT(cfg).requires_grad_(False)
    m.rope_dtype = torch.float32
    blk = m.blocks[0]
    n = 200
    args = (torch.randn(1, n, cfg.dim), torch.randn(1, 6, cfg.dim), torch.randn(1, 257, cfg.dim),
            torch.randn(1, 512, cfg.dim), rope_freqs((2, 10, 10), cfg.head_dim), accel.sparse(0.5, kernel="int8"),
            torch.float32)
    with torch.no_grad():
        ex = torch._dynamo.explain(blk)(*args)
        torch._dynamo.reset()
        eager = blk(*args)
        compiled = torch.compile(blk, backend="aot_eager", fullgraph=True)(*args)
    torch._dynamo.reset()
    return dict(graph_breaks=ex.graph_break_count, graphs=ex.graph_count,
                reasons=[str(b.reason)[:200] for b in ex.break_reasons], compiled_equals_eager=torch.equal(
                    eager, compiled), finite=bool(torch.isfinite(eager).all()))


def model_case():
    """The tiny random DiT (fp32 compute): int8_sparse vs flex_sparse on the same top-k (exact on the kept
    blocks) and vs dense attention."""
    from test_dit_steadydancer import CFG, _inputs, _randomize
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

    m = _randomize(SteadyDancerDiT(CFG)).eval()
    m.rope_dtype = torch.float32
    inp = _inputs(f=3, h=16, w=16)  # (3 + 2) x 8 x 8 = 320 tokens: 3 blocks of 128, the last partial
    outs = {}
    for name in ("sdpa", accel.sparse(0.7), accel.sparse(0.7, kernel="int8")):
        accel.use_attention(m, name)
        with torch.no_grad():
            outs[name] = m(**inp)
    i8, fx = outs["int8_sparse:0.7"], outs["flex_sparse:0.7"]
    return dict(tokens=320, int8_vs_flex_same_blocks=rel_l2(i8, fx), int8_vs_dense=rel_l2(i8, outs["sdpa"]),
                flex_vs_dense=rel_l2(fx, outs["sdpa"]), finite=bool(torch.isfinite(i8).all()))


def main():
    t0 = time.time()
    res = dict(triton=__import__("triton").__version__, torch=torch.__version__, interpreting=I8.interpreting())
    res["kernel"] = [kernel_case(2, 300, 3, 128, 128, 128, 0.7, seed=0),   # 3 blocks, the last 44 tokens
                     kernel_case(1, 1000, 2, 64, 64, 128, 0.4, seed=1)]    # block_q != block_k, D 64
    if "--report" in sys.argv:  # the top-k settings of the bench, at the largest size the interpreter does quickly
        res["report"] = [kernel_case(1, 2500, 2, 128, 128, 128, t, seed=2) for t in (1.0, 0.15, 0.10)]
    res["backend"] = backend_case()
    res["compiled"] = compiled_case()
    res["model"] = model_case()
    res["seconds"] = time.time() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
