"""Random-weight models in the real architectures, for timing at production size without a download.

The published sizes the issue's targets are stated for: D-FINE-S and D-FINE-L (HGNetV2 B0 / B4
backbones, the architectures of the ``dfine_s_coco`` / ``dfine_l_coco`` checkpoints as transformers'
D-FINE conversion configures them: 10.3 M and 31.2 M parameters with 80 classes), SAM ViT-B at
1024 px and MobileSAM (TinyViT, ``vit_t``). Weights are random (seeded), so what they detect means
nothing: they are for ``bench pipeline`` and the GPU script (``tools/benchmarks/gpu_run.sh`` at the
repository root).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from UltramotionIGTLib import CLASS_NAMES

#: D-FINE sizes this module builds
DFINE_SIZES: tuple[str, ...] = ("s", "l")
#: SAM types written by `write_real_size_models` (the registry's names)
SAM_TYPES: tuple[str, ...] = ("vit_b", "vit_t")

# HGNetV2 stage settings per D-FINE size: stem channels, then per stage in/mid/out channels, blocks,
# layers per block, kernel size; plus the hybrid encoder and decoder settings that differ from
# transformers' DFineConfig defaults (which are D-FINE-L's).
_DFINE = {
    "s": {
        "backbone": {
            "stem_channels": [3, 16, 16],
            "stage_in_channels": [16, 64, 256, 512],
            "stage_mid_channels": [16, 32, 64, 128],
            "stage_out_channels": [64, 256, 512, 1024],
            "stage_num_blocks": [1, 1, 2, 1],
            "stage_numb_of_layers": [3, 3, 3, 3],
            "hidden_sizes": [128, 256, 512, 1024],
            "use_learnable_affine_block": True,
        },
        "model": {
            "encoder_in_channels": [256, 512, 1024],
            "decoder_layers": 3,
            "hidden_expansion": 0.5,
            "depth_mult": 0.34,
        },
    },
    "l": {
        "backbone": {
            "stem_channels": [3, 32, 48],
            "stage_in_channels": [48, 128, 512, 1024],
            "stage_mid_channels": [48, 96, 192, 384],
            "stage_out_channels": [128, 512, 1024, 2048],
            "stage_num_blocks": [1, 1, 3, 1],
            "stage_numb_of_layers": [6, 6, 6, 6],
            "hidden_sizes": [256, 512, 1024, 2048],
            "use_learnable_affine_block": False,
        },
        "model": {
            "encoder_in_channels": [512, 1024, 2048],
            "encoder_ffn_dim": 1024,
            "decoder_layers": 6,
            "hidden_expansion": 1.0,
        },
    },
}


def dfine_config(size: str, class_names: Sequence[str] = CLASS_NAMES, image_size: int = 640) -> Any:
    """A `transformers.DFineConfig` of D-FINE-``size`` (``s`` or ``l``) with ``class_names`` and a
    square ``image_size`` input (640 as published). Raises ValueError for another size."""
    from transformers import DFineConfig

    if size not in _DFINE:
        raise ValueError(f"D-FINE size must be one of {', '.join(DFINE_SIZES)}, got {size!r}")
    spec = _DFINE[size]
    config = DFineConfig(
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
        decoder_n_points=[3, 6, 3],
        **spec["model"],
    )
    backbone = config.backbone_config
    backbone.embedding_size = 32
    backbone.layer_type = "basic"
    backbone.stage_downsample = [False, True, True, True]
    backbone.stage_light_block = [False, False, True, True]
    backbone.stage_kernel_size = [3, 3, 5, 5]
    for key, value in spec["backbone"].items():
        setattr(backbone, key, value)
    config.image_size = [image_size, image_size]
    return config


def write_random_dfine(folder: str | Path, size: str, seed: int = 0, image_size: int = 640) -> Path:
    """Write a random-weight D-FINE-``size`` detector folder (the real HF format); returns it."""
    import torch
    from transformers import DFineForObjectDetection

    from UltramotionIGTLib.core.detector import save_detector_folder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DFineForObjectDetection(dfine_config(size, image_size=image_size)).eval()
    return save_detector_folder(model, folder, image_size)


def write_real_size_models(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write D-FINE-S and -L folders (``detector-dfine-s``, ``detector-dfine-l``) and SAM ViT-B and
    MobileSAM checkpoints (``sam/sam_vit_b.safetensors``, ``sam/mobile_sam_vit_t.safetensors``) with
    random weights under ``out``. Returns name -> path. About 0.6 GB on disk."""
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    out = Path(out)
    written = {
        f"dfine-{size}": write_random_dfine(out / f"detector-dfine-{size}", size, seed)
        for size in DFINE_SIZES
    }
    written["sam-vit_b"] = write_random_sam_checkpoint(out / "sam" / "sam_vit_b.safetensors", "vit_b", seed)
    written["sam-vit_t"] = write_random_sam_checkpoint(
        out / "sam" / "mobile_sam_vit_t.safetensors", "vit_t", seed
    )
    return written
