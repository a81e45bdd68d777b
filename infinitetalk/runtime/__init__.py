"""Runtime: how a job runs on its hardware, applied from outside the models, below the pipeline (which uses
it and which it never imports): `budget` (the placement decision), `plan` (its inputs and report),
`placement` (applies a decision to loaded modules), `streaming` (DiT blocks visiting the device per call) and
`kernels` (configure a loaded DiT). The kernels the models call (attention backends, GGML dequantisation,
options, sequence-parallel collectives) live in `ops/`; multi-process orchestration in `multigpu/`."""
