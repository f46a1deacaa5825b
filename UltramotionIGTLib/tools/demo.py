"""``ultramotion-igt demo``: a synthetic phantom sequence through the full pipeline with the shipped models.

Needs no download and no GPU: the demo models in ``Resources/Models`` (a verified model pack) were
trained on the same phantom family; the sequence is drawn from the held-out seeds, never seen in
training. Writes the same outputs as ``run`` plus ``overlay.gif`` and the sequence's ground-truth
quality (end-to-end Dice against the phantom's exact masks).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def demo_sequence(n_frames: int, seed: int | None = None):
    """(UltrasoundSequence, list of PhantomFrame) for the demo: held-out phantom, 0.2 mm pixels."""
    from UltramotionIGTLib.io import UltrasoundSequence
    from UltramotionIGTLib.tools.phantom import PhantomStream, frames_to_arrays, sequence_seeds
    from UltramotionIGTLib.tools.training.common import HELDOUT_DATASET_SEED, demo_phantom_config

    config = demo_phantom_config()
    stream_seed = int(sequence_seeds(HELDOUT_DATASET_SEED, 1)[0]) if seed is None else int(seed)
    stream = PhantomStream(config, seed=stream_seed, n_frames=n_frames)
    truth = list(stream)
    images, timestamps = frames_to_arrays(truth)
    spacing = float(config.spacing_mm)
    sequence = UltrasoundSequence(
        frames=images,
        spacing=(spacing, spacing, 1.0),
        timestamps=timestamps,
        image_orientation="MF",
        image_type="BRIGHTNESS",
        metadata={"source": f"synthetic phantom, seed {stream_seed}"},
    )
    return sequence, truth


def sequence_dice(
    results: Sequence[Any], truth: Sequence[Any], class_names: Sequence[str]
) -> dict[str, float]:
    """Mean Dice per class over frames where the class is predicted or present (union of masks), the
    rule of `evaluate.class_union_dice`; ``"mean"`` is over all (frame, class) pairs."""
    from UltramotionIGTLib.tools.evaluate import class_union_dice

    per_class: dict[str, list[float]] = {name: [] for name in class_names}
    for result, frame in zip(results, truth, strict=True):
        shape = frame.image.shape
        scores = class_union_dice(
            result.masks.reshape(-1, *shape),
            result.labels,
            np.asarray(frame.masks, bool).reshape(-1, *shape),
            frame.labels,
            num_classes=len(class_names),
        )
        for c, value in scores.items():
            per_class[class_names[c]].append(value)
    out = {name: float(np.mean(v)) for name, v in per_class.items() if v}
    every = [d for v in per_class.values() for d in v]
    out["mean"] = float(np.mean(every)) if every else float("nan")
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ultramotion-igt demo",
        description="Run a held-out synthetic phantom sequence through detector -> tracker -> SAM with the "
        "shipped demo models; writes segmentation.seq.nrrd, kpi.jsonl, summary.json, overlay.png, overlay.gif.",
    )
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--frames", type=int, default=60, help="frames to synthesise (default 60 = 3 s)")
    parser.add_argument(
        "--seed", type=int, default=None, help="phantom seed (default: the first held-out seed)"
    )
    parser.add_argument("--pack", default=None, help="model pack folder (default: the shipped demo pack)")
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument(
        "--legacy", action="store_true", help="legacy path (gpu_resident=False, sam_as_numpy=True)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.errors import InputFileError
    from UltramotionIGTLib.models.packs import default_pack, load_pack
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.run import _summary_line, process_sequence

    if args.frames < 1:
        raise InputFileError(f"--frames must be >= 1, got {args.frames}")
    device = resolve_device(args.device)
    pack = Path(args.pack) if args.pack else default_pack()
    detector, segmenter, _manifest = load_pack(pack, device=device)
    pipeline = build_pipeline(detector, segmenter, PipelineConfig(device=str(device)), legacy=args.legacy)
    sequence, truth = demo_sequence(args.frames, args.seed)
    out = Path(args.out)
    summary = process_sequence(
        pipeline,
        sequence.frames,
        sequence.timestamps,
        sequence,
        out,
        progress=not args.quiet,
        source=sequence.metadata["source"],
        gif=True,
        keep_results=True,
    )
    quality = sequence_dice(summary.pop("results"), truth, pipeline.class_names)
    summary["ground_truth_dice"] = quality
    summary["model_pack"] = str(pack)
    from UltramotionIGTLib.tools.training.common import write_json

    write_json(out / "summary.json", summary)
    print(_summary_line(summary, out))
    print("end-to-end Dice vs phantom ground truth: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))
    return 0
