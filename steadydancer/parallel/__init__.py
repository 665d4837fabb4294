"""One video on several GPUs: Ulysses sequence parallelism, guidance parallelism, process launch and worker pool.
May import: weights/, checkpoints/, model/, kernels/ (samplers are named by string); never turbo/ or nodes/.
"""
