"""Pre-flight check: is this machine ready to run the pipeline, and if not, what to do.

One library function, `run_checks`, used by ``ultramotion-igt doctor`` (`run`) and by the Slicer
module's "Check environment" button. Each check returns a `CheckResult` that says plainly what was
found, what is wrong and what to do. Nothing here raises for an environment problem: a missing torch,
CUDA or model file is a FAIL result, not an exception.

torch and the model code are imported inside the checks, so the doctor itself runs (and reports a
missing or broken torch) on a bare Python.
"""

from __future__ import annotations

import argparse
import enum
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `UltramotionIGTLib.models.packs` is the one place that knows where the shipped demo models live;
# these names stay importable from the doctor for its callers. It imports no torch.
from UltramotionIGTLib.models.packs import (  # noqa: F401
    SAM_SUFFIXES,
    default_models,
    find_sam_checkpoint,
    models_root,
)

#: Below this much free GPU memory the pipeline may fail to allocate (MiB).
LOW_GPU_MEMORY_MIB = 1024.0
#: Oldest torch the library supports (pyproject: torch>=2.1).
MIN_TORCH = (2, 1)


class CheckStatus(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class CheckResult:
    """One check: ``name``, ``status``, a one-line ``summary`` of what was found, ``advice`` (what
    to do; empty when nothing is needed), ``details`` (numbers for programs) and its duration."""

    name: str
    status: CheckStatus
    summary: str
    advice: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """False only for FAIL: warnings and skips do not block a run."""
        return self.status is not CheckStatus.FAIL

    def format(self) -> str:
        text = f"[{self.status.value.upper():4}] {self.name}: {self.summary}"
        if self.advice:
            text += f"\n       -> {self.advice}"
        return text


def format_report(results: Sequence[CheckResult]) -> str:
    """All results, one block each, and a closing verdict line."""
    lines = [r.format() for r in results]
    failed = [r.name for r in results if r.status is CheckStatus.FAIL]
    warned = [r.name for r in results if r.status is CheckStatus.WARN]
    if failed:
        lines.append(
            f"NOT READY: {len(failed)} check(s) failed ({', '.join(failed)}); fix them and run again."
        )
    elif warned:
        lines.append(f"READY with {len(warned)} warning(s) ({', '.join(warned)}).")
    else:
        lines.append("READY: all checks passed.")
    return "\n".join(lines)


def all_ok(results: Sequence[CheckResult]) -> bool:
    return all(r.ok for r in results)


# -- the checks --------------------------------------------------------------------------------------


def _timed(name: str, func: Callable[[], CheckResult]) -> CheckResult:
    start = time.perf_counter()
    try:
        result = func()
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure instead of raising
        result = CheckResult(
            name,
            CheckStatus.FAIL,
            f"unexpected error: {type(exc).__name__}: {exc}",
            "this looks like a bug or a broken installation; please report it with this output",
        )
    result.duration_ms = (time.perf_counter() - start) * 1000.0
    return result


def check_python() -> CheckResult:
    version = sys.version_info
    summary = f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"
    details = {"python": platform.python_version(), "platform": platform.platform()}
    if (version.major, version.minor) < (3, 10):
        return CheckResult(
            "python", CheckStatus.FAIL, summary, "use Python 3.10 or newer (Slicer 5.6+ ships one)", details
        )
    return CheckResult("python", CheckStatus.OK, summary, details=details)


def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_torch() -> CheckResult:
    try:
        import torch
    except ImportError as exc:
        return CheckResult(
            "torch",
            CheckStatus.FAIL,
            f"PyTorch cannot be imported ({exc})",
            "in Slicer install the PyTorch extension (Extension Manager -> PyTorch) and use its module "
            "to install torch; elsewhere: pip install torch (see pytorch.org for the CUDA build)",
        )
    cuda = torch.version.cuda
    details = {"torch": torch.__version__, "torch_cuda": cuda, "cudnn": None}
    if cuda and torch.backends.cudnn.is_available():
        details["cudnn"] = torch.backends.cudnn.version()
    summary = f"torch {torch.__version__}, " + (f"built with CUDA {cuda}" if cuda else "CPU-only build")
    if _parse_version(torch.__version__) < MIN_TORCH:
        return CheckResult(
            "torch",
            CheckStatus.FAIL,
            summary,
            f"torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} is needed: upgrade it (in Slicer through the PyTorch module)",
            details,
        )
    return CheckResult("torch", CheckStatus.OK, summary, details=details)


def check_device(device: str = "auto") -> CheckResult:
    """Resolve ``device``; on CUDA report name, compute capability, free/total memory and whether
    this torch build has kernels for the GPU."""
    try:
        import torch
    except ImportError:
        return CheckResult(
            "device", CheckStatus.SKIP, "skipped: torch is not importable", "fix the torch check first"
        )
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.errors import DeviceUnavailableError

    try:
        dev = resolve_device(device)
    except DeviceUnavailableError as exc:
        return CheckResult(
            "device",
            CheckStatus.FAIL,
            f"device {device!r} is not usable here",
            str(exc),
            {"requested": device},
        )
    details: dict[str, Any] = {"requested": device, "device": str(dev)}
    if dev.type != "cuda":
        reason = "CUDA is not available" if not torch.cuda.is_available() else "CPU was asked for"
        details["cuda_available"] = torch.cuda.is_available()
        advice = ""
        if not torch.cuda.is_available():
            advice = (
                "the pipeline works on the CPU but far from real time; for live use install an NVIDIA "
                "GPU driver and a CUDA build of torch"
                + (" (this torch is CPU-only)" if not torch.version.cuda else "")
            )
        return CheckResult(
            "device",
            CheckStatus.WARN if advice else CheckStatus.OK,
            f"cpu ({reason}; {torch.get_num_threads()} threads)",
            advice,
            details,
        )
    props = torch.cuda.get_device_properties(dev)
    major, minor = props.major, props.minor
    free, total = torch.cuda.mem_get_info(dev)
    mib = 1024.0 * 1024.0
    details.update(
        name=props.name,
        compute_capability=f"{major}.{minor}",
        free_mib=free / mib,
        total_mib=total / mib,
        arch_list=list(torch.cuda.get_arch_list()),
    )
    summary = (
        f"{dev} = {props.name}, compute capability {major}.{minor}, "
        f"{free / mib:.0f} MiB free of {total / mib:.0f} MiB"
    )
    arch = f"sm_{major}{minor}"
    arch_list = details["arch_list"]
    if (
        arch_list
        and arch not in arch_list
        and not any(
            a.startswith("compute_") and _parse_version(a[8:-1] + "." + a[-1]) <= (major, minor)
            for a in arch_list
        )
    ):
        return CheckResult(
            "device",
            CheckStatus.FAIL,
            summary,
            f"this torch build has no kernels for {arch} (it has {', '.join(arch_list)}): install a torch "
            "build that supports this GPU (in Slicer: PyTorch module -> reinstall)",
            details,
        )
    if free / mib < LOW_GPU_MEMORY_MIB:
        return CheckResult(
            "device",
            CheckStatus.WARN,
            summary,
            f"less than {LOW_GPU_MEMORY_MIB:.0f} MiB free on the GPU: close other GPU programs",
            details,
        )
    return CheckResult("device", CheckStatus.OK, summary, details=details)


def _file_size_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / (1024.0 * 1024.0)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1024.0 * 1024.0)


def check_detector_files(detector_dir: Path | None) -> CheckResult:
    if detector_dir is None:
        return CheckResult(
            "detector files",
            CheckStatus.FAIL,
            f"no detector folder given and no demo detector in {models_root() / 'detector'}",
            "pass --detector FOLDER (a D-FINE Hugging Face folder: config.json + model.safetensors), "
            "or reinstall the extension to restore the shipped demo models",
        )
    if not detector_dir.is_dir():
        return CheckResult(
            "detector files",
            CheckStatus.FAIL,
            f"detector folder {detector_dir} does not exist",
            "point --detector at a D-FINE Hugging Face folder (config.json + model.safetensors)",
        )
    missing = [] if (detector_dir / "config.json").is_file() else ["config.json"]
    weights = sorted(p.name for p in detector_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        missing.append("model.safetensors")
    if missing:
        return CheckResult(
            "detector files",
            CheckStatus.FAIL,
            f"detector folder {detector_dir} lacks {', '.join(missing)}",
            "a D-FINE folder is what DFineForObjectDetection.save_pretrained() writes: config.json and "
            "model.safetensors; copy the whole folder",
        )
    size = _file_size_mib(detector_dir)
    return CheckResult(
        "detector files",
        CheckStatus.OK,
        f"{detector_dir} (config.json, {', '.join(weights)}; {size:.1f} MiB)",
        details={"path": str(detector_dir), "weights": weights, "size_mib": size},
    )


def check_sam_files(sam_checkpoint: Path | None) -> CheckResult:
    if sam_checkpoint is None:
        return CheckResult(
            "SAM files",
            CheckStatus.FAIL,
            f"no SAM checkpoint given and no demo SAM checkpoint in {models_root() / 'sam'}",
            "pass --sam FILE (an official sam_vit_b/l/h .pth or a .safetensors), or reinstall the "
            "extension to restore the shipped demo models",
        )
    resolved = find_sam_checkpoint(sam_checkpoint)
    if resolved is None:
        where = (
            "folder has no .safetensors/.pth/.pt file" if sam_checkpoint.is_dir() else "file does not exist"
        )
        return CheckResult(
            "SAM files",
            CheckStatus.FAIL,
            f"SAM checkpoint {sam_checkpoint}: {where}",
            "point --sam at the checkpoint file itself (e.g. sam_vit_b_01ec64.pth)",
        )
    size = _file_size_mib(resolved)
    if size == 0:
        return CheckResult(
            "SAM files",
            CheckStatus.FAIL,
            f"SAM checkpoint {resolved} is empty",
            "the file was truncated (interrupted copy or download): copy it again",
        )
    return CheckResult(
        "SAM files",
        CheckStatus.OK,
        f"{resolved} ({size:.1f} MiB)",
        details={"path": str(resolved), "size_mib": size},
    )


def _load_failure(name: str, path: Path, exc: BaseException) -> CheckResult:
    from UltramotionIGTLib.errors import UltramotionError

    if isinstance(exc, ImportError):
        return CheckResult(
            name,
            CheckStatus.FAIL,
            f"the model code cannot be imported ({exc})",
            "a package is missing: pip install transformers safetensors segment-anything "
            "(in Slicer: press Start once and accept the installation)",
        )
    if isinstance(exc, UltramotionError):
        return CheckResult(
            name, CheckStatus.FAIL, str(exc), "replace the file with a good copy", {"path": str(path)}
        )
    return CheckResult(
        name,
        CheckStatus.FAIL,
        f"{path} could not be loaded: {type(exc).__name__}: {exc}",
        "the file is not a checkpoint of the expected kind or is corrupt: check its type and copy it again",
        {"path": str(path)},
    )


def load_detector(detector_dir: Path, device: Any) -> tuple[Any, CheckResult]:
    """Load the detector; the OK result names its family, size, classes, input channels and
    parameter count (`models.packs.ModelSummary`, also in ``details``)."""
    try:
        from UltramotionIGTLib.core.detector import DFineDetector
        from UltramotionIGTLib.models.packs import summarize_detector

        detector = DFineDetector.from_pretrained(detector_dir, device=device)
        model = summarize_detector(detector, detector_dir)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        return None, _load_failure("detector load", detector_dir, exc)
    return detector, CheckResult(
        "detector load", CheckStatus.OK, f"{model.format()}; loaded on {device}", details=model.to_dict()
    )


def load_segmenter(sam_checkpoint: Path, sam_type: str, device: Any) -> tuple[Any, CheckResult]:
    """Load SAM; the OK result names its type, input channels and size, and parameter count."""
    try:
        from UltramotionIGTLib.core.sam import SamSegmenter
        from UltramotionIGTLib.models.packs import summarize_segmenter

        segmenter = SamSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_type, device=device)
        model = summarize_segmenter(segmenter, sam_checkpoint)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        return None, _load_failure("SAM load", sam_checkpoint, exc)
    details = {**model.to_dict(), "model_type": model.size}
    return segmenter, CheckResult(
        "SAM load", CheckStatus.OK, f"{model.format()}; loaded on {device}", details=details
    )


def warmup_frame(seed: int = 0):
    """A uint8 HxW B-mode frame of the synthetic phantom (vessels and a needle, 256x256)."""
    from UltramotionIGTLib.tools.phantom import PhantomStream

    return PhantomStream(seed=seed, n_frames=1).frame(0).image


def check_warmup(
    detector: Any, segmenter: Any, device: Any, frames: int = 2, input_path: str | Path | None = None
) -> CheckResult:
    """Run ``frames`` frames through the real `Pipeline`; report first and steady times. The frame is
    the first of the recording ``input_path`` (the user's frame size; colour kept), else a synthetic one."""
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig

    pipeline = Pipeline(detector, segmenter, PipelineConfig(device=str(device)))
    if input_path is not None:
        from UltramotionIGTLib.errors import UltramotionError
        from UltramotionIGTLib.io import read_sequence

        try:
            frame = read_sequence(input_path, color="rgb").frames[0]
        except UltramotionError as exc:
            return CheckResult("warm-up", CheckStatus.FAIL, str(exc), "give a recording the pipeline reads")
    else:
        frame = warmup_frame()
    times = []
    targets = 0
    for i in range(max(1, frames)):
        start = time.perf_counter()
        result = pipeline.process_frame(frame, frame_index=i).to_host()
        times.append((time.perf_counter() - start) * 1000.0)
        targets = len(result)
    steady = times[-1]
    summary = (
        f"{frame.shape[1]}x{frame.shape[0]} frame on {device}: first {times[0]:.0f} ms, "
        f"then {steady:.1f} ms ({1000.0 / steady:.1f} fps), {targets} target(s)"
    )
    details = {"first_ms": times[0], "steady_ms": steady, "fps": 1000.0 / steady, "targets": targets}
    if str(device).startswith("cpu") and steady > 200.0:
        return CheckResult(
            "warm-up",
            CheckStatus.WARN,
            summary,
            "slow for live use on this CPU: use a CUDA GPU, or replay recordings instead of live input",
            details,
        )
    return CheckResult("warm-up", CheckStatus.OK, summary, details=details)


def check_pack(pack: Path, zip_path: Path | None = None) -> CheckResult:
    """The pack's manifest: every file present with its size and sha256 (`models.packs.verify_pack`,
    hashes only: the load checks follow). FAIL names the first file that differs, as ``run`` would."""
    from UltramotionIGTLib.errors import CheckpointError
    from UltramotionIGTLib.models.packs import naming_the_zip, verify_pack

    shown = zip_path or pack
    try:
        with naming_the_zip(pack if zip_path is not None else None, zip_path):
            report = verify_pack(pack, load=False)
    except CheckpointError as exc:
        return CheckResult(
            "pack",
            CheckStatus.FAIL,
            str(exc),
            "copy the pack again, or rebuild it (ultramotion-igt models make)",
        )
    return CheckResult(
        "pack",
        CheckStatus.OK,
        f"{report.manifest.name!r} ({shown}): {report.checked_files} files match their sha256 in the manifest",
    )


def run_checks(
    device: str = "auto",
    detector_dir: str | Path | None = None,
    sam_checkpoint: str | Path | None = None,
    sam_type: str | None = None,
    warmup: bool = True,
    warmup_input: str | Path | None = None,
) -> list[CheckResult]:
    """Run every check in order; later checks are SKIPped (saying why) when what they need failed.

    ``detector_dir``/``sam_checkpoint`` default to the shipped demo models (`default_models`);
    ``sam_type`` defaults to ``"auto"`` (the segmenter reads it from the checkpoint). Never raises
    for an environment problem.
    """
    defaults = default_models()
    det_path = Path(detector_dir) if detector_dir else defaults["detector"]
    sam_path = Path(sam_checkpoint) if sam_checkpoint else defaults["sam"]
    sam_type = sam_type or "auto"

    results = [_timed("python", check_python), _timed("torch", check_torch)]
    torch_ok = results[-1].ok
    results.append(_timed("device", lambda: check_device(device)))
    dev_result = results[-1]
    results.append(_timed("detector files", lambda: check_detector_files(det_path)))
    det_files_ok = results[-1].ok
    results.append(_timed("SAM files", lambda: check_sam_files(sam_path)))
    sam_files_ok = results[-1].ok

    resolved_device = dev_result.details.get("device")
    if not torch_ok or not dev_result.ok or resolved_device is None:
        for name in ("detector load", "SAM load", "warm-up"):
            results.append(CheckResult(name, CheckStatus.SKIP, "skipped: torch or the device is not usable"))
        return results

    detector = segmenter = None
    if det_files_ok:
        start = time.perf_counter()
        detector, res = load_detector(det_path, resolved_device)
        res.duration_ms = (time.perf_counter() - start) * 1000.0
        results.append(res)
    else:
        results.append(CheckResult("detector load", CheckStatus.SKIP, "skipped: detector files missing"))
    if sam_files_ok:
        start = time.perf_counter()
        segmenter, res = load_segmenter(find_sam_checkpoint(sam_path), sam_type, resolved_device)
        res.duration_ms = (time.perf_counter() - start) * 1000.0
        results.append(res)
    else:
        results.append(CheckResult("SAM load", CheckStatus.SKIP, "skipped: SAM checkpoint missing"))

    if not warmup:
        results.append(CheckResult("warm-up", CheckStatus.SKIP, "skipped on request"))
    elif detector is None or segmenter is None:
        results.append(CheckResult("warm-up", CheckStatus.SKIP, "skipped: a model did not load"))
    else:
        results.append(
            _timed(
                "warm-up", lambda: check_warmup(detector, segmenter, resolved_device, input_path=warmup_input)
            )
        )
    return results


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import add_model_arguments

    parser.description = (
        "Pre-flight check of Python, torch, the device (CUDA, GPU memory, kernels for the GPU) and the "
        "model files, then both models loaded and timed on warm-up frames. Models: the shipped demo pack "
        "unless named. Exit 0 when ready (warnings allowed), 1 when a check failed."
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the timed warm-up frames")
    parser.add_argument(
        "--input",
        default=None,
        metavar="REC",
        help="time the warm-up on this recording's first frame (your frame size, colour kept) instead of "
        "a phantom frame",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the report (or JSON); 1 if a check failed, else 0. Missing model files are FAIL results."""
    from UltramotionIGTLib.tools.options import resolve_model_source

    source = resolve_model_source(args, check_files=False)
    pack = [_timed("pack", lambda: check_pack(source.pack, source.zip_path))] if source.pack else []
    results = pack + run_checks(
        device=args.device,
        detector_dir=source.detector,
        sam_checkpoint=source.sam,
        sam_type=source.sam_type,
        warmup=not args.no_warmup,
        warmup_input=args.input,
    )
    if args.json:
        import json

        from UltramotionIGTLib.core.kpi import format_kpi

        payload = [
            json.loads(
                format_kpi(
                    {
                        "event": "check",
                        "name": r.name,
                        "status": r.status.value,
                        "summary": r.summary,
                        "advice": r.advice,
                        "duration_ms": r.duration_ms,
                        "details": r.details,
                    }
                )
            )
            for r in results
        ]
        print(json.dumps({"ready": all_ok(results), "checks": payload}, indent=2))
    else:
        print(format_report(results))
    return 0 if all_ok(results) else 1
