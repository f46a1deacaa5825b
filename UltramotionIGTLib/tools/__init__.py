"""Everything around the per-frame core: the command line (`cli`, one argparse tree; `options`, the
options several commands share) and its commands (`run`, `demo`, `evaluate`, `doctor`), the synthetic
phantom (`phantom`), metrics and overlays, the transfer audit (`audit`), benchmarks (`benchmarks`) and
training of the demo models (`training`)."""
