"""What detector and SAM training share: the phantom data split, batch sampling, checkpoints, progress.

Data split: training frames come from phantom sequences derived from ``TRAIN_DATASET_SEED``,
held-out evaluation frames from ``HELDOUT_DATASET_SEED``; `synthetic.sequence_seeds` makes the two
sets of sequence seeds disjoint (a test checks it). Batches are a pure function of (seed, step), so
a run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.tools.phantom import (
    PhantomConfig,
    PhantomFrame,
    PhantomStream,
    render_dataset,
    sequence_seeds,
)

DEMO_IMAGE_SIZE = 256
TRAIN_DATASET_SEED = 0
HELDOUT_DATASET_SEED = 1
#: phantom sequences in the training pool, and frames drawn per sequence (two needle episodes at 20 Hz)
TRAIN_SEQUENCES = 240
SEQUENCE_FRAMES = 320
CHECKPOINT_NAME = "training-state.pt"
#: share of demo phantom sequences with a bone surface (the third class)
DEMO_BONE_PROBABILITY = 0.7

P = ParamSpec("P")
R = TypeVar("R")


def demo_phantom_config() -> PhantomConfig:
    """The phantom family the demo models are trained and evaluated on (256x256, 0.2 mm pixels; vessels,
    needle, and a bone surface in ``DEMO_BONE_PROBABILITY`` of the sequences)."""
    return PhantomConfig(
        height=DEMO_IMAGE_SIZE, width=DEMO_IMAGE_SIZE, bone_probability=DEMO_BONE_PROBABILITY
    )


class PhantomFramePool:
    """Random training frames from ``n_sequences`` phantom sequences, created lazily and kept.

    ``batch(step, batch_size)`` is deterministic in (dataset seed, step).
    """

    def __init__(
        self,
        config: PhantomConfig | None = None,
        dataset_seed: int = TRAIN_DATASET_SEED,
        n_sequences: int = TRAIN_SEQUENCES,
        sequence_frames: int = SEQUENCE_FRAMES,
    ) -> None:
        self.config = config or demo_phantom_config()
        self.dataset_seed = dataset_seed
        self.seeds = sequence_seeds(dataset_seed, n_sequences)
        self.sequence_frames = sequence_frames
        self._streams: dict[int, PhantomStream] = {}

    def stream(self, i: int) -> PhantomStream:
        if i not in self._streams:
            self._streams[i] = PhantomStream(
                self.config, seed=int(self.seeds[i]), n_frames=self.sequence_frames
            )
        return self._streams[i]

    def batch(self, step: int, batch_size: int) -> list[PhantomFrame]:
        rng = np.random.default_rng([self.dataset_seed, 0x7EA1, int(step)])
        seq = rng.integers(0, len(self.seeds), size=batch_size)
        idx = rng.integers(0, self.sequence_frames, size=batch_size)
        return [self.stream(int(s)).frame(int(i)) for s, i in zip(seq, idx, strict=True)]


def heldout_set(n_frames: int = 200, frames_per_sequence: int = 8):
    """The fixed held-out evaluation frames (`synthetic.PhantomDataset`), disjoint from training."""
    return render_dataset(
        n_frames,
        seed=HELDOUT_DATASET_SEED,
        config=demo_phantom_config(),
        frames_per_sequence=frames_per_sequence,
    )


def seed_everything(seed: int) -> None:
    """Seed torch and numpy; deterministic algorithms where torch has them.

    All three are process-wide: call it inside a function wrapped in `restores_torch_globals` (numpy's
    legacy global generator is seeded for third-party code that draws from it; ours uses Generators).
    """
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)


def restores_torch_globals(train: Callable[P, R]) -> Callable[P, R]:
    """Decorate a training function so that the process-wide settings it changes are put back on exit
    (also on error): torch's CPU thread count (``--threads``), deterministic-algorithms mode and its
    warn-only flag (`seed_everything`), and the RNG states of torch's CPU generator, of every CUDA
    device already initialised on entry (``torch.random.fork_rng``) and of numpy's legacy global
    generator. A training run is thus reproducible from its seed without leaving its seed, threads or
    determinism to whoever called it (a test, a notebook, Slicer's Python)."""

    @functools.wraps(train)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        numpy_state = np.random.get_state()
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                return train(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            np.random.set_state(numpy_state)

    return wrapper


@dataclass
class TrainingState:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    history: list[dict[str, float]]
    args: dict[str, Any]


def save_training_state(out_dir: Path, state: TrainingState) -> Path:
    """Write the resumable training state atomically (tensors and plain data only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": state.step,
            "model": state.model,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "history": state.history,
            "args": state.args,
            "rng_torch": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def load_training_state(out_dir: Path) -> TrainingState | None:
    """The last saved state in ``out_dir`` (None if there is none); loaded with weights_only=True."""
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means a corrupt checkpoint
        raise CheckpointError(f"cannot resume from {path}: {exc} (delete it to start over)") from exc
    torch.set_rng_state(data["rng_torch"])
    return TrainingState(
        step=int(data["step"]),
        model=data["model"],
        optimizer=data["optimizer"],
        scheduler=data.get("scheduler"),
        history=list(data["history"]),
        args=dict(data["args"]),
    )


def environment_record(device: torch.device, wall_s: float) -> dict[str, Any]:
    """Where and how long a training ran, for the model card."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "wall_s": round(wall_s, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def cosine_lr(base_lr: float, steps: int, warmup: int = 100) -> Callable[[int], float]:
    """LR multiplier: linear warm-up then cosine decay to 5 % of ``base_lr``."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def add_training_arguments(
    parser: Any, *, steps: int, batch_size: int, lr: float, checkpoint_every: int, heldout_frames: int = 200
) -> None:
    """The options every ``ultramotion-igt train ...`` command takes (defaults differ per model)."""
    from UltramotionIGTLib.tools.options import add_device_argument, non_negative_int, positive_int

    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (resumed if it holds training-state.pt)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=steps, metavar="N", help=f"optimiser steps (default {steps})"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        metavar="B",
        help=f"phantom frames per step (default {batch_size})",
    )
    parser.add_argument(
        "--lr", type=float, default=lr, help=f"peak learning rate after the warm-up (default {lr:g})"
    )
    add_device_argument(
        parser,
        help_extra="; the shipped weights were trained with --device cpu --threads 1 (bit-exact reruns)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch/numpy seed: initial weights (and the box jitter of SAM prompts); the phantom batches "
        "depend on the step only (default 0)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=checkpoint_every,
        metavar="N",
        help=f"write training-state.pt every N steps (default {checkpoint_every})",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--heldout-frames",
        type=non_negative_int,
        default=heldout_frames,
        metavar="N",
        help=f"held-out frames evaluated at the end; 0 skips it (default {heldout_frames})",
    )
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def training_kwargs(ns: Any) -> dict[str, Any]:
    """Keyword arguments for ``train_detector`` / ``train_sam`` from `add_training_arguments` options."""
    return {
        "steps": ns.steps,
        "batch_size": ns.batch_size,
        "lr": ns.lr,
        "device": ns.device,
        "seed": ns.seed,
        "checkpoint_every": ns.checkpoint_every,
        "resume": not ns.no_resume,
        "progress": not ns.no_progress,
        "threads": ns.threads,
        "heldout_frames": ns.heldout_frames,
    }
