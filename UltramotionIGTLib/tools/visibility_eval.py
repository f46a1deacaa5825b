"""``ultramotion-igt evaluate-visibility``: the per-target visibility states against the phantom's truth.

Sequences: phantom sequences (the demo family, `training.common.demo_phantom_config`) with every kind
of event (`phantom.PhantomEvents.all`: shadow fade, lost contact / noise burst, fast-motion blur, a
sweep out of the field of view and back), whose ground truth says per target and frame whether it
is reliably visible. Seeds follow the training split: ``--split heldout`` (default) draws them from
``HELDOUT_DATASET_SEED``, ``--split train`` from ``TRAIN_DATASET_SEED`` (where the default thresholds
were chosen). Frames go through the real `Pipeline` (shipped demo models by default) with the pixel
spacing and, unless ``--no-pose``, the probe pose.

Metrics, pooled over the sequences:

* **agreement** -- over every (target, frame) pair of the targets a sequence shows at least once, the
  fraction where "the target's state is VISIBLE" equals the ground truth. A target's state is the state
  of the result row matched to it (same class, box IoU >= 0.3, one-to-one by `linear_sum_assignment`);
  no matched row counts as not visible. A VISIBLE row matched to no target (a false alarm shown as
  trustworthy) counts as one more disagreeing pair.
* **agreement in view** -- the same over the (target, frame) pairs where the phantom has the target
  (its ground-truth rows; a needle before its insertion is not there), plus the false-alarm pairs.
* **switches** -- for each change of a target's ground truth (from a run of at least 3 frames), the
  distance in frames to the nearest change of its predicted visibility to the same value; ``within 3``
  is the fraction at most 3 frames away (early or late).
* **flicker** -- states held for a single frame: per track slot and id, a run of one frame between two
  other states (`single_frame_states`); and the same count on the per-target predicted visibility.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Frames per evaluation sequence (12 s at 20 Hz: one event of each kind, in a random order).
SEQUENCE_FRAMES = 240
#: Sequences of the held-out evaluation (the acceptance test runs the same).
HELDOUT_SEQUENCES = 2
MATCH_IOU = 0.3
SWITCH_WINDOW = 3


@dataclass
class FrameLog:
    """What one frame gives the evaluation (host arrays).

    Ground truth: ``gt_ids``, ``gt_labels``, ``gt_boxes``, ``gt_visible`` (rows of the phantom frame);
    ``events``: event kinds in progress. Result rows (valid targets): ``labels`` (phantom class
    indices), ``boxes``, ``track_ids``, ``states``, ``scores`` (Nx9), ``slots`` (tracker slot, M = none).
    Tracker: ``slot_ids`` M (track id per slot, -1 none), ``born`` M bool, ``slot_states`` M.
    """

    gt_ids: np.ndarray
    gt_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_visible: np.ndarray
    events: list[str]
    labels: np.ndarray
    boxes: np.ndarray
    confidences: np.ndarray
    track_ids: np.ndarray
    states: np.ndarray
    scores: np.ndarray
    slots: np.ndarray
    slot_ids: np.ndarray
    born: np.ndarray
    slot_states: np.ndarray
    match: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per gt row: result row or -1


@dataclass
class SequenceLog:
    seed: int
    frames: list[FrameLog]
    max_tracks: int
    ms_per_frame: float


def event_stream(seed: int, n_frames: int = SEQUENCE_FRAMES) -> Any:
    """A demo-family phantom stream with every kind of event, for ``seed``, without the bone surface:
    the phantom's visibility ground truth follows the events for vessels and needles, while a bone's
    visible part depends on its angle to the beam, which the ground truth does not model yet."""
    import dataclasses

    from UltramotionIGTLib.tools.phantom import PhantomEvents, PhantomStream
    from UltramotionIGTLib.tools.training.common import demo_phantom_config

    config = dataclasses.replace(demo_phantom_config(), bone_probability=0.0)
    return PhantomStream(config, seed=int(seed), n_frames=n_frames, events=PhantomEvents.all())


def split_seeds(split: str, n: int) -> list[int]:
    """Phantom seeds of ``n`` evaluation sequences from the training split's dataset seed.

    ``split``: ``"heldout"`` (`HELDOUT_DATASET_SEED`) or ``"train"`` (`TRAIN_DATASET_SEED`); the seeds
    come after the ones the frame-level held-out set uses, so the two never share a sequence.
    """
    from UltramotionIGTLib.tools.phantom import sequence_seeds
    from UltramotionIGTLib.tools.training.common import HELDOUT_DATASET_SEED, TRAIN_DATASET_SEED

    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', not {split!r}")
    base = HELDOUT_DATASET_SEED if split == "heldout" else TRAIN_DATASET_SEED
    # offset past the 25 (heldout_set) / 240 (training pool) sequences those seeds already give
    offset = 25 if split == "heldout" else 240
    return [int(s) for s in sequence_seeds(base, offset + n)[offset:]]


def _match_rows(frame: FrameLog) -> np.ndarray:
    """Per ground-truth row, the result row it is matched to (-1: none): same class, IoU >= 0.3."""
    from scipy.optimize import linear_sum_assignment

    from UltramotionIGTLib.tools.metrics import box_iou_np

    out = np.full(len(frame.gt_ids), -1, dtype=np.int64)
    if len(frame.gt_ids) == 0 or len(frame.labels) == 0:
        return out
    iou = box_iou_np(frame.gt_boxes.astype(np.float64), frame.boxes.astype(np.float64))
    iou = np.where(frame.gt_labels[:, None] == frame.labels[None, :], iou, 0.0)
    rows, cols = linear_sum_assignment(-iou)
    for r, c in zip(rows, cols, strict=True):
        if iou[r, c] >= MATCH_IOU:
            out[r] = c
    return out


def run_sequence(pipeline: Any, stream: Any, use_pose: bool = True) -> SequenceLog:
    """Every frame of ``stream`` through ``pipeline`` (reset first), logged for `evaluate_logs`."""
    from UltramotionIGTLib.tools.evaluate import _class_map

    cmap = _class_map(pipeline.class_names)
    to_phantom = {det: c for c, det in enumerate(cmap)}
    spacing = (stream.config.spacing_mm, stream.config.spacing_mm)
    pipeline.reset()
    tracker = pipeline.tracker
    m = int(tracker.max_tracks) if tracker is not None else 0
    frames: list[FrameLog] = []
    t0 = time.perf_counter()
    for i in range(len(stream)):
        truth = stream.frame(i)
        pose = truth.info["image_to_world"] if use_pose else None
        packet = pipeline.process_frame(truth.image, i, truth.timestamp, spacing=spacing, pose=pose)
        result = packet.to_host()
        valid = packet.valid.cpu().numpy()
        vis = pipeline.last_visibility
        slots = (
            tracker.det_slot.cpu().numpy()[valid] if tracker is not None else np.zeros(len(result), np.int64)
        )
        log = FrameLog(
            gt_ids=truth.target_ids,
            gt_labels=truth.labels,
            gt_boxes=truth.boxes,
            gt_visible=truth.visible,
            events=list(truth.info["events"].get("active", [])),
            labels=np.asarray([to_phantom.get(int(lab), -1) for lab in result.labels], np.int64),
            boxes=result.boxes,
            confidences=result.scores,
            track_ids=result.track_ids,
            states=result.states,
            scores=result.visibility,
            slots=slots,
            slot_ids=tracker.ids.cpu().numpy().copy() if tracker is not None else np.zeros(0, np.int64),
            born=vis.born.cpu().numpy().copy(),
            slot_states=vis.slot_states.cpu().numpy().copy(),
        )
        log.match = _match_rows(log)
        frames.append(log)
    ms = 1000.0 * (time.perf_counter() - t0) / max(len(stream), 1)
    return SequenceLog(seed=int(stream.seed), frames=frames, max_tracks=m, ms_per_frame=ms)


# -- metrics -----------------------------------------------------------------------------------------


def single_frame_states(states: Sequence[int]) -> int:
    """Runs of exactly one frame between two other states in a state sequence (flicker)."""
    s = list(states)
    return sum(1 for i in range(1, len(s) - 1) if s[i] != s[i - 1] and s[i] != s[i + 1])


def _runs(values: np.ndarray) -> list[tuple[int, int, Any]]:
    """(start, length, value) of the runs of a 1-D array."""
    out = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i - start, values[start]))
            start = i
    return out


def _switch_distances(truth: np.ndarray, pred: np.ndarray, min_run: int = 3) -> list[int]:
    """For each change of ``truth`` (bool over frames) whose new run and previous run last at least
    ``min_run`` frames: frames to the nearest change of ``pred`` to the same value (a large number
    when there is none)."""
    runs = _runs(truth)
    changes_to = {True: [], False: []}
    for i in range(1, len(pred)):
        if pred[i] != pred[i - 1]:
            changes_to[bool(pred[i])].append(i)
    out = []
    for (_, prev_len, _), (start, length, value) in zip(runs[:-1], runs[1:], strict=True):
        if prev_len < min_run or length < min_run:
            continue
        candidates = changes_to[bool(value)]
        out.append(min((abs(c - start) for c in candidates), default=10**6))
    return out


def evaluate_logs(
    logs: Iterable[SequenceLog], states: list[list[np.ndarray]] | None = None
) -> dict[str, Any]:
    """Agreement, switch distances and flicker of the logged sequences (see the module docstring).

    ``states``: per sequence, per frame, (row states, slot states) to use instead of the logged ones
    (what `replay_states` returns for other thresholds).
    """
    from UltramotionIGTLib.core.packet import VISIBLE

    agree = pairs = false_visible = 0
    agree_view = pairs_view = 0
    distances: list[int] = []
    flicker_tracks = flicker_targets = 0
    per_event: dict[str, list[int]] = {}
    for s_index, log in enumerate(logs):
        ids = sorted({int(t) for f in log.frames for t in f.gt_ids})
        n = len(log.frames)
        truth = {t: np.zeros(n, bool) for t in ids}
        pred = {t: np.zeros(n, bool) for t in ids}
        slot_history: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(log.frames):
            row_states, slot_states = (f.states, f.slot_states) if states is None else states[s_index][i]
            for g, t in enumerate(f.gt_ids):
                truth[int(t)][i] = bool(f.gt_visible[g])
                r = f.match[g]
                pred[int(t)][i] = r >= 0 and int(row_states[r]) == VISIBLE
                agree_view += int(pred[int(t)][i] == truth[int(t)][i])
                pairs_view += 1
            matched = set(int(r) for r in f.match if r >= 0)
            false_visible += sum(
                1 for r in range(len(f.labels)) if r not in matched and int(row_states[r]) == VISIBLE
            )
            for slot, track in enumerate(f.slot_ids):
                if track >= 0:
                    slot_history.setdefault((slot, int(track)), []).append(int(slot_states[slot]))
            for kind in f.events or ["none"]:
                bucket = per_event.setdefault(kind, [0, 0])
                for t in f.gt_ids:
                    bucket[0] += int(truth[int(t)][i] == pred[int(t)][i])
                    bucket[1] += 1
        for t in ids:
            agree += int(np.sum(truth[t] == pred[t]))
            pairs += n
            distances += _switch_distances(truth[t], pred[t])
            flicker_targets += single_frame_states(pred[t].astype(int).tolist())
        flicker_tracks += sum(single_frame_states(h) for h in slot_history.values())
    total = pairs + false_visible
    dist = np.asarray(distances, dtype=np.int64)
    return {
        "agreement": agree / total if total else None,
        "pairs": pairs,
        "agreement_in_view": agree_view / (pairs_view + false_visible) if pairs_view else None,
        "pairs_in_view": pairs_view,
        "false_visible": false_visible,
        "switches": int(dist.size),
        "switches_within_3": float(np.mean(dist <= SWITCH_WINDOW)) if dist.size else None,
        "switch_frames_median": float(np.median(dist)) if dist.size else None,
        "switch_frames_max": int(dist.max()) if dist.size else None,
        "flicker_track_states": flicker_tracks,
        "flicker_target_visibility": flicker_targets,
        "agreement_by_event": {k: v[0] / v[1] for k, v in sorted(per_event.items()) if v[1]},
    }


# -- offline replay with other thresholds --------------------------------------------------------------


def replay_states(log: SequenceLog, config: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Re-run the state machine on a logged sequence with another `VisibilityConfig` (the scores and
    the tracker's decisions do not depend on the thresholds). ``config`` may carry ``quality_fn`` /
    ``consistency_fn`` (Nx9 scores -> N) to try other combinations. Returns per frame (row states,
    slot states)."""
    import torch

    from UltramotionIGTLib.core.visibility import SlotStates, advance_states

    m = log.max_tracks
    quality_fn = getattr(config, "quality_fn", None)
    consistency_fn = getattr(config, "consistency_fn", None)
    st = SlotStates.fresh(m + 1, "cpu")
    out = []
    for f in log.frames:
        scores = f.scores
        q = quality_fn(scores) if quality_fn is not None else scores[:, 7]
        c = consistency_fn(scores) if consistency_fn is not None else scores[:, 8]
        n = len(f.labels)
        slot = np.where(f.slots < m, f.slots, m)
        seen = np.zeros(m + 1, bool)
        conf = np.zeros(m + 1, np.float32)
        qual = np.zeros(m + 1, np.float32)
        cons = np.zeros(m + 1, np.float32)
        seen[slot] = True
        conf[slot], qual[slot], cons[slot] = f.confidences, q, c
        seen[m] = False
        born = np.zeros(m + 1, bool)
        born[:m] = f.born
        as_t = torch.from_numpy
        st = advance_states(st, as_t(seen), as_t(conf), as_t(qual), as_t(cons), as_t(born), config)
        inst = advance_states(
            SlotStates.fresh(n, "cpu"),
            torch.ones(n, dtype=torch.bool),
            as_t(f.confidences.astype(np.float32)),
            as_t(np.asarray(q, np.float32)),
            as_t(np.asarray(c, np.float32)),
            torch.ones(n, dtype=torch.bool),
            config,
        ).state.numpy()
        slot_states = st.state.numpy()
        rows = np.where(slot < m, slot_states[slot], inst)
        out.append((rows, slot_states[:m].copy()))
    return out


def load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline of the command's models (`tools.options`) on ``--device``."""
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.tools.options import resolve_model_source

    source = resolve_model_source(args)
    device = resolve_device(args.device)
    return Pipeline(*source.load(device), PipelineConfig(device=str(device)))


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import add_model_arguments

    parser.description = __doc__
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"))
    parser.add_argument("--sequences", type=int, default=HELDOUT_SEQUENCES)
    parser.add_argument("--frames", type=int, default=SEQUENCE_FRAMES, help="frames per sequence")
    parser.add_argument("--no-pose", action="store_true", help="do not give the pipeline the probe pose")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: no oversubscription on shared CPUs)",
    )
    parser.add_argument("--json", action="store_true")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.errors import InputFileError

    if args.sequences < 1 or args.frames < 2 or args.threads < 1:
        raise InputFileError("--sequences and --threads must be >= 1, --frames >= 2")
    import torch

    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args)
    logs = [
        run_sequence(pipeline, event_stream(seed, args.frames), use_pose=not args.no_pose)
        for seed in split_seeds(args.split, args.sequences)
    ]
    report = evaluate_logs(logs)
    report.update(
        split=args.split,
        seeds=[log.seed for log in logs],
        frames=sum(len(log.frames) for log in logs),
        pose=not args.no_pose,
        ms_per_frame=float(np.mean([log.ms_per_frame for log in logs])),
        config=asdict(pipeline.config.visibility),
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"visibility vs phantom ground truth ({args.split} split, seeds {report['seeds']}, "
        f"{report['frames']} frames, pose {'on' if report['pose'] else 'off'}):"
    )
    print(f"  agreement {report['agreement']:.4f} over {report['pairs']} (target, frame) pairs")
    print(
        f"  agreement {report['agreement_in_view']:.4f} over the {report['pairs_in_view']} pairs where the "
        "target is in the phantom (a needle before its insertion or after its withdrawal left out)"
    )
    print(f"  false VISIBLE rows {report['false_visible']}")
    if report["switches"]:
        print(
            f"  switches {report['switches']}: within {SWITCH_WINDOW} frames {report['switches_within_3']:.3f}, "
            f"median {report['switch_frames_median']:.1f}, max {report['switch_frames_max']}"
        )
    print(
        f"  single-frame states: {report['flicker_track_states']} (tracks), "
        f"{report['flicker_target_visibility']} (target visibility)"
    )
    print(
        "  agreement by event: " + ", ".join(f"{k} {v:.3f}" for k, v in report["agreement_by_event"].items())
    )
    return 0


__all__ = [
    "FrameLog",
    "SequenceLog",
    "evaluate_logs",
    "event_stream",
    "replay_states",
    "run_sequence",
    "single_frame_states",
    "split_seeds",
]
