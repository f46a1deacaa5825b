"""Train the small demo D-FINE detector (vessel, needle) on the synthetic phantom.

``ultramotion-igt train detector --out DIR [--steps N] [--batch-size B] [--lr LR] [--device D]
[--seed S] [--checkpoint-every N] [--threads T] [--heldout-frames N] [--no-resume] [--no-progress]``

What the model sees is exactly what inference feeds it: phantom frames (`PhantomFramePool`, a pure
function of the step) go through `detector.preprocess_frames` with the folder's `Preprocessing`.
Labels are what transformers' D-FINE loss expects (``class_labels`` int64, ``boxes`` cxcywh
normalised to 0..1), and the loss is transformers' D-FINE loss built once with our sync-free
`HungarianMatcher` (`DFineCriterion`; nothing of transformers is patched). AdamW with linear
warm-up and cosine decay, gradient clipping, an exponential moving average (EMA) of the weights
that is what gets shipped. Process-wide settings the run changes (threads, determinism, RNG) are
restored on return (`restores_torch_globals`).

Every ``checkpoint_every`` steps the full state (model, EMA, optimiser, scheduler, loss history,
torch RNG) goes to ``DIR/training-state.pt``; a rerun with the same ``--out`` resumes from it and,
because batches depend on the step only, ends with the same weights as an uninterrupted run.
At the end the EMA model is written as an HF folder (`save_detector_folder`) into ``DIR`` together
with ``training.json`` (arguments, environment, loss summary, held-out AP50 per class).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.detector import (
    DFineDetector,
    Preprocessing,
    preprocess_frames,
    save_detector_folder,
    small_dfine_config,
)
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.tools.metrics import average_precision
from UltramotionIGTLib.tools.phantom import PhantomDataset, PhantomFrame
from UltramotionIGTLib.tools.training.common import (
    DEMO_IMAGE_SIZE,
    HELDOUT_DATASET_SEED,
    TRAIN_DATASET_SEED,
    TRAIN_SEQUENCES,
    PhantomFramePool,
    TrainingState,
    add_training_arguments,
    cosine_lr,
    environment_record,
    heldout_set,
    load_training_state,
    restores_torch_globals,
    save_training_state,
    seed_everything,
    training_kwargs,
    write_json,
)
from UltramotionIGTLib.tools.training.matcher import DFineCriterion

__all__ = [
    "DEMO_DETECTOR_CONFIG",
    "configure",
    "demo_detector_config",
    "detector_ap50",
    "frames_to_inputs",
    "recalibrate_batchnorm",
    "run",
    "train_detector",
]

#: `small_dfine_config` arguments of the shipped demo detector (overridable through ``model_kwargs``).
DEMO_DETECTOR_CONFIG: dict[str, Any] = {
    "num_queries": 30,
    "decoder_layers": 3,
    "d_model": 64,
    "ffn_dim": 128,
    "attention_heads": 4,
    "stem_channels": 8,
    "stage_mid_channels": (8, 16, 24, 32),
    "stage_out_channels": (24, 48, 96, 128),
    "feature_strides": (16, 32),
    "num_denoising": 30,
}

#: the pipeline's defaults (`pipeline.PipelineConfig`) at which held-out AP50 is reported
PIPELINE_SCORE_THRESHOLD = 0.3
PIPELINE_MAX_PER_CLASS = 4
PIPELINE_MAX_PROMPTS = 8
PIPELINE_NMS_IOU = 0.6


def demo_detector_config(**overrides: Any) -> Any:
    """The demo detector's `DFineConfig` (``DEMO_DETECTOR_CONFIG`` updated with ``overrides``)."""
    kwargs = {**DEMO_DETECTOR_CONFIG, **overrides}
    return small_dfine_config(CLASS_NAMES, DEMO_IMAGE_SIZE, **kwargs)


def frames_to_inputs(
    frames: Sequence[PhantomFrame], preprocessing: Preprocessing, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Phantom frames -> (Bx3xhxw model input on ``device``, transformers D-FINE labels).

    The input is what `DFineDetector` feeds at inference (`preprocess_frames`). Labels per frame:
    ``class_labels`` T int64 and ``boxes`` Tx4 float32 cxcywh normalised by the frame's width/height.
    """
    images = torch.from_numpy(np.stack([f.image for f in frames]))[:, None]  # Bx1xHxW uint8
    pixel_values = preprocess_frames(images, preprocessing, device=device)
    labels = []
    for f in frames:
        h, w = f.image.shape
        b = np.asarray(f.boxes, np.float32).reshape(-1, 4)
        cxcywh = np.stack(
            [
                (b[:, 0] + b[:, 2]) / (2 * w),
                (b[:, 1] + b[:, 3]) / (2 * h),
                (b[:, 2] - b[:, 0]) / w,
                (b[:, 3] - b[:, 1]) / h,
            ],
            axis=-1,
        ).astype(np.float32)
        labels.append(
            {
                "class_labels": torch.as_tensor(np.asarray(f.labels, np.int64)).to(device),
                "boxes": torch.from_numpy(cxcywh.reshape(-1, 4)).to(device),
            }
        )
    return pixel_values, labels


def detector_ap50(
    detector: DFineDetector,
    dataset: PhantomDataset,
    *,
    score_threshold: float = PIPELINE_SCORE_THRESHOLD,
    max_per_class: int | None = PIPELINE_MAX_PER_CLASS,
    nms_iou: float = PIPELINE_NMS_IOU,
    max_prompts: int | None = PIPELINE_MAX_PROMPTS,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Held-out AP at IoU ``iou_threshold`` per class name, at the pipeline's detection settings.

    Each frame runs through ``detector.run_inference_torch``; the detections kept are those the
    pipeline prompts SAM with (`pipeline.select_prompts`: the top ``max_prompts`` over all classes,
    at most ``max_per_class`` per class, with score > ``score_threshold``, fast NMS at ``nms_iou``).
    ``score_threshold=0, max_prompts=None`` ranks every detection instead (the model's raw AP).
    Returns ``{class_name: AP}`` (host floats).
    """
    from UltramotionIGTLib.core.pipeline import select_prompts

    names = detector.class_names
    preds: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in range(len(names))}
    gts: dict[int, list[np.ndarray]] = {c: [] for c in range(len(names))}
    for i in range(len(dataset)):
        det = detector.run_inference_torch(dataset.images[i])
        if max_prompts is None:
            boxes, scores, labels = det.boxes, det.scores, det.labels
            valid = scores > score_threshold
        else:
            boxes, scores, labels, valid = select_prompts(
                det.boxes, det.scores, det.labels, max_prompts, score_threshold, nms_iou, max_per_class
            )
        boxes_np = boxes.detach().cpu().numpy()
        scores_np = scores.detach().cpu().numpy()
        labels_np = labels.detach().cpu().numpy()
        valid_np = valid.detach().cpu().numpy()
        gt_boxes = np.asarray(dataset.boxes[i], np.float32).reshape(-1, 4)
        gt_labels = np.asarray(dataset.labels[i]).reshape(-1)
        for c in range(len(names)):
            keep = valid_np & (labels_np == c)
            preds[c].append((boxes_np[keep], scores_np[keep]))
            gts[c].append(gt_boxes[gt_labels == c])
    return {
        names[c]: average_precision(preds[c], gts[c], iou_threshold=iou_threshold) for c in range(len(names))
    }


class _EMA:
    """Exponential moving average of a model's floating-point state (decay ramps up with updates)."""

    def __init__(self, model: torch.nn.Module, decay: float, tau: float) -> None:
        self.decay = decay
        self.tau = tau
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.state[k].copy_(v)


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module,
    pool: PhantomFramePool,
    preprocessing: Preprocessing,
    device: torch.device,
    batches: int = 40,
    batch_size: int = 8,
) -> None:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over ``batches``
    phantom batches (steps 10**6.. of ``pool``, never used for training), in train mode, no gradients.

    The running statistics accumulated during training (and their EMA) do not match the weights
    the run ends with; without this step the model in eval mode detects nothing (held-out AP50 0.0
    in the first full run, 0.99/0.95 after it). Leaves the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for i in range(batches):
        pixel_values, _ = frames_to_inputs(pool.batch(10**6 + i, batch_size), preprocessing, device)
        model(pixel_values=pixel_values)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _history_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    if not history:
        return {}
    losses = np.asarray([h["loss"] for h in history], np.float64)
    window = max(1, min(100, len(losses) // 10 or 1))
    return {
        "first_loss": float(losses[0]),
        f"mean_loss_first_{window}": float(losses[:window].mean()),
        f"mean_loss_last_{window}": float(losses[-window:].mean()),
        "min_loss": float(losses.min()),
        "logged_steps": len(history),
    }


@restores_torch_globals
def train_detector(
    out_dir: str | Path,
    steps: int = 4000,
    batch_size: int = 8,
    lr: float = 6e-4,
    device: str = "cpu",
    seed: int = 0,
    checkpoint_every: int = 200,
    resume: bool = True,
    progress: bool = True,
    *,
    threads: int | None = 1,
    warmup: int = 200,
    weight_decay: float = 1e-4,
    clip_norm: float = 0.5,
    ema_decay: float = 0.999,
    ema_tau: float = 300.0,
    heldout_frames: int = 200,
    pool_sequences: int = TRAIN_SEQUENCES,
    repeat_batch: bool = False,
    stop_after: int | None = None,
    bn_batches: int = 40,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Train the demo D-FINE and write the HF folder + ``training.json`` into ``out_dir``.

    ``steps`` optimiser steps of ``batch_size`` phantom frames (256x256) each; ``model_kwargs``
    override `DEMO_DETECTOR_CONFIG` (e.g. a tiny config for tests). ``device``: auto | cpu | cuda.
    ``threads`` sets ``torch.set_num_threads`` for the run (None: leave it; process-wide settings are
    restored on return, see `restores_torch_globals`). Resumes from
    ``out_dir/training-state.pt`` when ``resume`` (the arguments must match). ``repeat_batch``
    trains on the batch of step 0 every step (an overfit check). ``heldout_frames=0`` skips the
    held-out evaluation. ``stop_after`` simulates an interruption: the run stops once that many steps
    are done, keeping only the periodic checkpoints, and returns ``{"stopped_at": step}``.
    Returns the ``training.json`` record.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
    from transformers import DFineForObjectDetection

    out = Path(out_dir)
    if threads is not None:
        torch.set_num_threads(int(threads))
    target = resolve_device(device)
    args = {
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "warmup": int(warmup),
        "weight_decay": float(weight_decay),
        "clip_norm": float(clip_norm),
        "ema_decay": float(ema_decay),
        "ema_tau": float(ema_tau),
        "pool_sequences": int(pool_sequences),
        "repeat_batch": bool(repeat_batch),
        "model": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in {**DEMO_DETECTOR_CONFIG, **model_kwargs}.items()
        },
    }
    seed_everything(seed)
    config = demo_detector_config(**model_kwargs)
    model = DFineForObjectDetection(config).to(target)
    preprocessing = Preprocessing(input_size=(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "norm" in name or "bn" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lr(1.0, steps, warmup=warmup))
    ema = _EMA(model, ema_decay, ema_tau)
    history: list[dict[str, float]] = []
    start = 0
    wall_before = 0.0
    state = load_training_state(out) if resume else None
    if state is not None:
        saved = {k: v for k, v in state.args.items() if k != "wall_s"}
        if saved != args:
            from UltramotionIGTLib.errors import CheckpointError

            raise CheckpointError(
                f"{out / 'training-state.pt'} was written with other arguments ({saved}); "
                "use the same arguments, another --out, or --no-resume"
            )
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer["optimizer"])
        ema.state = {k: v.to(target) for k, v in state.optimizer["ema"].items()}
        ema.updates = int(state.optimizer["ema_updates"])
        if state.scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        history = state.history
        start = state.step
        wall_before = float(state.args.get("wall_s", 0.0))
    pool = PhantomFramePool(n_sequences=pool_sequences)

    def checkpoint(step: int, wall: float) -> None:
        save_training_state(
            out,
            TrainingState(
                step=step,
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                optimizer={
                    "optimizer": optimizer.state_dict(),
                    "ema": {k: v.detach().cpu() for k, v in ema.state.items()},
                    "ema_updates": ema.updates,
                },
                scheduler=scheduler.state_dict(),
                history=history,
                args={**args, "wall_s": wall},
            ),
        )

    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train detector", unit="step", dynamic_ncols=True)
    model.train()
    running = None
    criterion = DFineCriterion(config, target, use_gpu_match=True)
    for step in range(start, steps):
        frames = pool.batch(0 if repeat_batch else step, batch_size)
        pixel_values, labels = frames_to_inputs(frames, preprocessing, target)
        # the inner DFineModel: labels make its denoising queries; the loss is ours (see DFineCriterion)
        loss, _ = criterion(model.model(pixel_values, labels=labels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        history.append({"step": step + 1, "loss": value, "lr": float(optimizer.param_groups[0]["lr"])})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", avg=f"{running:.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1, wall_before + time.perf_counter() - t0)
        if stop_after is not None and step + 1 >= stop_after:
            if bar is not None:
                bar.close()
            return {"stopped_at": step + 1}
    if bar is not None:
        bar.close()
    wall = wall_before + time.perf_counter() - t0

    model.load_state_dict(ema.state)
    recalibrate_batchnorm(model, pool, preprocessing, target, batches=bn_batches, batch_size=batch_size)
    save_detector_folder(model, out, preprocessing=preprocessing)
    record: dict[str, Any] = {
        "command": "ultramotion-igt train detector " + " ".join(_cli_args(out, args, target, threads)),
        "args": args,
        "classes": list(CLASS_NAMES),
        "data": {
            "image_size": DEMO_IMAGE_SIZE,
            "train_dataset_seed": TRAIN_DATASET_SEED,
            "train_sequences": int(pool_sequences),
            "heldout_dataset_seed": HELDOUT_DATASET_SEED,
            "heldout_frames": int(heldout_frames),
        },
        "steps": int(steps),
        "frames_seen": int(steps) * int(batch_size),
        "environment": environment_record(target, wall),
        "steps_per_s": round(steps / max(wall, 1e-9), 3),
        "loss": _history_summary(history),
        "batchnorm_recalibration": {
            "batches": int(bn_batches),
            "batch_size": int(batch_size),
            "pool_steps_from": 10**6,
        },
    }
    if heldout_frames > 0:
        detector = DFineDetector(model, preprocessing=preprocessing, device=target)
        data = heldout_set(heldout_frames)
        record["heldout_ap50"] = detector_ap50(detector, data)
        record["heldout_ap50_raw"] = detector_ap50(detector, data, score_threshold=0.0, max_prompts=None)
        record["heldout_ap50_settings"] = {
            "score_threshold": PIPELINE_SCORE_THRESHOLD,
            "max_per_class": PIPELINE_MAX_PER_CLASS,
            "max_prompts": PIPELINE_MAX_PROMPTS,
            "nms_iou": PIPELINE_NMS_IOU,
            "iou_threshold": 0.5,
        }
    write_json(out / "training.json", record)
    return record


def _cli_args(out: Path, args: dict[str, Any], device: torch.device, threads: int | None) -> list[str]:
    parts = [
        f"--out {out}",
        f"--steps {args['steps']}",
        f"--batch-size {args['batch_size']}",
        f"--lr {args['lr']:g}",
        f"--device {device.type}",
        f"--seed {args['seed']}",
    ]
    if threads is not None:
        parts.append(f"--threads {threads}")
    return parts


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the small demo D-FINE (vessel, needle) on the synthetic phantom; writes the EMA model as a "
        "Hugging Face folder and training.json (held-out AP50 per class) into --out. Rerunning with the "
        "same --out resumes from training-state.pt."
    )
    add_training_arguments(parser, steps=4000, batch_size=8, lr=6e-4, checkpoint_every=200)


def run(ns: argparse.Namespace) -> int:
    record = train_detector(Path(ns.out), **training_kwargs(ns))
    ap = record.get("heldout_ap50", {})
    print(
        f"wrote {ns.out} in {record['environment']['wall_s']} s; held-out AP50: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ap.items())
    )
    return 0
