"""TurboDiffusion's rCM few-step sampler (rcm.py) for the SteadyDancer DiT.
May import: steadydancer/ (sampling, model) and torch; never ComfyUI or nodes/.
"""
