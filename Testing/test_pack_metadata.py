"""SAM checkpoint type from safetensors metadata (read by safetensors' own header reader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from UltramotionIGTLib.core.sam import write_random_sam_checkpoint
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.models.packs import describe_segmenter


def test_segmenter_type_comes_from_the_safetensors_metadata(tmp_path: Path) -> None:
    write_random_sam_checkpoint(tmp_path / "sam" / "weights.safetensors", model_type="vit_t_demo", seed=0)
    spec = describe_segmenter(tmp_path, "sam/weights.safetensors")
    assert spec.model_type == "vit_t_demo"
    assert set(spec.files) == {"sam/weights.safetensors"}  # no sidecar: the type is in the file
    with pytest.raises(CheckpointError, match="says it is type 'vit_t_demo'"):
        describe_segmenter(tmp_path, "sam/weights.safetensors", sam_type="vit_b")


def test_cut_safetensors_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = write_random_sam_checkpoint(tmp_path / "weights.safetensors", model_type="vit_t_demo", seed=0)
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[:40])  # the 8-byte length and the start of the JSON header only
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        describe_segmenter(tmp_path, "weights.safetensors")
