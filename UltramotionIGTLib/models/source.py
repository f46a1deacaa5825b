"""`ModelSource`: which detector and SAM checkpoint a pipeline is built from, and `load`ing them.

One value the command line (`UltramotionIGTLib.tools.options.resolve_model_source`), the Slicer
controller and the gateway all resolve their model options to: a pack, explicit paths, or the
shipped demo pack. No torch import at module scope.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import CheckpointError


def demo_missing_message() -> str:
    from UltramotionIGTLib.models.packs import models_root

    return (
        f"the shipped demo models are missing from {models_root()}: reinstall the extension, or pass "
        "--pack NAME|DIR|ZIP or --detector DIR --sam CKPT"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a detector + SAM pair comes from.

    ``detector``: a D-FINE Hugging Face folder; ``sam``: a SAM checkpoint file; ``sam_type``:
    ``"auto"`` or a SAM model type. ``origin``: ``"pack"``, ``"demo"`` (the shipped demo pack, or its
    folders when it has no manifest), ``"paths"`` (explicit) or ``"random"``. ``pack``: the pack folder
    when the models come from one (loaded through `models.packs.load_pack`, which verifies every
    file's sha256 first). ``detector``/``sam`` are None only for a demo pack with missing files
    resolved without checking (the doctor reports them).
    """

    detector: Path | None
    sam: Path | None
    sam_type: str = "auto"
    origin: str = "paths"
    pack: Path | None = None
    pack_name: str | None = None
    #: keeps a temporary folder (unpacked zip, random models) alive as long as the source
    keep: Any = field(default=None, repr=False, compare=False)
    #: the .zip a pack was unpacked from (``pack`` is then a temporary folder): messages name the zip
    zip_path: Path | None = None

    def __post_init__(self) -> None:
        for name in ("detector", "sam"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        object.__setattr__(self, "sam_type", str(self.sam_type or "auto"))

    @classmethod
    def demo(cls) -> ModelSource:
        """The shipped demo pack (verified when loaded); `CheckpointError` when it is not installed."""
        from UltramotionIGTLib.models import packs

        root = packs.models_root()
        if (root / packs.MANIFEST_NAME).is_file():
            manifest = packs.read_manifest(root)
            det, seg = manifest.model("detector"), manifest.model("segmenter")
            if det is not None and seg is not None:
                return cls(
                    root / det.path, root / seg.path, seg.model_type or "auto", "demo", root, manifest.name
                )
        found = packs.default_models()
        if found["detector"] is None or found["sam"] is None:
            raise CheckpointError(demo_missing_message())
        return cls(found["detector"], found["sam"], "auto", "demo")

    @classmethod
    def from_paths(
        cls, detector: str | Path | None, sam: str | Path | None, sam_type: str = "auto"
    ) -> ModelSource:
        """Explicit paths; when both are unset (None or empty) the demo pack. One without the other is
        a `CheckpointError` saying which is missing."""
        if _unset(detector) and _unset(sam):
            return cls.demo()
        if _unset(detector) or _unset(sam):
            missing = "detector folder" if _unset(detector) else "SAM checkpoint"
            raise CheckpointError(f"no {missing} chosen: choose both models, or neither for the demo models")
        return cls(Path(detector), Path(sam), sam_type)

    def describe(self) -> str:
        """One line for reports, e.g. ``model pack 'demo-phantom' (/path)``."""
        if self.pack is not None:
            kind = "shipped demo pack" if self.origin == "demo" else "model pack"
            return f"{kind} {self.pack_name!r} ({self.pack})"
        if self.origin == "random":
            return "random-weight test models"
        if self.origin == "demo":
            return f"shipped demo models ({self.detector} + {self.sam})"
        return f"{self.detector} + {self.sam}"

    def key(self) -> tuple[str, ...]:
        """What identifies the loaded models (for caching a pipeline)."""
        return (str(self.detector), str(self.sam), self.sam_type, str(self.pack))

    def load(self, device: Any = "auto") -> tuple[Any, Any]:
        """(`DFineDetector`, `SamSegmenter`) on ``device``; CheckpointError naming a bad file.

        A pack is verified (`models.packs.load_pack`: sha256 of every file, detector classes as the
        manifest says); explicit paths are loaded as they are.
        """
        if self.pack is not None:
            from UltramotionIGTLib.models.packs import load_pack, naming_the_zip

            with naming_the_zip(self.pack if self.zip_path is not None else None, self.zip_path):
                detector, segmenter, _ = load_pack(self.pack, device=device)
            return detector, segmenter
        if self.detector is None or self.sam is None:
            raise CheckpointError(demo_missing_message())
        from UltramotionIGTLib.core.detector import DFineDetector
        from UltramotionIGTLib.core.device import resolve_device
        from UltramotionIGTLib.core.sam import SamSegmenter

        dev = resolve_device(device)
        return (
            DFineDetector.from_pretrained(self.detector, device=dev),
            SamSegmenter.from_checkpoint(self.sam, model_type=self.sam_type, device=dev),
        )


def _unset(path: str | Path | None) -> bool:
    return path is None or str(path).strip() in ("", ".")
