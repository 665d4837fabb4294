"""Attention backends behind one registry (dense, cuDNN, flash, sage, top-k sparse) and the fp8 matmul.
May import: torch and optional kernel packages only, no other part of the pack.
"""
from .backends import register_builtin_backends

register_builtin_backends()  # the registry (attention.py) imports no backend; they are registered here, once
