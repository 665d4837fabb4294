"""dwpose core (never imports ComfyUI)."""
