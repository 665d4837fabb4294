"""steadydancer core (never imports ComfyUI)."""
