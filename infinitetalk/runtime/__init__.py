"""Runtime: how a job runs on its hardware, applied from outside the models. `budget`, `plan`,
`streaming`, `teacache` and `kernels` (configure a loaded DiT) sit below the pipeline, which uses them;
`launch` and `workers` drive the pipeline across processes and sit above it. The kernels the models call
(attention backends, GGML dequantisation, options, sequence-parallel collectives) live in `ops/`."""
