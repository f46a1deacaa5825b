"""``ultramotion-igt demo``: a synthetic phantom sequence through the full pipeline with the shipped models.

Needs no download and no GPU: by default the demo pack in ``Resources/Models`` (verified before
loading), trained on the same phantom family; ``--pack`` or ``--detector``/``--sam`` name other
models. The sequence is drawn from the held-out seeds, never seen in training. Writes the same outputs as ``run`` plus ``overlay.gif`` and the sequence's ground-truth
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


class SequenceDice:
    """Mean Dice per class over frames where the class is predicted or present (union of masks), the
    rule of `evaluate.class_union_dice`, accumulated frame by frame (no result is kept);
    ``"mean"`` is over all (frame, class) pairs. Call `add` per frame, then `summary`."""

    def __init__(self, truth: Sequence[Any], class_names: Sequence[str]) -> None:
        self.truth = truth
        self.class_names = list(class_names)
        self.per_class: dict[str, list[float]] = {name: [] for name in class_names}

    def add(self, index: int, result: Any) -> None:
        from UltramotionIGTLib.tools.evaluate import class_union_dice

        frame = self.truth[index]
        shape = frame.image.shape
        scores = class_union_dice(
            result.masks.reshape(-1, *shape),
            result.labels,
            np.asarray(frame.masks, bool).reshape(-1, *shape),
            frame.labels,
            num_classes=len(self.class_names),
        )
        for c, value in scores.items():
            self.per_class[self.class_names[c]].append(value)

    def summary(self) -> dict[str, float]:
        out = {name: float(np.mean(v)) for name, v in self.per_class.items() if v}
        every = [d for v in self.per_class.values() for d in v]
        out["mean"] = float(np.mean(every)) if every else float("nan")
        return out


def sequence_dice(
    results: Sequence[Any], truth: Sequence[Any], class_names: Sequence[str]
) -> dict[str, float]:
    """`SequenceDice` over a list of results (frame n of ``results`` against ``truth[n]``)."""
    dice = SequenceDice(truth, class_names)
    for index, result in enumerate(results):
        dice.add(index, result)
    return dice.summary()


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import (
        add_model_arguments,
        add_pipeline_arguments,
        add_sync_audit_argument,
        positive_int,
    )

    parser.description = (
        "Run a held-out synthetic phantom sequence (seeds never seen in training) through detector -> "
        "SAM -> tracker with the shipped demo pack (or the models named); writes segmentation.seq.nrrd, "
        "kpi.jsonl, summary.json, overlay.png and overlay.gif into --out and prints the end-to-end Dice "
        "against the phantom's exact masks."
    )
    parser.add_argument(
        "--out",
        default="out/demo",
        metavar="DIR",
        help="output folder (default out/demo; refused when it holds an earlier run's results, see --overwrite)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out"
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=60,
        metavar="N",
        help="frames to synthesise (default 60 = 3 s at 20 Hz)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="phantom sequence seed (default: the first held-out seed)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sync_audit_argument(parser, "kpi.jsonl and summary.json")
    add_model_arguments(parser)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.options import pipeline_config_from_args, resolve_model_source
    from UltramotionIGTLib.tools.outputs import OutputFolder
    from UltramotionIGTLib.tools.run import _summary_line, process_sequence
    from UltramotionIGTLib.tools.training.common import write_json

    source = resolve_model_source(args)
    device = resolve_device(args.device)
    config = pipeline_config_from_args(args, source=source, device=str(device))
    out = Path(args.out)
    folder = OutputFolder.open(out, args.overwrite, inputs=(source.sam,))
    try:
        # the pipeline alone holds the loaded models: a reduced-precision copy then replaces them
        pipeline = build_pipeline(*source.load(device), config, legacy=args.legacy)
        sequence, truth = demo_sequence(args.frames, args.seed)
    except BaseException:
        folder.release()
        raise
    dice = SequenceDice(truth, pipeline.class_names)
    summary = process_sequence(
        pipeline,
        sequence.frames,
        sequence.timestamps,
        sequence,
        folder,
        progress=not args.quiet,
        source=sequence.metadata["source"],
        gif=True,
        sync_audit=args.sync_audit,
        on_result=dice.add,
    )
    quality = dice.summary()
    summary["ground_truth_dice"] = quality
    summary["model_pack"] = str(source.pack) if source.pack is not None else None
    summary["models"] = source.describe()
    write_json(out / "summary.json", summary)
    print(_summary_line(summary, out))
    print("end-to-end Dice vs phantom ground truth: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))
    return 0
