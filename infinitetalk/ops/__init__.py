"""Kernels the models call: attention backends by name, GGML block dequantisation, the options dataclass the
kernels read, and the sequence-parallel collectives of the DiT. Below `models/`: imports only torch and
`errors`, never the loaders, pipeline or runtime above it (tests/test_layers.py enforces it)."""
