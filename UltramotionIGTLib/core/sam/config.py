"""SAM architectures: `SamConfig`, the registry `SAM_CONFIGS`, building a model, and reading a config
off a state dict's shapes.

Built on ``segment_anything``'s own modeling blocks (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`, `Sam`); `build_sam_model` mirrors ``segment_anything/build_sam.py::_build_sam``
with every size taken from the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from UltramotionIGTLib.errors import CheckpointError

OFFICIAL_SAM_TYPES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h")
_TYPE_ALIASES = {"default": "vit_h"}


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model (one config dataclass per component; this is SAM's).

    The defaults are the official ViT-B; `SAM_CONFIGS` holds the official vit_b/l/h and the small
    ``vit_t_demo``. ``image_size`` is the square input of the image encoder (the longest image side
    is resized to it); the image embedding is ``image_size // vit_patch_size`` square and the
    low-resolution masks are 4x that.
    """

    name: str = "custom"
    image_size: int = 1024
    vit_patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_mlp_ratio: float = 4.0
    window_size: int = 14
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs stay hashable and comparable.
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        problems = []
        if self.image_size % self.vit_patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of vit_patch_size")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append("encoder_embed_dim is not a multiple of encoder_num_heads")
        if (self.prompt_embed_dim // 2) % self.decoder_num_heads or self.prompt_embed_dim % 8:
            problems.append("prompt_embed_dim must be a multiple of 8 and of 2 * decoder_num_heads")
        if self.mask_in_chans % 4:
            problems.append("mask_in_chans must be a multiple of 4")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            problems.append("encoder_global_attn_indexes must lie in [0, encoder_depth)")
        if problems:
            raise ValueError(f"invalid SamConfig {self.name!r}: " + "; ".join(problems))

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding (tokens per side)."""
        return self.image_size // self.vit_patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig keys: {', '.join(unknown)}")
        return cls(**data)

    def same_architecture(self, other: SamConfig) -> bool:
        """True when both configs build identical models (the ``name`` is ignored)."""
        return replace(self, name="") == replace(other, name="")


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(name="vit_b"),
    "vit_l": SamConfig(
        name="vit_l",
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        name="vit_h",
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # Small and fast on CPU, for the demo models trained on the synthetic phantom. Measured on one
    # core of the 2-core dev machine: image encoder ~19 ms at 256x256, mask decoder ~11 ms for 8
    # boxes. 16x16 tokens, 4 blocks of width 160 (2 windowed 8x8, 2 global); 64-dim prompt/decoder
    # space (a 128-dim one costs ~25 ms for 8 boxes). Low-res masks are 64x64.
    "vit_t_demo": SamConfig(
        name="vit_t_demo",
        image_size=256,
        vit_patch_size=16,
        encoder_embed_dim=160,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=256,
        decoder_num_heads=2,
        iou_head_hidden_dim=64,
    ),
}
"""Registry of known SAM architectures by model type name."""


def get_sam_config(model_type: str | SamConfig) -> SamConfig:
    """The config for a registry name (``vit_b`` ...) or a `SamConfig` passed through.

    Raises `CheckpointError` listing the known names for an unknown one.
    """
    if isinstance(model_type, SamConfig):
        return model_type
    name = _TYPE_ALIASES.get(model_type, model_type)
    if name not in SAM_CONFIGS:
        raise CheckpointError(
            f"unknown SAM model type {model_type!r}: use auto or one of {', '.join(SAM_CONFIGS)}"
        )
    return SAM_CONFIGS[name]


def build_sam_model(config: SamConfig | str) -> Sam:
    """A `segment_anything.modeling.Sam` with this architecture and fresh (random) weights, in eval mode.

    Mirrors ``segment_anything.build_sam._build_sam`` with every size taken from the config.
    """
    config = get_sam_config(config)
    embedding = config.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=config.encoder_mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.vit_patch_size,
            qkv_bias=True,
            use_rel_pos=config.use_rel_pos,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(embedding, embedding),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    return sam.eval()


def infer_sam_config(state_dict: dict[str, torch.Tensor]) -> SamConfig:
    """Read a SAM architecture off a state dict's tensor shapes.

    Everything is visible in the shapes except the decoder's number of attention heads, which is taken
    from a registry config with the same decoder width, else 8 (the official value). The returned
    config is named after the registry entry it equals, else ``"custom"``. Raises KeyError/ValueError
    when the dict is not a SAM state dict.
    """
    sd = state_dict
    embed_dim, _, patch, _ = sd["image_encoder.patch_embed.proj.weight"].shape
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = 0
    while f"image_encoder.blocks.{depth}.norm1.weight" in sd:
        depth += 1
    if depth == 0:
        raise KeyError("image_encoder.blocks.0.norm1.weight")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    global_idx: list[int] = []
    window = 0
    num_heads = 0
    if use_rel_pos:
        num_heads = embed_dim // sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        for i in range(depth):
            span = (sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2
            if span == grid:
                global_idx.append(i)
            else:
                window = span
    mlp_hidden = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
    decoder_depth = 0
    while f"mask_decoder.transformer.layers.{decoder_depth}.norm1.weight" in sd:
        decoder_depth += 1
    iou_depth = 0
    while f"mask_decoder.iou_prediction_head.layers.{iou_depth}.weight" in sd:
        iou_depth += 1
    decoder_heads = 8
    for cfg in SAM_CONFIGS.values():
        if cfg.prompt_embed_dim == prompt_dim:
            decoder_heads = cfg.decoder_num_heads
            break
    inferred = SamConfig(
        name="custom",
        image_size=int(grid * patch),
        vit_patch_size=int(patch),
        encoder_embed_dim=int(embed_dim),
        encoder_depth=depth,
        encoder_num_heads=int(num_heads) if num_heads else SamConfig.encoder_num_heads,
        encoder_global_attn_indexes=tuple(global_idx),
        encoder_mlp_ratio=mlp_hidden / embed_dim,
        window_size=window if window else grid,
        use_rel_pos=use_rel_pos,
        prompt_embed_dim=int(prompt_dim),
        mask_in_chans=int(sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        decoder_depth=decoder_depth,
        decoder_mlp_dim=int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        decoder_num_heads=decoder_heads,
        num_multimask_outputs=int(sd["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
    )
    for cfg in SAM_CONFIGS.values():
        if cfg.same_architecture(inferred):
            return cfg
    return inferred


def _describe_config(config: SamConfig) -> str:
    return (
        f"image_size={config.image_size}, patch={config.vit_patch_size}, "
        f"embed_dim={config.encoder_embed_dim}, depth={config.encoder_depth}, "
        f"prompt_embed_dim={config.prompt_embed_dim}"
    )


def _looks_like(state_dict: dict[str, torch.Tensor]) -> str:
    """A short guess of what a state dict is, for error messages."""
    try:
        guess = infer_sam_config(state_dict)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return "it does not look like a SAM state dict"
    if guess.name != "custom":
        return f"it looks like SAM type {guess.name!r}"
    return f"it looks like a custom SAM config ({_describe_config(guess)})"
