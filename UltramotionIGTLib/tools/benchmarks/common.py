"""Shared benchmark plumbing: options, frame sources, timing, tables."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The model source (`options.add_model_arguments`, with ``--random-models``), ``--device`` and the
    frames of ``bench pipeline`` and ``bench sam``."""
    from UltramotionIGTLib.tools.options import add_model_arguments, non_negative_int, positive_int

    add_model_arguments(parser, random_models=True)
    group = parser.add_argument_group("frames")
    group.add_argument(
        "--input", metavar="FILE", help="recording to take frames from (default: the demo phantom sequence)"
    )
    group.add_argument(
        "--frames", type=positive_int, default=40, metavar="N", help="measured frames per path (default 40)"
    )
    group.add_argument(
        "--warmup",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="unmeasured warm-up frames per path (default 3)",
    )
    group.add_argument(
        "--frame-size",
        type=positive_int,
        default=None,
        metavar="PX",
        help="resize every frame to PX x PX (bilinear) before the run, e.g. 1024 for SAM's input size "
        "(default: the frames' own size)",
    )


def load_frames(args: argparse.Namespace, n: int) -> tuple[list[np.ndarray], str]:
    """``n`` frames from ``--input`` (cycled) or the demo phantom, resized to ``--frame-size`` when given;
    and a description naming the source and the size."""
    if args.input:
        from UltramotionIGTLib.io import read_sequence

        seq = read_sequence(args.input)
        frames = [seq.frames[i % seq.n_frames] for i in range(n)]
        name = str(args.input)
    else:
        from UltramotionIGTLib.tools.demo import demo_sequence

        seq, _ = demo_sequence(n)
        frames, name = list(seq.frames), "demo phantom"
    size = getattr(args, "frame_size", None)
    if size is not None:
        import torch
        import torch.nn.functional as F

        def resized(frame: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(frame)).float()
            t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            t = t[0, 0] if frame.ndim == 2 else t[0].permute(1, 2, 0)
            if frame.dtype == np.uint8:
                return t.round().clamp(0, 255).to(torch.uint8).numpy()
            return t.numpy().astype(frame.dtype)

        frames = [resized(f) for f in frames]
        name += f" resized to {size}x{size}"
    h, w = frames[0].shape[:2]
    return frames, f"{name} ({w}x{h})"


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Milliseconds for one call of ``fn`` (``sync`` waits for the device before reading the clock)."""
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000.0


def device_sync(device: Any) -> Callable[[], None]:
    import torch

    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def device_name(device: Any) -> str:
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (numbers formatted to 2 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
