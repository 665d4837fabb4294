"""The SteadyDancer DiT: its blocks, pose modules, layers, config from checkpoint shapes and key names.
May import: kernels/ (attention, fp8 matmul) only.
"""
