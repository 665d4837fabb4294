"""Conditioning inputs, latent layout and the official UniPC sampler with text + pose guidance.
May import: model/ (config); never weights/, turbo/ or nodes/.
"""
