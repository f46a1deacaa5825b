"""Box-prompted SAM on the device, split by job (in the order a frame meets them):

- `config`: `SamConfig`, the registry `SAM_CONFIGS` (SAM vit_b/l/h, MobileSAM ``vit_t``, MedSAM
  ``medsam``, our demo ``vit_t_demo``), `build_sam_model`, `infer_sam_config` (architecture from a
  state dict's shapes), `describe_sam` (family, encoder, input size, parameters, for reports);
- `checkpoint`: reading/recognising/writing checkpoint files (weights_only / safetensors only), and
  one line for the formats not run here (SAM 2, HQ-SAM, transformers);
- `resize`: each family's image resize on the device (Pillow-exact longest side; MedSAM's square);
- `encoder`: the image encoder's attention without host tensors;
- `segmenter`: `SamSegmenter` (one embedding per frame, one decoder call for all boxes) and `SamOutput`.

The names below are the package's public API; import them from here.
"""

from UltramotionIGTLib.core.sam.checkpoint import (
    CHECKPOINT_FORMAT,
    SUPPORTED_SAM_FORMATS,
    load_sam,
    load_sam_with_config,
    random_sam_model,
    read_sam_checkpoint,
    resolve_sam_checkpoint,
    save_sam_checkpoint,
    sidecar_config_path,
    write_random_sam_checkpoint,
)
from UltramotionIGTLib.core.sam.config import (
    MEDSAM_TYPE,
    MOBILE_SAM_TYPE,
    OFFICIAL_SAM_TYPES,
    SAM_CONFIGS,
    SamConfig,
    build_sam_model,
    describe_sam,
    get_sam_config,
    infer_sam_config,
)
from UltramotionIGTLib.core.sam.encoder import make_encoder_device_resident
from UltramotionIGTLib.core.sam.resize import (
    get_preprocess_shape,
    resize_longest_side_uint8,
    resize_square_medsam,
)
from UltramotionIGTLib.core.sam.segmenter import SamOutput, SamSegmenter

__all__ = [
    "CHECKPOINT_FORMAT",
    "MEDSAM_TYPE",
    "MOBILE_SAM_TYPE",
    "OFFICIAL_SAM_TYPES",
    "SAM_CONFIGS",
    "SUPPORTED_SAM_FORMATS",
    "SamConfig",
    "SamOutput",
    "SamSegmenter",
    "build_sam_model",
    "describe_sam",
    "get_preprocess_shape",
    "get_sam_config",
    "infer_sam_config",
    "load_sam",
    "load_sam_with_config",
    "make_encoder_device_resident",
    "random_sam_model",
    "read_sam_checkpoint",
    "resize_longest_side_uint8",
    "resize_square_medsam",
    "resolve_sam_checkpoint",
    "save_sam_checkpoint",
    "sidecar_config_path",
    "write_random_sam_checkpoint",
]
