"""ComfyUI nodes (classic API): thin classes that validate inputs and call into `infinitetalk`."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
