"""Models on disk: offline model packs (`packs`: manifest, sha256, verify, import, the shipped demo
models) -- what a user brings and where the module finds it. Loading a model into the pipeline is the
core's job (`core.detector`, `core.sam`)."""
