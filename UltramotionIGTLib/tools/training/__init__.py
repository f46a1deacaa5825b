"""Training of the small demo models on the synthetic phantom (``ultramotion-igt train ...``)."""
