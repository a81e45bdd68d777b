"""Several processes, one job: `launch` (torchrun ranks: rank 0 does the I/O, the others sample with it) and
`workers` (the ComfyUI worker pool). Both drive the pipeline from above: they hand `generate` a window sampler
that spreads each window over the processes (docs/multi-gpu.md)."""
