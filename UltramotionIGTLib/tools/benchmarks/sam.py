"""``ultramotion-igt bench sam``: the official SamPredictor loop vs our batched box prompts, one run.

Same model weights, same frames, same boxes (the phantom's ground-truth boxes, or fixed boxes for a
recording). Official: ``SamPredictor.set_image`` (numpy RGB) then one ``predict(box=...)`` per box,
numpy out. Ours: ``SamSegmenter.set_torch_image`` on the device tensor, then one batched
``predict_boxes`` call for all boxes, device tensors out (then one host copy, as the pipeline does).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from UltramotionIGTLib.tools.benchmarks.common import (
    add_model_arguments,
    device_name,
    device_sync,
    load_frames,
    load_models,
    table,
    temp_dir,
    timed,
)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ultramotion-igt bench sam", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--boxes", type=int, default=8, help="box prompts per frame (8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))

    import torch
    from segment_anything import SamPredictor

    from UltramotionIGTLib.core.device import resolve_device

    device = resolve_device(args.device)
    sync = device_sync(device)
    frames, source = load_frames(args, args.frames + args.warmup)
    with temp_dir() as tmp:
        _, segmenter, models = load_models(args, device, Path(tmp))
    predictor = SamPredictor(segmenter.model)
    rng = np.random.default_rng(0)
    official, ours = [], []
    for i, frame in enumerate(frames):
        h, w = frame.shape[:2]
        xy = rng.uniform(0, 0.7, (args.boxes, 2)) * (w, h)
        wh = rng.uniform(0.1, 0.3, (args.boxes, 2)) * (w, h)
        boxes = np.concatenate([xy, np.minimum(xy + wh, (w, h))], axis=1).astype(np.float32)
        rgb = np.repeat(frame[..., None], 3, axis=2)

        def run_official(rgb=rgb, boxes=boxes):
            predictor.set_image(rgb)
            for box in boxes:
                predictor.predict(box=box, multimask_output=False)

        def run_ours(frame=frame, boxes=boxes):
            with torch.inference_mode():
                image = torch.from_numpy(frame).to(device)
                segmenter.set_torch_image(image)
                out = segmenter.predict_boxes(torch.from_numpy(boxes).to(device))
                out.masks.cpu()

        a, b = timed(run_official, sync), timed(run_ours, sync)
        if i >= args.warmup:
            official.append(a)
            ours.append(b)
    res = {
        "device": device_name(device),
        "models": models,
        "frames": source,
        "boxes_per_frame": args.boxes,
        "official_ms": {"p50": float(np.median(official)), "mean": float(np.mean(official))},
        "batched_ms": {"p50": float(np.median(ours)), "mean": float(np.mean(ours))},
    }
    res["speedup"] = res["official_ms"]["p50"] / res["batched_ms"]["p50"]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"device: {res['device']}\nmodels: {models}\nframes: {source}, {args.frames} measured, "
        f"{args.boxes} boxes per frame\n"
    )
    print(
        table(
            ["path", "p50 ms / frame", "mean ms / frame"],
            [
                ["official SamPredictor loop", res["official_ms"]["p50"], res["official_ms"]["mean"]],
                ["batched predict_boxes", res["batched_ms"]["p50"], res["batched_ms"]["mean"]],
            ],
        )
    )
    print(f"\nofficial / batched: {res['speedup']:.2f}x")
    return 0
