"""ComfyUI V1 node classes (thin adapters over the core packages)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
