"""Command-line options several commands share, declared once, and the one function that resolves them.

- `add_device_argument`: ``--device auto|cpu|cuda|cuda:N``, default ``auto`` for every command.
- `add_model_arguments` + `resolve_model_source`: where a command's detector + SAM pair comes from,
  ``--pack NAME|DIR|ZIP`` or ``--detector DIR --sam CKPT [--sam-type T]`` (or ``--random-models`` where
  a command offers it), else the shipped demo pack (`UltramotionIGTLib.models.packs.models_root`).
- `add_pipeline_arguments` + `pipeline_config_from_args`: the `PipelineConfig` knobs of ``run``,
  ``demo`` and ``audit --runtime``; `add_acceleration_arguments` (in them, and in ``bench pipeline``):
  ``--precision``, ``--sam-attention``, ``--compile``, ``--compile-mode``.

Nothing here imports torch at module scope: building the command-line tree must stay instant.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import CheckpointError, InputFileError, UsageError
from UltramotionIGTLib.models.source import ModelSource, demo_missing_message

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

DEVICE_HELP = "auto (default: the first CUDA GPU if torch sees one, else the CPU) | cpu | cuda | cuda:N"
SAM_TYPE_HELP = (
    "SAM architecture of the checkpoint: vit_b | vit_l | vit_h (SAM) | vit_t (MobileSAM) | medsam (MedSAM "
    "ViT-B) | vit_t_demo (the demo pack's small ViT); default auto: the config stored with the file, else "
    "recognised from its tensor shapes (the registry is UltramotionIGTLib.core.sam.SAM_CONFIGS)"
)


def device_spec(text: str) -> str:
    """argparse ``type`` of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (lower-cased).

    Only the spelling is checked here; whether CUDA is there is `core.device.resolve_device`'s job
    when the command runs (`DeviceUnavailableError`)."""
    spec = text.strip().lower()
    if not _DEVICE_RE.match(spec):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return spec


def describe_from_doc(parser: argparse.ArgumentParser, doc: str | None) -> None:
    """Use a command module's docstring as its ``--help`` description, line breaks kept and the
    reST backquotes dropped (the docstring is the one description of what the command does)."""
    import inspect

    parser.description = inspect.cleandoc(doc or "").replace("``", "").replace("`", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _parse_number(text: str, whole: bool, above_zero: bool) -> Any:
    """``text`` as an int (``whole``) or a finite float, at least 1 / above 0 (``above_zero``) or at
    least 0; `argparse.ArgumentTypeError` saying which rule failed (argparse shows it in one line)."""
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {'whole number' if whole else 'number'}"
        ) from None
    if not math.isfinite(value) or value < 0 or (above_zero and value <= 0):
        bound = (">= 1" if whole else "> 0") if above_zero else ">= 0"
        raise argparse.ArgumentTypeError(f"must be {'' if whole else 'a number '}{bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of a count that must be at least 1 (frames, repeats, boxes)."""
    return _parse_number(text, whole=True, above_zero=True)


def non_negative_int(text: str) -> int:
    """argparse ``type`` of a count that may be 0 (warm-up frames, held-out frames)."""
    return _parse_number(text, whole=True, above_zero=False)


def positive_float(text: str) -> float:
    """argparse ``type`` of a finite quantity that must be above 0 (seconds, rates)."""
    return _parse_number(text, whole=False, above_zero=True)


def non_negative_float(text: str) -> float:
    """argparse ``type`` of a finite quantity that may be 0 (pixels, margins)."""
    return _parse_number(text, whole=False, above_zero=False)


def unit_interval(text: str) -> float:
    """argparse ``type`` of a number within [0, 1] (score thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def add_device_argument(parser: Any, help_extra: str = "") -> None:
    """``--device`` (default ``auto``) on ``parser`` (a parser or an argument group)."""
    parser.add_argument(
        "--device", type=device_spec, default="auto", metavar="DEVICE", help=DEVICE_HELP + help_extra
    )


# ---------------------------------------------------------------------------------------------------
# Model source


def add_model_arguments(parser: Any, *, required: bool = False, random_models: bool = False) -> None:
    """The model-source options and ``--device``, in one "models" argument group of ``parser``.

    ``--pack`` and ``--detector`` (and ``--random-models`` when ``random_models``) are mutually
    exclusive; ``--sam`` and ``--sam-type`` go with ``--detector`` (checked by `resolve_model_source`,
    which argparse cannot express). ``required``: one source must be named (argparse's error
    otherwise); when False the shipped demo pack is the default.
    """
    default = "a model source is required" if required else "default: the shipped demo pack"
    group = parser.add_argument_group(
        "models",
        f"a model pack, or a detector folder and a SAM checkpoint ({default})",
    )
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--pack",
        metavar="NAME|DIR|ZIP",
        help="model pack: the name of an installed pack (ultramotion-igt models list; the shipped demo "
        "pack is demo-phantom), a pack folder or a pack .zip; verified (sha256) before loading",
    )
    source.add_argument(
        "--detector", metavar="DIR", help="D-FINE folder (config.json + model.safetensors), with --sam"
    )
    if random_models:
        source.add_argument(
            "--random-models",
            action="store_true",
            help="small random-weight models in the real formats, written to a temporary folder "
            "(they find nothing meaningful; for counting hops and timing without a pack)",
        )
    group.add_argument(
        "--sam",
        metavar="CKPT",
        help="SAM checkpoint, with --detector: official .pth state dict, .safetensors, or a folder holding one",
    )
    group.add_argument("--sam-type", metavar="TYPE", default=None, help=SAM_TYPE_HELP)
    add_device_argument(group)


def resolve_model_source(args: argparse.Namespace, *, check_files: bool = True) -> ModelSource:
    """The `ModelSource` the options of `add_model_arguments` name.

    Order: ``--pack`` (an installed pack's name, a folder, or a ``.zip`` unpacked into a temporary
    folder kept alive by the returned source), ``--detector`` + ``--sam``, ``--random-models``
    (written to a temporary folder), else the shipped demo pack. Raises `UsageError` for options that
    do not go together (``--sam`` without ``--detector`` and the reverse, ``--sam-type`` without
    ``--sam``), CheckpointError naming the pack that does not exist or cannot be read, and, when
    ``check_files``, InputFileError naming a ``--detector`` folder or ``--sam`` file that does not
    exist and CheckpointError when the demo pack is missing. With ``check_files=False`` paths are
    returned as given (the doctor checks and reports them itself).
    """
    from UltramotionIGTLib.models import packs

    pack = getattr(args, "pack", None)
    detector = getattr(args, "detector", None)
    sam = getattr(args, "sam", None)
    sam_type = getattr(args, "sam_type", None)
    random_models = getattr(args, "random_models", False)
    if sam is not None and detector is None:
        if pack is not None:
            raise UsageError("--sam goes with --detector DIR, not with --pack (a pack names its own SAM)")
        raise UsageError("--sam needs --detector DIR (the detector to pair it with)")
    if detector is not None and sam is None:
        raise UsageError("--detector needs --sam CKPT (the SAM checkpoint to pair it with)")
    if sam_type is not None and sam is None:
        raise UsageError("--sam-type goes with --sam (a pack's manifest names its SAM type)")

    if pack is not None:
        return _pack_source(str(pack), packs)
    if detector is not None:
        det, ckpt = Path(detector).expanduser(), Path(sam).expanduser()
        if check_files:
            if not det.is_dir():
                raise InputFileError(f"--detector {det}: no such folder (a D-FINE folder with config.json)")
            several = [q.name for q in packs.sam_checkpoints_in(ckpt)]
            if len(several) > 1:
                raise UsageError(
                    f"--sam {ckpt}: the folder holds {len(several)} checkpoints ({', '.join(several)}): "
                    "name the file"
                )
            found = packs.find_sam_checkpoint(ckpt)
            if found is None:
                what = "folder has no .safetensors/.pth/.pt file" if ckpt.is_dir() else "no such file"
                raise InputFileError(f"--sam {ckpt}: {what}")
            ckpt = found
        return ModelSource(det, ckpt, sam_type or "auto", "paths")
    if random_models:
        return _random_source()
    root = packs.models_root()
    if (root / packs.MANIFEST_NAME).is_file():
        source = _pack_source(str(root), packs)
        return ModelSource(source.detector, source.sam, source.sam_type, "demo", root, source.pack_name)
    defaults = packs.default_models()
    if check_files and (defaults["detector"] is None or defaults["sam"] is None):
        raise CheckpointError(demo_missing_message())
    return ModelSource(defaults["detector"], defaults["sam"], "auto", "demo")


def _pack_source(pack: str, packs: Any) -> ModelSource:
    path = Path(pack).expanduser()
    keep = None
    if path.is_file():
        import zipfile

        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"--pack {path}: neither a pack folder nor a .zip of one")
        keep = tempfile.TemporaryDirectory(prefix="ultramotion-pack-")
        root = packs.extract_pack_zip(path, Path(keep.name))
    else:
        root = packs.resolve_pack(pack)
    zip_path = path if keep is not None else None
    with packs.naming_the_zip(root if keep is not None else None, zip_path):
        manifest = packs.read_manifest(root)
        det, seg = manifest.model("detector"), manifest.model("segmenter")
        for role, spec in (("detector", det), ("segmenter", seg)):
            if spec is None:
                raise CheckpointError(
                    f"pack {manifest.name!r} at {root} has no {role}; the pipeline needs both"
                )
    return ModelSource(
        root / det.path,
        root / seg.path,
        seg.model_type or "auto",
        "pack",
        root,
        manifest.name,
        keep,
        zip_path,
    )


def _random_source() -> ModelSource:
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    keep = tempfile.TemporaryDirectory(prefix="ultramotion-random-models-")
    tmp = Path(keep.name)
    det = write_random_detector(tmp / "detector", seed=0)
    sam = write_random_sam_checkpoint(tmp / "sam" / "sam_vit_t_demo.safetensors", "vit_t_demo", seed=0)
    return ModelSource(Path(det), Path(sam), "vit_t_demo", "random", keep=keep)


# ---------------------------------------------------------------------------------------------------
# Pipeline


def add_sync_audit_argument(parser: Any, into: str = "the KPI records") -> None:
    """``--sync-audit``: the frame loop's runtime transfer audit (`RuntimeTransferAudit`, no profiler),
    off by default because it wraps torch calls; each frame's counts go ``into`` (named in the help)."""
    parser.add_argument(
        "--sync-audit",
        action="store_true",
        help=f"count host syncs per frame (runtime audit, no profiler) into {into} (off by default: the "
        "counting wraps torch calls)",
    )


def add_pipeline_arguments(parser: Any) -> None:
    """The `PipelineConfig` options of run, demo and audit --runtime, in a "pipeline" argument group."""
    group = parser.add_argument_group("pipeline")
    group.add_argument(
        "--score-threshold",
        type=unit_interval,
        default=0.3,
        metavar="S",
        help="detections scoring below S are not prompted (default 0.3)",
    )
    add_max_prompts_argument(group)
    group.add_argument(
        "--max-targets",
        type=non_negative_int,
        default=4,
        metavar="N",
        help="at most N of those prompts per class, best first after NMS; 0: no per-class cap (default "
        "4; at most the detector's query count)",
    )
    group.add_argument(
        "--imaging-region",
        default=None,
        metavar="X,Y,W,H|auto",
        help="run the models on this part of the frame only (PLUS clip rectangle: origin X,Y and size W,H "
        "in pixels; outputs stay in frame pixels), or auto: the bounding box of the recording's non-black "
        "pixels, decided once before the run (default: the whole frame)",
    )
    group.add_argument(
        "--no-track",
        action="store_true",
        help="no tracker: targets get no id, so each class's detections of a frame go to one segment "
        "'<class>-untracked' (with tracking: one segment per target, '<class>-<id>')",
    )
    group.add_argument(
        "--mask-box-margin",
        type=non_negative_float,
        default=None,
        metavar="PX",
        help="keep each mask within its prompt box plus PX pixels unless SAM is confident beyond it "
        "(probability >= --mask-outside-confidence), so a mask cannot spill across the image on frames "
        "unlike the model's training data; default: off (SAM's masks as they are)",
    )
    group.add_argument(
        "--mask-outside-confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="probability a pixel beyond --mask-box-margin needs to stay in its mask (0.5..1, default 0.95)",
    )
    group.add_argument(
        "--legacy",
        action="store_true",
        help="the in-house pipeline's habits, for comparison: gpu_resident=False, sam_as_numpy=True "
        "(host hops per frame; tools/benchmarks/legacy.py)",
    )
    add_acceleration_arguments(group)


def add_max_prompts_argument(parser: Any) -> None:
    """``--max-prompts N`` (`PipelineConfig.max_prompts`, default 8): the prompt budget of run, demo,
    audit --runtime and bench pipeline."""
    parser.add_argument(
        "--max-prompts",
        type=positive_int,
        default=8,
        metavar="N",
        help="SAM box prompts per frame over all classes, the best after NMS: the fixed budget that sets "
        "the per-frame cost whatever the detector's class count (default 8; at most the detector's query "
        "count, the boxes it proposes per frame)",
    )


def is_auto_region(text: str | None) -> bool:
    """Whether ``--imaging-region`` is ``auto`` (decided from the recording's frames before the run)."""
    return text is not None and str(text).strip().lower() == "auto"


def imaging_region_arg(text: str | None) -> tuple[int, int, int, int] | None:
    """``--imaging-region`` X,Y,W,H -> (x, y, w, h); None for none or ``auto`` (the command decides it
    from the frames). Raises `InputFileError` naming the text when it is not four whole numbers."""
    if text is None or is_auto_region(text):
        return None
    from UltramotionIGTLib.core.region import ImagingRegion

    return ImagingRegion.parse(text).as_tuple()


#: the choices of `add_acceleration_arguments` (mirrors `core.acceleration`; no torch import here)
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
ATTENTION_CHOICES = ("auto", "sdpa", "explicit")
COMPILE_MODE_CHOICES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_acceleration_arguments(parser: Any, precision_default: str | None = "auto") -> None:
    """How the models run: ``--precision``, ``--sam-attention``, ``--compile``, ``--compile-mode``
    (`PipelineConfig` fields of the same names; `UltramotionIGTLib.core.acceleration`)."""
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=precision_default,
        help="precision of the detector and SAM: auto (default: fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | "
        "bf16; a model whose reduced-precision results differ from fp32 on the first frame (prompts, "
        "boxes > 1 px, mask IoU < 0.97) stays in fp32 with a warning",
    )
    parser.add_argument(
        "--sam-attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="SAM ViT encoder attention: auto (default: sdpa on CUDA, explicit on CPU) | sdpa (fused "
        "scaled_dot_product_attention) | explicit (segment_anything's arithmetic, bit-identical)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the detector and SAM encoder/decoder (static shapes; compiled on the first "
        "frame, which takes minutes; recompilations are counted and logged)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODE_CHOICES,
        default="default",
        help="torch.compile mode with --compile (default: default; reduce-overhead adds CUDA graphs)",
    )


def detector_query_count(detector: Any) -> int | None:
    """The boxes a D-FINE folder's model proposes per frame (``num_queries`` of its config.json, read
    without torch), None when the folder does not say (the model load reports a bad folder)."""
    import json

    if detector is None:
        return None
    try:
        config = json.loads((Path(detector) / "config.json").read_text(encoding="utf-8"))
        return int(config["num_queries"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_config_from_args(
    args: argparse.Namespace, source: ModelSource | None = None, auto_region: bool = False, **overrides: Any
) -> Any:
    """THE place where the pipeline options become a `PipelineConfig` (with ``--device``).

    ``source``: the models, when known: ``--max-prompts`` and ``--max-targets`` are bounded by the
    detector's query count (`core.pipeline.check_prompt_budget`, checked here before any model loads:
    more prompt slots could never be filled, and each costs an HxW mask per frame). ``--max-targets 0``
    is no per-class cap. ``auto_region``: the command decides ``--imaging-region auto`` from a
    recording's frames (the config then has no region yet); elsewhere ``auto`` is a `UsageError`.
    Raises `UsageError` for values the config refuses.
    """
    from UltramotionIGTLib.core.pipeline import PipelineConfig, check_prompt_budget
    from UltramotionIGTLib.errors import SettingsError

    per_class = args.max_targets or None
    if is_auto_region(args.imaging_region) and not auto_region:
        raise UsageError(
            "--imaging-region auto is found from a recording's frames (ultramotion-igt run); give X,Y,W,H here"
        )
    queries = detector_query_count(source.detector) if source is not None else None
    try:
        check_prompt_budget(queries, args.max_prompts, per_class, names=("--max-prompts", "--max-targets"))
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    values = {
        "device": args.device,
        "score_threshold": args.score_threshold,
        "max_prompts": args.max_prompts,
        "max_targets_per_class": per_class,
        "imaging_region": imaging_region_arg(args.imaging_region),
        "track": not args.no_track,
        "mask_box_margin_px": args.mask_box_margin,
        "mask_outside_confidence": args.mask_outside_confidence,
        "precision": args.precision,
        "sam_attention": args.sam_attention,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
    }
    values.update(overrides)
    try:
        return PipelineConfig(**values)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
