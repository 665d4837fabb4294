"""Turning a checkpoint into a runnable model: loader, quantized weights, LoRA, block swap, speed options.
May import: checkpoints/, model/, kernels/; never sampling/, turbo/ or nodes/.
"""
