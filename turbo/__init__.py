"""turbo core (never imports ComfyUI)."""
