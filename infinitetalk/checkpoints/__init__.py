"""Reading checkpoint files as users have them, and filling meta-built modules from them."""
from .materialize import FP8_DTYPES, build_on_meta, load_module
from .reader import Checkpoint, CheckpointError, open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "build_on_meta", "load_module", "FP8_DTYPES"]
