"""How the models run: numeric precision, attention kernel, `torch.compile`, and the checks that keep
results the same.

- Precision (`resolve_precision`): ``auto | fp32 | fp16 | bf16``; ``auto`` is fp16 on CUDA and fp32 on
  the CPU (the in-house pipeline's ``use_fp16: true`` on the GPU). Each model keeps the parts whose
  outputs are precision-critical in fp32 (`DFineDetector.with_precision`, `SamSegmenter.with_precision`)
  and hands float32 results on, so the boxes/masks contract does not change with the precision.
- `agreement`: the parity rules (same prompts, boxes within `BOX_TOLERANCE_PX`, masks with IoU at least
  `MASK_IOU_MIN`, sorted scores within `SCORE_TOLERANCE`) used both by the pipeline's warm-up check (a
  model whose reduced-precision outputs break them on the first frame stays in fp32) and by the tests.
- Attention (`resolve_attention`): ``auto | sdpa | explicit`` for SAM's ViT image encoder; ``auto`` is
  ``sdpa`` (fused `torch.nn.functional.scaled_dot_product_attention` kernels) on CUDA and ``explicit``
  (segment_anything's softmax(QK^T + bias) V, bit-identical to the official encoder) on the CPU.
- Compilation (`compile_module`, `CompileCounter`): `torch.compile` with static shapes
  (``dynamic=False``: one graph per input size) and a process-wide count of dynamo compilations, so
  that a recompilation after warm-up can be counted and logged.

torch only; no host sync in anything the per-frame path calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

LOG = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTIONS: tuple[str, ...] = ("auto", "sdpa", "explicit")
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Parity rules of reduced precision and compilation against fp32 eager (issue 14's acceptance bars).
BOX_TOLERANCE_PX = 1.0
MASK_IOU_MIN = 0.97
#: Largest change of any of the K best detection scores (sorted, so rank swaps of ties do not count):
#: beyond it a prompt near the score threshold could appear or vanish.
SCORE_TOLERANCE = 0.02


def resolve_precision(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``auto | fp32 | fp16 | bf16`` (or a dtype) -> the float dtype the models compute in.

    ``auto``: float16 on CUDA, float32 on the CPU. Raises ValueError for another name or dtype.
    """
    if isinstance(precision, torch.dtype):
        if precision not in DTYPES.values():
            raise ValueError(f"precision must be one of float32, float16, bfloat16, got {precision}")
        return precision
    name = str(precision).strip().lower()
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return DTYPES[name]


def precision_name(dtype: torch.dtype) -> str:
    """``fp32 | fp16 | bf16`` for a float dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def resolve_attention(attention: str, device: torch.device | str) -> str:
    """``auto | sdpa | explicit`` -> ``sdpa`` or ``explicit`` (``auto``: sdpa on CUDA, explicit on CPU)."""
    name = str(attention).strip().lower()
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if name == "auto":
        return "sdpa" if torch.device(device).type == "cuda" else "explicit"
    return name


# ---------------------------------------------------------------------------------------------------
# Casting at module boundaries


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def cast_inputs(module: torch.nn.Module, dtype: torch.dtype) -> Any:
    """Make ``module`` cast its floating-point tensor inputs (also inside lists/tuples) to ``dtype``.

    For a module computing in another precision than the modules feeding it. Returns the hook handle.
    """

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}

    return module.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------------
# Parity rules


def box_agreement(
    ref_boxes: torch.Tensor,
    ref_labels: torch.Tensor,
    ref_valid: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """0-d float: the largest XYXY distance (pixels, max over coordinates) between a valid prompt of one
    set and the nearest valid prompt of the same class in the other, both ways; ``inf`` when a class has
    valid prompts in one set and not the other or their counts differ. Order-free (ties may swap
    ranks). Inputs Kx4 / K / K bool on one device; no host sync."""
    same = (ref_labels[:, None] == labels[None, :]) & ref_valid[:, None] & valid[None, :]
    dist = (ref_boxes[:, None, :].float() - boxes[None, :, :].float()).abs().amax(dim=-1)
    dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
    inf = torch.tensor(float("inf"), device=dist.device)
    zero = torch.zeros((), device=dist.device)
    ref_side = torch.where(ref_valid, dist.amin(dim=1), zero).amax() if dist.numel() else zero
    cand_side = torch.where(valid, dist.amin(dim=0), zero).amax() if dist.numel() else zero
    counts_differ = ref_valid.sum() != valid.sum()
    return torch.where(counts_differ, inf, torch.maximum(ref_side, cand_side))


def mask_ious(ref_masks: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """K float: IoU of each pair of NxHxW bool masks (1.0 where both are empty)."""
    inter = (ref_masks & masks).flatten(1).sum(dim=1).float()
    union = (ref_masks | masks).flatten(1).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def agreement(reference: Any, candidate: Any) -> dict[str, float]:
    """Compare two results of the same frame by the parity rules: `HostResult`s (their rows are the
    valid targets) or anything with boxes/labels/masks/scores/track_ids (and optionally ``valid``),
    numpy or torch. Each reference target is paired with the candidate target of its class whose box
    is nearest (ranks of near-equal scores may swap). Returns plain floats: ``box_px`` (inf when the
    targets differ in number per class), ``mask_iou_min`` over the pairs (1.0 without targets),
    ``score_max_diff`` and ``same_ids`` (1.0 when every pair has the same track id). A host-side
    helper for tests, benchmarks and reports: it reads the values."""

    def fields(r: Any) -> tuple[torch.Tensor, ...]:
        t = [
            torch.as_tensor(getattr(r, name)) for name in ("boxes", "labels", "masks", "scores", "track_ids")
        ]
        valid = torch.as_tensor(getattr(r, "valid", torch.ones(t[1].shape[0], dtype=torch.bool))).bool()
        return (*(x[valid] for x in t),)

    ref_boxes, ref_labels, ref_masks, ref_scores, ref_ids = fields(reference)
    boxes, labels, masks, scores, ids = fields(candidate)
    ones = lambda n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    box_px = float(
        box_agreement(ref_boxes, ref_labels, ones(len(ref_labels)), boxes, labels, ones(len(labels)))
    )
    if len(ref_labels) != len(labels) or box_px == float("inf"):
        return {"box_px": float("inf"), "mask_iou_min": 0.0, "score_max_diff": float("inf"), "same_ids": 0.0}
    if len(labels) == 0:
        return {"box_px": 0.0, "mask_iou_min": 1.0, "score_max_diff": 0.0, "same_ids": 1.0}
    same = ref_labels[:, None] == labels[None, :]
    dist = (ref_boxes[:, None, :].float() - boxes[None, :, :].float()).abs().amax(dim=-1)
    pair = torch.where(same, dist, torch.full_like(dist, float("inf"))).argmin(dim=1)
    ious = mask_ious(ref_masks.bool(), masks[pair].bool())
    return {
        "box_px": box_px,
        "mask_iou_min": float(ious.min()),
        "score_max_diff": float((ref_scores.float() - scores[pair].float()).abs().max()),
        "same_ids": float(bool(torch.equal(ref_ids, ids[pair]))),
    }


# ---------------------------------------------------------------------------------------------------
# torch.compile


def compile_module(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """Compile ``module`` in place (`torch.nn.Module.compile`) with static shapes (``dynamic=False``:
    one graph per input shape; another shape is a recompilation, counted by `CompileCounter`).
    ``mode``: one of `COMPILE_MODES` (``reduce-overhead`` adds CUDA graphs on CUDA). Idempotent.
    Compilation itself happens on the first call (the pipeline's warm-up)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if getattr(module, "_ultramotion_compiled", None) is None:
        module.compile(dynamic=False, mode=mode)
        module._ultramotion_compiled = mode
    return module


class CompileCounter:
    """Process-wide count of dynamo compilations (each graph compiled, first compilations and
    recompilations alike), read as a plain int: ``before = counter.count; ...; counter.count - before``.

    Installed once, on first use, as a compile-start callback of `torch._dynamo` (the hook torch's
    own compile metrics use). Thread-safe; costs nothing per frame.
    """

    _lock = threading.Lock()
    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            from torch._dynamo.callback import callback_handler

            callback_handler.register_start_callback(cls._on_compile_start)
            cls._installed = True

    @classmethod
    def _on_compile_start(cls, *_args: Any) -> None:
        with cls._lock:
            cls._count += 1

    @classmethod
    def count(cls) -> int:
        cls.install()
        return cls._count


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call (host clock; the caller synchronises if it needs device time)."""
    import time

    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
