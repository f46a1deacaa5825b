"""Shared benchmark plumbing: model resolution, frame sources, timing tables."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pack", default=None, help="model pack (default: the shipped demo pack)")
    parser.add_argument("--detector", default=None, help="D-FINE folder (instead of a pack)")
    parser.add_argument("--sam", default=None, help="SAM checkpoint (instead of a pack)")
    parser.add_argument("--sam-type", default="auto")
    parser.add_argument(
        "--random-models", action="store_true", help="small random-weight models (no pack needed)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--input", default=None, help="recording to take frames from (default: demo phantom)")
    parser.add_argument("--frames", type=int, default=40, help="measured frames per path (40)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured warm-up frames per path (3)")


def load_models(args: argparse.Namespace, device: Any, tmp: Path) -> tuple[Any, Any, str]:
    """(detector, segmenter, description) from --detector/--sam, --random-models or the pack."""
    from UltramotionIGTLib.core.detector import DFineDetector, write_random_detector
    from UltramotionIGTLib.core.sam import SamSegmenter, write_random_sam_checkpoint

    if args.detector or args.sam:
        if not (args.detector and args.sam):
            from UltramotionIGTLib.errors import InputFileError

            raise InputFileError("give both --detector and --sam (or a --pack)")
        return (
            DFineDetector.from_pretrained(args.detector, device=device),
            SamSegmenter.from_checkpoint(args.sam, model_type=args.sam_type, device=device),
            f"{args.detector} + {args.sam}",
        )
    if args.random_models:
        det = write_random_detector(tmp / "detector")
        sam = write_random_sam_checkpoint(tmp / "sam.safetensors")
        return (
            DFineDetector.from_pretrained(det, device=device),
            SamSegmenter.from_checkpoint(sam, device=device),
            "random-weight test models",
        )
    from UltramotionIGTLib.models.packs import default_pack, load_pack

    pack = Path(args.pack) if args.pack else default_pack()
    detector, segmenter, _ = load_pack(pack, device=device)
    return detector, segmenter, f"model pack {pack}"


def load_frames(args: argparse.Namespace, n: int) -> tuple[list[np.ndarray], str]:
    if args.input:
        from UltramotionIGTLib.io import read_sequence

        seq = read_sequence(args.input)
        frames = [seq.frames[i % seq.n_frames] for i in range(n)]
        return frames, f"{args.input} ({seq.frame_shape[1]}x{seq.frame_shape[0]})"
    from UltramotionIGTLib.tools.demo import demo_sequence

    seq, _ = demo_sequence(n)
    return list(seq.frames), f"demo phantom ({seq.frame_shape[1]}x{seq.frame_shape[0]})"


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


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ultramotion-bench-")
