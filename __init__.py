"""ComfyUI entry point of InfiniteTalk Multi: node mappings and the web directory, nothing else.

ComfyUI imports this folder as a package; the `infinitetalk` library beside it is made importable by
its own name (it is unique; `nodes` is not, so node modules are only ever imported relatively).
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

if __package__:  # imported as a package (ComfyUI, or pytest from a folder named like an identifier)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # a lone module: pytest collecting a clone named e.g. `infinitetalk-multi` (no package, no nodes)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
