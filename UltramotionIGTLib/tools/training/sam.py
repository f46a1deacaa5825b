"""``ultramotion-igt train sam``: the small demo SAM, trained end to end on phantom frames with box prompts.

What is trained: a `segment_anything.modeling.Sam` built by `build_sam_model` from a `SamConfig`
(``vit_t_demo`` by default: image encoder, prompt encoder and mask decoder, all from random weights).

Data: `PhantomFramePool` frames (dataset seed ``TRAIN_DATASET_SEED``), a pure function of the step, so
a resumed run sees exactly the batches of an uninterrupted one. Each ground-truth box becomes
``prompt_copies`` prompts, each with its own jitter (every edge moved by a normal offset of
``jitter_frac`` x the box side, at least ``jitter_min_px``; the jitter RNG is also a function of the
step), so the masks hold up under the imperfect boxes a detector gives.

Preprocessing is the inference path of `SamSegmenter.set_torch_image`: the same Pillow-exact
`resize_longest_side_uint8` on the device, gray replicated to RGB, then ``Sam.preprocess`` (normalise,
pad); boxes are scaled like `SamSegmenter.predict_boxes`. The decoder runs single-mask
(``multimask_output=False``), as the segmenter does by default.

Loss per prompt, on the mask logits upscaled to the frame size with ``Sam.postprocess_masks`` (the
needle is ~4 px wide at 256x256 and ~1 px in the 64x64 low-res logits, so supervision at full size
keeps it): binary cross-entropy + soft Dice, plus the MSE between the predicted IoU and the IoU of the
thresholded mask with the ground truth.

Outputs in ``out_dir``: ``training-state.pt`` every ``checkpoint_every`` steps (resume),
``sam_vit_t_demo.safetensors`` (`save_sam_checkpoint`, the config in its metadata) and
``training.json`` (arguments, wall time, environment, loss summary, held-out Dice with ground-truth
boxes from `sam_dice_with_gt_boxes`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.sam import (
    SamConfig,
    SamSegmenter,
    build_sam_model,
    get_sam_config,
    resize_longest_side_uint8,
    save_sam_checkpoint,
)
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.tools.metrics import dice
from UltramotionIGTLib.tools.phantom import PhantomFrame
from UltramotionIGTLib.tools.training.common import (
    CHECKPOINT_NAME,
    HELDOUT_DATASET_SEED,
    TRAIN_DATASET_SEED,
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

DEFAULT_MODEL_TYPE = "vit_t_demo"
WEIGHTS_NAME = "sam_vit_t_demo.safetensors"
REPORT_NAME = "training.json"
HELDOUT_FRAMES = 200
LOG_EVERY = 25


@dataclass(frozen=True)
class PromptJitter:
    """How ground-truth boxes are perturbed into training prompts.

    Every edge moves by N(0, sigma) pixels with sigma = max(``min_px``, ``frac`` x box side along that
    axis), clipped to 2.5 sigma; the box stays inside the frame and at least 2 px wide and tall.
    """

    frac: float = 0.1
    min_px: float = 1.0
    copies: int = 2


def jitter_boxes(
    boxes: np.ndarray, rng: np.random.Generator, image_hw: tuple[int, int], jitter: PromptJitter
) -> np.ndarray:
    """Mx4 float32 XYXY pixel boxes (host numpy) -> Mx4 float32 jittered copies (see `PromptJitter`)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0 or (jitter.frac <= 0 and jitter.min_px <= 0):
        return boxes.astype(np.float32)
    h, w = image_hw
    side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)  # M x (w, h)
    sigma = np.maximum(jitter.min_px, jitter.frac * side)[:, [0, 1, 0, 1]]
    noise = np.clip(rng.standard_normal(boxes.shape), -2.5, 2.5) * sigma
    out = boxes + noise
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, h)
    # keep a valid box: at least 2 px, inside the frame
    x1 = np.minimum(out[:, 0], out[:, 2])
    x2 = np.maximum(out[:, 0], out[:, 2])
    y1 = np.minimum(out[:, 1], out[:, 3])
    y2 = np.maximum(out[:, 1], out[:, 3])
    x2 = np.clip(np.maximum(x2, x1 + 2.0), 0.0, w)
    x1 = np.minimum(x1, x2 - 2.0)
    y2 = np.clip(np.maximum(y2, y1 + 2.0), 0.0, h)
    y1 = np.minimum(y1, y2 - 2.0)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def preprocess_images(
    model: torch.nn.Module, images: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxW uint8 frames (all the same size, on the model's device) -> (Bx3xSxS float encoder input,
    (h, w) resized input size), exactly as `SamSegmenter.set_torch_image` prepares one frame."""
    batch = []
    for image in images:
        resized = resize_longest_side_uint8(image[None], model.image_encoder.img_size)
        batch.append(model.preprocess(resized.expand(3, -1, -1)[None]))
    input_hw = (int(resized.shape[-2]), int(resized.shape[-1]))
    return torch.cat(batch, dim=0), input_hw


def scale_boxes(boxes: torch.Tensor, original_hw: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
    """Nx4 XYXY pixels of the frame -> Nx4 float32 in the resized input, as `SamSegmenter.predict_boxes`."""
    corners = boxes.to(torch.float64).reshape(-1, 2, 2)
    sx = input_hw[1] / original_hw[1]
    sy = input_hw[0] / original_hw[0]
    corners = torch.stack([corners[..., 0] * sx, corners[..., 1] * sy], dim=-1)
    return corners.reshape(-1, 4).to(torch.float32)


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-prompt losses, averaged: logits NxHxW, iou_pred N, gt NxHxW bool (same device).

    ``bce``: binary cross-entropy per pixel; ``dice``: 1 - soft Dice of sigmoid(logits); ``iou``:
    MSE between the predicted IoU and the IoU of (logits > 0) with the ground truth.
    """
    target = gt.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    prob = logits.sigmoid()
    inter = (prob * target).sum(dim=(1, 2))
    soft_dice = (2.0 * inter + 1.0) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
    with torch.no_grad():
        hard = logits > 0
        hard_inter = (hard & gt).sum(dim=(1, 2)).to(logits.dtype)
        union = (hard | gt).sum(dim=(1, 2)).to(logits.dtype)
        true_iou = hard_inter / union.clamp(min=1.0)
    iou = (iou_pred - true_iou) ** 2
    return {"bce": bce.mean(), "dice": (1.0 - soft_dice).mean(), "iou": iou.mean()}


def training_step_loss(
    model: torch.nn.Module,
    frames: Sequence[PhantomFrame],
    rng: np.random.Generator,
    jitter: PromptJitter,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Forward one batch of frames with jittered box prompts; returns the loss terms and ``loss``."""
    images = [torch.from_numpy(np.ascontiguousarray(f.image)).to(device) for f in frames]
    x, input_hw = preprocess_images(model, images)
    embeddings = model.image_encoder(x)
    image_pe = model.prompt_encoder.get_dense_pe()
    logits_all, iou_all, gt_all = [], [], []
    for b, frame in enumerate(frames):
        if len(frame.boxes) == 0:
            continue
        hw = (int(frame.image.shape[0]), int(frame.image.shape[1]))
        gt_boxes = np.repeat(np.asarray(frame.boxes, np.float32), jitter.copies, axis=0)
        prompts = torch.from_numpy(jitter_boxes(gt_boxes, rng, hw, jitter)).to(device)
        sparse, dense = model.prompt_encoder(
            points=None, boxes=scale_boxes(prompts, hw, input_hw), masks=None
        )
        low_res, iou = model.mask_decoder(
            image_embeddings=embeddings[b : b + 1],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits_all.append(model.postprocess_masks(low_res, input_hw, hw)[:, 0])
        iou_all.append(iou[:, 0])
        gt = torch.from_numpy(np.repeat(np.asarray(frame.masks, bool), jitter.copies, axis=0))
        gt_all.append(gt.to(device))
    if not logits_all:  # no target in the whole batch: a zero loss that still touches the graph
        zero = embeddings.sum() * 0.0
        return {"loss": zero, "bce": zero, "dice": zero, "iou": zero}
    terms = mask_losses(torch.cat(logits_all), torch.cat(iou_all), torch.cat(gt_all))
    terms["loss"] = terms["bce"] + terms["dice"] + terms["iou"]
    return terms


def sam_dice_with_gt_boxes(segmenter: SamSegmenter, dataset: Any) -> dict[str, Any]:
    """Held-out SAM quality with ground-truth box prompts (no jitter), one decoder call per frame.

    ``dataset``: a `synthetic.PhantomDataset` (``images`` NxHxW uint8, ``boxes[i]`` Mix4 XYXY pixels,
    ``labels[i]``, ``masks[i]`` MixHxW bool). Returns ``{"mean_dice": mean over all targets,
    "per_class": {name: mean Dice}, "counts": {name: targets}, "n_frames", "n_targets"}`` (host floats).
    """
    per_class: dict[str, list[float]] = {name: [] for name in CLASS_NAMES}
    for i in range(len(dataset)):
        boxes = np.asarray(dataset.boxes[i], np.float32)
        if boxes.shape[0] == 0:
            continue
        segmenter.set_torch_image(
            torch.from_numpy(np.ascontiguousarray(dataset.images[i])).to(segmenter.device)
        )
        out = segmenter.predict_boxes(torch.from_numpy(boxes).to(segmenter.device), as_numpy=True)
        for mask, gt, label in zip(out.masks, dataset.masks[i], dataset.labels[i], strict=True):
            per_class[CLASS_NAMES[int(label)]].append(dice(mask, gt))
    all_scores = [s for scores in per_class.values() for s in scores]
    return {
        "mean_dice": float(np.mean(all_scores)) if all_scores else float("nan"),
        "per_class": {k: (float(np.mean(v)) if v else float("nan")) for k, v in per_class.items()},
        "counts": {k: len(v) for k, v in per_class.items()},
        "n_frames": len(dataset),
        "n_targets": len(all_scores),
    }


def _summarise(history: list[dict[str, float]]) -> dict[str, Any]:
    if not history:
        return {}
    first, last = history[0], history[-1]
    return {
        "first": first,
        "last": last,
        "min_loss": min(h["loss"] for h in history),
        "log_every": LOG_EVERY,
    }


@restores_torch_globals
def train_sam(
    out_dir: str | Path,
    steps: int = 6000,
    batch_size: int = 4,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checkpoint_every: int = 250,
    resume: bool = True,
    progress: bool = True,
    model_type: str | SamConfig = DEFAULT_MODEL_TYPE,
    threads: int | None = None,
    jitter: PromptJitter | None = None,
    weight_decay: float = 0.01,
    warmup: int = 200,
    heldout_frames: int = HELDOUT_FRAMES,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train the small SAM; write the checkpoint, ``training.json``; return the report dict.

    ``out_dir``: created if needed; an existing ``training-state.pt`` there is resumed when
    ``resume`` (the arguments must match the saved ones). ``device``: ``cpu``/``cuda``/``auto``.
    ``threads``: torch CPU threads for the run (None leaves torch's setting; process-wide settings are
    restored on return, see `restores_torch_globals`). ``stop_at``: stop after this step
    with a checkpoint, as if interrupted (for tests); the final files are written only when all
    ``steps`` are done (then the report is returned, else ``{"stopped_at": step}``).
    ``heldout_frames``: frames of `heldout_set` for the final Dice (0 skips it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(int(threads))
    config = get_sam_config(model_type)
    jitter = jitter or PromptJitter()
    dev = resolve_device(device)
    args = {
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "weight_decay": float(weight_decay),
        "warmup": int(warmup),
        "jitter": {"frac": jitter.frac, "min_px": jitter.min_px, "copies": jitter.copies},
        "model_type": config.name,
        "sam_config": config.to_dict(),
        "train_dataset_seed": TRAIN_DATASET_SEED,
    }

    seed_everything(seed)
    model = build_sam_model(config).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lr(1.0, steps, warmup=warmup))
    history: list[dict[str, float]] = []
    start = 0
    previous_wall = 0.0
    state = load_training_state(out_dir) if resume else None
    if state is not None:
        saved = {k: v for k, v in state.args.items() if k != "wall_s"}
        if saved != args:
            changed = sorted(k for k in set(saved) | set(args) if saved.get(k) != args.get(k))
            raise CheckpointError(
                f"{out_dir / CHECKPOINT_NAME} was saved with other arguments ({', '.join(changed)}): "
                "rerun with the same ones, pass --no-resume, or choose another --out"
            )
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        if state.scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        history = state.history
        start = state.step
        previous_wall = float(state.args.get("wall_s", 0.0))

    pool = PhantomFramePool()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train sam", unit="step", dynamic_ncols=True)
    sums = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "iou": 0.0}
    count = 0
    last = stop_at if stop_at is not None else steps
    step = start
    for step in range(start, min(steps, last)):
        frames = pool.batch(step, batch_size)
        rng = np.random.default_rng([int(seed), 0x5A3, step])
        terms = training_step_loss(model, frames, rng, jitter, dev)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite SAM training loss at step {step}: {values}")
        for k in sums:
            sums[k] += values[k]
        count += 1
        # flush the running means at log points and at checkpoints (so a resumed run logs the same)
        if (step + 1) % LOG_EVERY == 0 or (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, **{k: round(v / count, 5) for k, v in sums.items()}})
            sums = dict.fromkeys(sums, 0.0)
            count = 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", dice=f"{values['dice']:.3f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps or done == last:
            wall = previous_wall + time.perf_counter() - t0
            save_training_state(
                out_dir,
                TrainingState(
                    step=done,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    history=history,
                    args={**args, "wall_s": wall},
                ),
            )
    if bar is not None:
        bar.close()
    if stop_at is not None and stop_at < steps:
        return {"stopped_at": min(stop_at, steps)}

    wall = previous_wall + time.perf_counter() - t0
    model.eval()
    weights = save_sam_checkpoint(
        model,
        out_dir / WEIGHTS_NAME,
        config,
        metadata={"trained_by": "ultramotion-igt train sam", "steps": str(steps), "seed": str(seed)},
    )
    report: dict[str, Any] = {
        "model": "sam",
        "model_type": config.name,
        "sam_config": config.to_dict(),
        "weights": weights.name,
        "args": {k: v for k, v in args.items() if k != "sam_config"} | {"checkpoint_every": checkpoint_every},
        "steps": steps,
        "train_dataset_seed": TRAIN_DATASET_SEED,
        "heldout_dataset_seed": HELDOUT_DATASET_SEED,
        "environment": environment_record(dev, wall),
        "steps_per_s": round(steps / wall, 3) if wall > 0 else None,
        "loss": _summarise(history),
        "history": history,
    }
    if heldout_frames > 0:
        t_eval = time.perf_counter()
        segmenter = SamSegmenter.from_checkpoint(weights, device=dev)
        report["heldout"] = sam_dice_with_gt_boxes(segmenter, heldout_set(heldout_frames))
        report["heldout"]["eval_s"] = round(time.perf_counter() - t_eval, 1)
    write_json(out_dir / REPORT_NAME, report)
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the small demo SAM (vit_t_demo) on the synthetic phantom with jittered ground-truth box "
        "prompts; writes sam_vit_t_demo.safetensors and training.json (held-out Dice with ground-truth "
        "boxes) into --out. Rerunning with the same --out resumes from training-state.pt."
    )
    add_training_arguments(
        parser, steps=6000, batch_size=4, lr=1e-3, checkpoint_every=250, heldout_frames=HELDOUT_FRAMES
    )


def run(a: argparse.Namespace) -> int:
    """``ultramotion-igt train sam --out DIR [...]``; prints the held-out Dice. Returns 0."""
    report = train_sam(a.out, **training_kwargs(a))
    env = report["environment"]
    print(
        f"wrote {Path(a.out) / WEIGHTS_NAME} ({report['steps']} steps, {env['wall_s']} s on {env['device']})"
    )
    if "heldout" in report:
        h = report["heldout"]
        per = ", ".join(f"{k} {v:.3f}" for k, v in h["per_class"].items())
        print(f"held-out SAM Dice with ground-truth boxes: {h['mean_dice']:.3f} ({per})")
    return 0


__all__ = [
    "PromptJitter",
    "configure",
    "jitter_boxes",
    "mask_losses",
    "preprocess_images",
    "run",
    "sam_dice_with_gt_boxes",
    "scale_boxes",
    "train_sam",
    "training_step_loss",
]
