"""`ModelSource`: which detector and SAM checkpoint a pipeline is built from.

One value the command line, the Slicer module and the gateway all resolve their model options to
(a pack, explicit paths, or the shipped demo pack). No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from UltramotionIGTLib.errors import CheckpointError


@dataclass(frozen=True)
class ModelSource:
    """A D-FINE detector folder, a SAM checkpoint file and the SAM type (``auto``: from the file)."""

    detector: Path
    sam: Path
    sam_type: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "detector", Path(self.detector).expanduser())
        object.__setattr__(self, "sam", Path(self.sam).expanduser())
        object.__setattr__(self, "sam_type", str(self.sam_type or "auto"))

    @classmethod
    def demo(cls) -> ModelSource:
        """The shipped demo models; `CheckpointError` saying what to do when they are not installed."""
        from UltramotionIGTLib.models.packs import default_models, models_root

        found = default_models()
        if found["detector"] is None or found["sam"] is None:
            raise CheckpointError(
                f"the shipped demo models were not found in {models_root()}: choose a D-FINE detector folder "
                "and a SAM checkpoint (or reinstall the extension)"
            )
        return cls(found["detector"], found["sam"], "auto")

    @classmethod
    def from_paths(
        cls, detector: str | Path | None, sam: str | Path | None, sam_type: str = "auto"
    ) -> ModelSource:
        """Explicit paths; where either is missing (None or empty), both come from the demo pack."""
        if _unset(detector) or _unset(sam):
            if not (_unset(detector) and _unset(sam)):
                given = "detector" if _unset(sam) else "SAM checkpoint"
                missing = "SAM checkpoint" if _unset(sam) else "detector folder"
                raise CheckpointError(
                    f"a {given} was given without a {missing}: give both, or neither for the demo models"
                )
            return cls.demo()
        return cls(Path(detector), Path(sam), sam_type)


def _unset(path: str | Path | None) -> bool:
    return path is None or str(path).strip() in ("", ".")
