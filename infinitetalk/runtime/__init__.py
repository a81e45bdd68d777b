"""Runtime: where models run. Device placement, VRAM budget and block streaming, kernels (attention
backends, fp8 matmul, compile), guidance batching and multi-GPU parallelism live here, never inside
`models/` (which stay plain nn.Modules whose state-dict names are the checkpoints')."""
from .options import RuntimeOptions

__all__ = ["RuntimeOptions"]
