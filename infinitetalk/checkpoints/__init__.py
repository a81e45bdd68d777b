"""Reading checkpoint files as users have them, and filling meta-built modules from them."""
from . import gguf  # noqa: F401  registers the GGUF opener with `reader.open_checkpoint`
from .materialize import FP8_DTYPES, build_on_meta, load_module
from ..errors import CheckpointError
from .reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "build_on_meta", "load_module", "FP8_DTYPES"]
