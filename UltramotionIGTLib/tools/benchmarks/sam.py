"""``ultramotion-igt bench sam``: the official SamPredictor loop vs our batched box prompts, one run.

Same model weights, same frames, same boxes (``--boxes`` random boxes per frame, each side 10-30 %
of the frame's, from a fixed seed). Official: ``SamPredictor.set_image`` (numpy RGB) then one
``predict(box=...)`` per box, numpy out. Ours: ``SamSegmenter.set_torch_image`` on the device
tensor, then one batched ``predict_boxes`` call for all boxes, device tensors out (then one host
copy, as the pipeline does). Prints p50 and mean milliseconds per frame and their ratio.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from UltramotionIGTLib.tools.benchmarks.common import (
    add_bench_arguments,
    device_name,
    device_sync,
    load_frames,
    table,
    timed,
)


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import describe_from_doc, positive_int

    describe_from_doc(parser, __doc__)
    add_bench_arguments(parser)
    parser.add_argument(
        "--boxes", type=positive_int, default=8, metavar="N", help="random box prompts per frame (default 8)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import torch
    from segment_anything import SamPredictor

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.tools.options import resolve_model_source

    source = resolve_model_source(args)
    device = resolve_device(args.device)
    sync = device_sync(device)
    frames, frames_source = load_frames(args, args.frames + args.warmup)
    _, segmenter = source.load(device)
    models = source.describe()
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
        "frames": frames_source,
        "boxes_per_frame": args.boxes,
        "official_ms": {"p50": float(np.median(official)), "mean": float(np.mean(official))},
        "batched_ms": {"p50": float(np.median(ours)), "mean": float(np.mean(ours))},
    }
    res["speedup"] = res["official_ms"]["p50"] / res["batched_ms"]["p50"]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(
        f"device: {res['device']}\nmodels: {models}\nframes: {frames_source}, {args.frames} measured, "
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
