"""Held-out evaluation of a detector + SAM pair on the synthetic phantom: ``ultramotion-igt evaluate``.

The held-out set is `training.common.heldout_set` (``HELDOUT_DATASET_SEED``: phantom sequences whose
seeds are disjoint from the training pool's). Three numbers, each per class and overall:

* **detector AP50**: VOC-style all-point AP at IoU 0.5 (`metrics.average_precision`) over the set,
  ranking the detections the pipeline actually prompts SAM with (score threshold, prompts per class
  and NMS of the `PipelineConfig`); the model's raw AP over all its detections is reported beside it.
  Ground truth: the phantom's boxes (pixel-edge XYXY, the convention the detector is trained on).
  The computation is the training code's (`training.detector.detector_ap50`), so the numbers here
  and in the model card are the same metric.
* **SAM Dice with ground-truth boxes**: every ground-truth object is prompted with its own box; the
  Dice of its mask with the object's mask, averaged over objects (`training.sam.sam_dice_with_gt_boxes`).
* **end-to-end Dice**: frames go through the real `Pipeline` (GPU-resident path, the default
  `PipelineConfig`: score threshold 0.3, at most 4 prompts per class, NMS IoU 0.6) with
  ``track=False``: the held-out frames come from many unrelated sequences, and the tracker only
  assigns track ids (it changes no mask), so single frames are evaluated without it. For each
  (frame, class) the union of the predicted masks of that class is compared with the union of the
  ground-truth masks of that class; pairs where both are empty are skipped (nothing to find, nothing
  found), so a false detection on a frame without that class counts as Dice 0, as does a miss.
  Reported: the mean over all pairs and per class.

Acceptance bars of the shipped demo models (issue 16, raised from issue 3's 0.90 / mean 0.85 / mean
0.80), each **per class** (vessel, needle, bone): AP50 >= 0.95, SAM Dice with ground-truth boxes
>= 0.85, end-to-end Dice >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.errors import UltramotionError
from UltramotionIGTLib.tools.metrics import dice

DEFAULT_FRAMES = 200
#: Acceptance bars (issue 16), each applied to every class.
BARS = {"detector_ap50": 0.95, "sam_dice": 0.85, "e2e_dice": 0.85}


def _class_map(detector_classes: Sequence[str], dataset_classes: Sequence[str] = CLASS_NAMES) -> list[int]:
    """Detector label index of each phantom class (by name); UltramotionError if one is missing."""
    names = list(detector_classes)
    missing = [c for c in dataset_classes if c not in names]
    if missing:
        raise UltramotionError(
            f"the detector's classes {names} lack {missing}: the phantom evaluation needs a detector "
            f"trained on the phantom classes {list(dataset_classes)}"
        )
    return [names.index(c) for c in dataset_classes]


def _check_phantom_classes(detector_classes: Sequence[str]) -> None:
    """The training metrics index classes by position: the detector must list the phantom classes
    first and in order (`UltramotionIGTLib.CLASS_NAMES`: ``vessel``, ``needle``, ``bone``)."""
    if list(_class_map(detector_classes)) != list(range(len(CLASS_NAMES))):
        raise UltramotionError(
            f"the detector's classes {list(detector_classes)} must start with {list(CLASS_NAMES)} in this "
            "order for the phantom evaluation"
        )


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finite(value: float | None) -> float | None:
    """NaN (a class with no object) becomes None, so the report stays valid JSON."""
    return None if value is None or not np.isfinite(value) else float(value)


def detector_ap50(detector: Any, dataset: Any, config: Any | None = None, raw: bool = True) -> dict[str, Any]:
    """Detector AP at IoU 0.5 per phantom class on ``dataset`` (a `synthetic.PhantomDataset`).

    The metric is the training code's (`training.detector.detector_ap50`, the number in the model
    card): detections ranked are those the pipeline prompts SAM with (`pipeline.select_prompts` at
    ``config``'s score threshold, prompts per class and NMS IoU; default `PipelineConfig`). With
    ``raw`` the model's raw AP over all K detections (no threshold, no NMS) is reported as well.
    Returns ``{"per_class": {name: AP}, "mean", "raw_per_class": {name: AP} (if raw),
    "gt_objects": {name: count}, "settings": {...}}``.
    """
    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.tools.training.detector import detector_ap50 as training_detector_ap50

    _check_phantom_classes(detector.class_names)
    cfg = config or PipelineConfig()
    settings = {
        "score_threshold": float(cfg.score_threshold),
        "max_per_class": None if cfg.max_targets_per_class is None else int(cfg.max_targets_per_class),
        "nms_iou": float(cfg.nms_iou),
        "max_prompts": int(cfg.max_prompts),
    }
    per_class = training_detector_ap50(detector, dataset, **settings)
    report: dict[str, Any] = {
        "per_class": {name: float(per_class[name]) for name in CLASS_NAMES},
        "mean": _mean([per_class[name] for name in CLASS_NAMES]),
        "gt_objects": {
            name: int(sum(int((np.asarray(lab) == c).sum()) for lab in dataset.labels))
            for c, name in enumerate(CLASS_NAMES)
        },
        "settings": settings,
    }
    if raw:
        raw_ap = training_detector_ap50(detector, dataset, score_threshold=0.0, max_prompts=None)
        report["raw_per_class"] = {name: float(raw_ap[name]) for name in CLASS_NAMES}
    return report


def sam_dice_with_gt_boxes(segmenter: Any, dataset: Any) -> dict[str, Any]:
    """SAM Dice with each ground-truth object's own box as the prompt, on ``dataset``.

    The metric is the training code's (`training.sam.sam_dice_with_gt_boxes`, the number in the
    model card). Returns ``{"mean": mean over objects, "per_class": {name: mean or None},
    "objects": {name: count}}``.
    """
    from UltramotionIGTLib.tools.training.sam import sam_dice_with_gt_boxes as training_sam_dice

    result = training_sam_dice(segmenter, dataset)
    return {
        "mean": _finite(result["mean_dice"]),
        "per_class": {name: _finite(result["per_class"].get(name)) for name in CLASS_NAMES},
        "objects": {name: int(result["counts"].get(name, 0)) for name in CLASS_NAMES},
    }


def class_union_dice(
    pred_masks: np.ndarray,
    pred_labels: np.ndarray,
    gt_masks: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int = len(CLASS_NAMES),
) -> dict[int, float]:
    """Per-class Dice of one frame between the union of predicted masks of a class and the union of
    ground-truth masks of that class, for the classes where either union is non-empty.

    pred_masks: PxHxW bool with pred_labels P (phantom class indices); gt_masks: GxHxW bool with
    gt_labels G. Returns ``{class index: Dice}``; a class absent from both is left out.
    """
    out: dict[int, float] = {}
    shape = gt_masks.shape[1:] if gt_masks.ndim == 3 else pred_masks.shape[1:]
    for c in range(num_classes):
        pred = np.zeros(shape, bool)
        gt = np.zeros(shape, bool)
        for mask in pred_masks[np.asarray(pred_labels) == c]:
            pred |= mask
        for mask in gt_masks[np.asarray(gt_labels) == c]:
            gt |= mask
        if pred.any() or gt.any():
            out[c] = dice(pred, gt)
    return out


def end_to_end_dice(pipeline: Any, dataset: Any) -> dict[str, Any]:
    """End-to-end Dice on ``dataset`` through ``pipeline`` (see the module docstring for the rule).

    Returns ``{"mean", "per_class": {name: mean}, "pairs": {name: count}, "false_positive_pairs":
    {name: count of pairs with prediction but no ground truth}, "missed_pairs": {name: count of pairs
    with ground truth but no prediction}, "ms_per_frame": mean wall time of process_frame + to_host}``.
    """
    cmap = _class_map(pipeline.class_names)
    to_phantom = {det: c for c, det in enumerate(cmap)}
    per: list[list[float]] = [[] for _ in CLASS_NAMES]
    false_pos = [0 for _ in CLASS_NAMES]
    missed = [0 for _ in CLASS_NAMES]
    times = []
    for i in range(len(dataset)):
        t0 = time.perf_counter()
        result = pipeline.process_frame(dataset.images[i], frame_index=i).to_host()
        times.append(time.perf_counter() - t0)
        labels = np.asarray([to_phantom.get(int(lab), -1) for lab in result.labels], np.int64)
        gt_masks = np.asarray(dataset.masks[i], bool).reshape(-1, *dataset.images.shape[1:])
        gt_labels = np.asarray(dataset.labels[i], np.int64)
        scores = class_union_dice(
            result.masks.reshape(-1, *dataset.images.shape[1:]), labels, gt_masks, gt_labels
        )
        for c, value in scores.items():
            per[c].append(value)
            has_gt = bool((gt_labels == c).any())
            has_pred = bool(result.masks[labels == c].any())
            false_pos[c] += int(has_pred and not has_gt)
            missed[c] += int(has_gt and not has_pred)
    every = [v for p in per for v in p]
    return {
        "mean": _mean(every),
        "per_class": {name: _mean(per[c]) for c, name in enumerate(CLASS_NAMES)},
        "pairs": {name: len(per[c]) for c, name in enumerate(CLASS_NAMES)},
        "false_positive_pairs": {name: false_pos[c] for c, name in enumerate(CLASS_NAMES)},
        "missed_pairs": {name: missed[c] for c, name in enumerate(CLASS_NAMES)},
        "ms_per_frame": 1000.0 * float(np.mean(times)) if times else None,
    }


def acceptance(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The bars (`BARS`, per class) applied to a report: ``{check: {"value", "bar", "pass"}}``, checks
    named ``detector_ap50[<class>]``, ``sam_dice[<class>]`` and ``e2e_dice[<class>]``."""
    checks: dict[str, dict[str, Any]] = {}

    def add(key: str, value: float | None, bar: float) -> None:
        checks[key] = {"value": value, "bar": bar, "pass": value is not None and value >= bar}

    for name, ap in report["detector_ap50"]["per_class"].items():
        add(f"detector_ap50[{name}]", ap, BARS["detector_ap50"])
    for name, value in report["sam_dice"]["per_class"].items():
        add(f"sam_dice[{name}]", value, BARS["sam_dice"])
    for name, value in report["e2e_dice"]["per_class"].items():
        add(f"e2e_dice[{name}]", value, BARS["e2e_dice"])
    return checks


def evaluate(
    pack: str | Path | None = None,
    detector_dir: str | Path | None = None,
    sam_checkpoint: str | Path | None = None,
    sam_type: str = "auto",
    n_frames: int = DEFAULT_FRAMES,
    device: str = "cpu",
    config: Any | None = None,
) -> dict[str, Any]:
    """Evaluate a model pair on the first ``n_frames`` of the held-out phantom set.

    Models: ``detector_dir`` + ``sam_checkpoint`` (both, loaded directly), else the pack ``pack``
    (folder or installed name; None = the shipped demo pack), verified before loading
    (`models.load_pack`). ``config``: a `PipelineConfig` for the end-to-end part (default: the
    default config on ``device`` with ``track=False``). Returns a JSON-ready dict with
    ``detector_ap50``, ``sam_dice``, ``e2e_dice``, ``acceptance`` (bar checks), ``passed``,
    ``heldout`` (how the set was made), ``models``, ``pipeline_config``, ``device`` and ``wall_s``.
    """
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.tools.training.common import HELDOUT_DATASET_SEED, heldout_set

    if n_frames < 1:
        raise UltramotionError(f"--frames must be at least 1, got {n_frames}")
    start = time.perf_counter()
    dev = resolve_device(device)
    if (detector_dir is None) != (sam_checkpoint is None):
        raise UltramotionError("give both --detector and --sam, or neither (then a pack is used)")
    if detector_dir is not None:
        from UltramotionIGTLib.core.detector import DFineDetector
        from UltramotionIGTLib.core.sam import SamSegmenter

        detector = DFineDetector.from_pretrained(detector_dir, device=dev)
        segmenter = SamSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_type, device=dev)
        models = {"detector": str(detector_dir), "sam": str(sam_checkpoint), "pack": None}
    else:
        from UltramotionIGTLib.models.packs import load_pack, resolve_pack

        root = resolve_pack(pack)
        detector, segmenter, manifest = load_pack(root, device=dev)
        models = {
            "pack": manifest.name,
            "pack_path": str(root),
            "detector": str(root / manifest.model("detector").path),
            "sam": str(root / manifest.model("segmenter").path),
        }
    if config is None:
        config = PipelineConfig(device=str(dev), track=False)
    dataset = heldout_set(n_frames)
    report: dict[str, Any] = {
        "heldout": {
            "dataset_seed": HELDOUT_DATASET_SEED,
            "frames": len(dataset),
            "sequences": len(set(int(s) for s in dataset.sequence_seeds)),
            "image_size": list(dataset.images.shape[1:]),
            "classes": list(CLASS_NAMES),
        },
        "models": models,
        "device": str(dev),
        "pipeline_config": asdict(config),
    }
    report["detector_ap50"] = detector_ap50(detector, dataset, config)
    report["sam_dice"] = sam_dice_with_gt_boxes(segmenter, dataset)
    pipeline = Pipeline(detector, segmenter, config)
    report["e2e_dice"] = end_to_end_dice(pipeline, dataset)
    report["acceptance"] = acceptance(report)
    report["passed"] = all(c["pass"] for c in report["acceptance"].values())
    report["wall_s"] = round(time.perf_counter() - start, 2)
    return report


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report from `evaluate`, with the acceptance bars and PASS/FAIL."""
    h = report["heldout"]
    m = report["models"]
    source = f"pack {m['pack']!r} ({m['pack_path']})" if m.get("pack") else f"{m['detector']} + {m['sam']}"
    lines = [
        f"held-out phantom set: {h['frames']} frames from {h['sequences']} sequence(s) "
        f"(dataset seed {h['dataset_seed']}, {h['image_size'][0]}x{h['image_size'][1]}), device {report['device']}",
        f"models: {source}",
        "",
        f"{'metric':<56}{'value':>8}{'bar':>9}  result",
    ]
    acc = report["acceptance"]

    def row(label: str, key: str | None, value: float | None) -> None:
        if key is None:
            lines.append(f"{label:<56}{_fmt(value):>8}")
            return
        check = acc[key]
        verdict = "PASS" if check["pass"] else "FAIL"
        lines.append(f"{label:<56}{_fmt(value):>8}{'>= ' + format(check['bar'], '.2f'):>9}  {verdict}")

    det = report["detector_ap50"]
    for name, ap in det["per_class"].items():
        row(f"detector AP50 {name} ({det['gt_objects'][name]} objects)", f"detector_ap50[{name}]", ap)
    for name, ap in det.get("raw_per_class", {}).items():
        row(f"  raw AP50 {name} (all detections, no NMS)", None, ap)
    sam = report["sam_dice"]
    row("SAM Dice, ground-truth boxes (mean over objects)", None, sam["mean"])
    for name, value in sam["per_class"].items():
        row(f"  {name} ({sam['objects'][name]} objects)", f"sam_dice[{name}]", value)
    e2e = report["e2e_dice"]
    row("end-to-end Dice, detector boxes (mean over pairs)", None, e2e["mean"])
    for name, value in e2e["per_class"].items():
        extra = f"{e2e['pairs'][name]} pairs, {e2e['false_positive_pairs'][name]} false pos., {e2e['missed_pairs'][name]} missed"
        row(f"  {name} ({extra})", f"e2e_dice[{name}]", value)
    cfg = report["pipeline_config"]
    lines += [
        "",
        f"pipeline: score threshold {cfg['score_threshold']}, {cfg.get('max_prompts', '-')} prompts per frame "
        f"(<= {cfg['max_targets_per_class']} per class), "
        f"tracking {'on' if cfg['track'] else 'off'}; {e2e['ms_per_frame']:.1f} ms per frame; "
        f"evaluation took {report['wall_s']:.1f} s",
        "ACCEPTANCE: " + ("PASS (all bars met)" if report["passed"] else "FAIL (see the rows marked FAIL)"),
    ]
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import add_model_arguments, positive_int

    parser.description = (
        "Held-out phantom metrics of a detector + SAM pair: detector AP50 per class, SAM Dice with "
        "ground-truth boxes, end-to-end Dice through the pipeline (tracking off), each against its "
        "acceptance bar. Prints a table (or JSON); exit 0 when the evaluation ran, 1 with --strict when "
        "a bar is missed."
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=DEFAULT_FRAMES,
        metavar="N",
        help=f"first N frames of the held-out set (default {DEFAULT_FRAMES})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when an acceptance bar is missed")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate the models `resolve_model_source` names; print the table or JSON (module doc)."""
    from UltramotionIGTLib.tools.options import resolve_model_source

    source = resolve_model_source(args)
    if source.pack is not None:
        models: dict[str, Any] = {"pack": source.pack}
    else:
        models = {"detector_dir": source.detector, "sam_checkpoint": source.sam, "sam_type": source.sam_type}
    report = evaluate(**models, n_frames=args.frames, device=args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return 1 if args.strict and not report["passed"] else 0
