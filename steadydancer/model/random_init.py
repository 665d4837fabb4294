"""Deterministic random weights with sane scales, for benchmarks and smoke runs without real weights (the bench's
random 14B models and ``tools/dance_distributed.py``): the same numbers on every run and every rank of one GPU type.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place, from a generator on the parameters' device: matrices ~ N(0, 1/fan_in), 1-D weights of norms = 1,
    biases ~ N(0, 0.02), other 1-D weights and modulation tables (ours ``modulation``, diffusers'
    ``scale_shift_table``) ~ N(0, 1/sqrt(dim)). Non-float parameters are left alone."""
    params = list(model.named_parameters())
    if not params:
        return model
    g = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, p in params:
        if not p.is_floating_point():
            continue
        if p.dim() >= 2 and "modulation" not in name and "scale_shift_table" not in name:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
    return model
