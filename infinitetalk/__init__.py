"""InfiniteTalk Multi: native PyTorch pipeline for two-person lip-synced video.

Sub-packages: `models` (networks, no I/O), `checkpoints` (file reading), `loaders` (file -> model),
`audio` / `video` (PyAV I/O), `pipeline` (the long-video job), `parity` (golden-case runner),
`tiny` (random tiny checkpoints in every real file layout, for tests and the demo).
"""
__version__ = "0.1.0"
