"""SAM architectures: `SamConfig`, the registry `SAM_CONFIGS`, building a model, reading a config off
a state dict's shapes, and describing a model (`describe_sam`).

Three families share SAM's prompt encoder and mask decoder (``segment_anything``'s blocks) and
differ in the image encoder or in the preprocessing the weights were trained with
(`SamConfig.family`):

* **SAM** (Meta's ``segment_anything``): ViT image encoder (`ImageEncoderViT`); the official
  ``vit_b``/``vit_l``/``vit_h`` and our small ``vit_t_demo`` (a ViT, not MobileSAM's encoder).
  Preprocessing ``"sam"``: longest side resized to ``image_size`` (Pillow bilinear), pixel mean/std
  normalisation, zero padding to a square.
* **MobileSAM** (``vit_t``, the name MobileSAM's own registry uses): the TinyViT image encoder of the
  ``mobile_sam`` package (PyPI ``mobilesam-mirror``, needs ``timm``), imported only when such a
  model is built; SAM's preprocessing.
* **MedSAM** (``medsam``): SAM ViT-B fine-tuned on medical images with its own preprocessing
  ``"medsam"`` (bowang-lab/MedSAM ``MedSAM_Inference.py``): the image resized to ``image_size``
  square (``skimage.transform.resize`` bicubic, anti-aliased; the aspect ratio is not kept), min-max
  scaled to 0..1, no mean/std, no padding; masks from the low-resolution probabilities resized
  straight to the frame.

`build_sam_model` mirrors ``segment_anything/build_sam.py::_build_sam`` (and MobileSAM's
``build_sam_vit_t``) with every size taken from the config.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache, partial
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
"""Meta's released SAM types (plain state dicts, recognised from their shapes)."""

MOBILE_SAM_TYPE = "vit_t"
"""MobileSAM's registry name for its TinyViT model (``mobile_sam.pt``); not our ``vit_t_demo``."""

MEDSAM_TYPE = "medsam"
"""MedSAM: the ViT-B architecture with MedSAM's preprocessing."""

IMAGE_ENCODERS: tuple[str, ...] = ("vit", "tiny_vit")
PREPROCESSINGS: tuple[str, ...] = ("sam", "medsam")
FAMILY_NAMES = {"sam": "SAM", "mobilesam": "MobileSAM", "medsam": "MedSAM"}

_TYPE_ALIASES = {
    "default": "vit_h",
    "mobile_sam": MOBILE_SAM_TYPE,
    "mobilesam": MOBILE_SAM_TYPE,
    "medsam_vit_b": MEDSAM_TYPE,
}


@dataclass(frozen=True)
class SamConfig:
    """Architecture and preprocessing of a SAM model (one config dataclass per component; this is SAM's).

    The defaults are the official ViT-B; `SAM_CONFIGS` holds the official vit_b/l/h, MobileSAM's
    ``vit_t``, ``medsam`` and the small ``vit_t_demo``. ``image_size`` is the square input of the
    image encoder; the image embedding is ``image_size // vit_patch_size`` square (TinyViT also
    downsamples 16x) and the low-resolution masks are 4x that.

    ``image_encoder``: ``"vit"`` (segment_anything's ViT; the ``encoder_*`` fields, ``window_size``
    and ``use_rel_pos`` apply) or ``"tiny_vit"`` (MobileSAM's TinyViT; the ``tiny_vit_*`` fields, one
    entry per stage, apply; the package fixes ``image_size`` 1024 and ``prompt_embed_dim`` 256).
    ``preprocessing``: ``"sam"`` (longest side, mean/std, padding) or ``"medsam"`` (square resize,
    min-max to 0..1); see the module docstring.
    """

    name: str = "custom"
    image_encoder: str = "vit"
    preprocessing: str = "sam"
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
    tiny_vit_embed_dims: tuple[int, ...] = ()
    tiny_vit_depths: tuple[int, ...] = ()
    tiny_vit_num_heads: tuple[int, ...] = ()
    tiny_vit_window_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs stay hashable and comparable.
        for name in (
            "encoder_global_attn_indexes",
            "tiny_vit_embed_dims",
            "tiny_vit_depths",
            "tiny_vit_num_heads",
            "tiny_vit_window_sizes",
        ):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        problems = []
        if self.image_encoder not in IMAGE_ENCODERS:
            problems.append(f"image_encoder must be one of {', '.join(IMAGE_ENCODERS)}")
        if self.preprocessing not in PREPROCESSINGS:
            problems.append(f"preprocessing must be one of {', '.join(PREPROCESSINGS)}")
        if self.image_encoder == "tiny_vit":
            problems.extend(self._tiny_vit_problems())
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

    def _tiny_vit_problems(self) -> list[str]:
        # What MobileSAM's TinyViT hard-codes: a 64x64 token grid from a 1024 input (16x downsampling,
        # the last stage keeps its resolution only for these widths) and a 256-channel neck.
        problems = []
        stages = (
            self.tiny_vit_embed_dims,
            self.tiny_vit_depths,
            self.tiny_vit_num_heads,
            self.tiny_vit_window_sizes,
        )
        if len(stages[0]) < 2 or any(len(v) != len(stages[0]) for v in stages):
            problems.append(
                "tiny_vit_embed_dims/depths/num_heads/window_sizes need one entry per stage (>= 2)"
            )
        elif self.tiny_vit_embed_dims[-1] not in (320, 448, 576):
            problems.append(
                "the last tiny_vit_embed_dims entry must be 320, 448 or 576 (TinyViT's stride-1 stage)"
            )
        if self.image_size != 1024 or self.vit_patch_size != 16:
            problems.append("a tiny_vit encoder needs image_size 1024 and vit_patch_size 16")
        if self.prompt_embed_dim != 256:
            problems.append("a tiny_vit encoder needs prompt_embed_dim 256")
        return problems

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding (tokens per side)."""
        return self.image_size // self.vit_patch_size

    @property
    def family(self) -> str:
        """``"sam"``, ``"mobilesam"`` (TinyViT encoder) or ``"medsam"`` (MedSAM's preprocessing)."""
        if self.preprocessing == "medsam":
            return "medsam"
        if self.image_encoder == "tiny_vit":
            return "mobilesam"
        return "sam"

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
        """True when both configs build identical models with the same preprocessing (``name`` ignored)."""
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
    # MobileSAM's build_sam_vit_t: TinyViT-5M encoder, SAM's prompt encoder and mask decoder.
    MOBILE_SAM_TYPE: SamConfig(
        name=MOBILE_SAM_TYPE,
        image_encoder="tiny_vit",
        tiny_vit_embed_dims=(64, 128, 160, 320),
        tiny_vit_depths=(2, 2, 6, 2),
        tiny_vit_num_heads=(2, 4, 5, 10),
        tiny_vit_window_sizes=(7, 7, 14, 7),
    ),
    # MedSAM (medsam_vit_b.pth): the official ViT-B with MedSAM's preprocessing.
    MEDSAM_TYPE: SamConfig(name=MEDSAM_TYPE, preprocessing="medsam"),
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


def _tiny_vit_class() -> type[torch.nn.Module]:
    """MobileSAM's `TinyViT` (package ``mobile_sam`` from PyPI ``mobilesam-mirror``), imported on first use.

    Importing it registers MobileSAM's TinyViT variants in timm's model registry (over timm's own
    ``tiny_vit_*_224`` entries) and timm warns about that and about its old import paths; those
    warnings are about the package, not the user's model, so they are silenced here.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Importing from timm\.models", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"Overwriting tiny_vit_", category=UserWarning)
            from mobile_sam.modeling import TinyViT
    except ImportError as exc:
        raise CheckpointError(
            "MobileSAM (vit_t) needs the packages mobilesam-mirror and timm, which are not installed "
            f"({exc}): pip install mobilesam-mirror timm"
        ) from exc
    return TinyViT


def _build_image_encoder(config: SamConfig) -> torch.nn.Module:
    if config.image_encoder == "tiny_vit":
        # MobileSAM's build_sam_vit_t, sizes from the config: the ImageNet head (num_classes 1000) is
        # unused but part of the released checkpoint; layer_lr_decay only tags parameters for training.
        return _tiny_vit_class()(
            img_size=config.image_size,
            in_chans=3,
            num_classes=1000,
            embed_dims=list(config.tiny_vit_embed_dims),
            depths=list(config.tiny_vit_depths),
            num_heads=list(config.tiny_vit_num_heads),
            window_sizes=list(config.tiny_vit_window_sizes),
            mlp_ratio=config.encoder_mlp_ratio,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    return ImageEncoderViT(
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
    )


def build_sam_model(config: SamConfig | str) -> Sam:
    """A `segment_anything.modeling.Sam` with this architecture and fresh (random) weights, in eval mode.

    Mirrors ``segment_anything.build_sam._build_sam`` (ViT) and MobileSAM's ``build_sam_vit_t``
    (TinyViT, from the ``mobile_sam`` package) with every size taken from the config. Raises
    `CheckpointError` when a TinyViT model is asked for and ``mobile_sam``/``timm`` are missing.

    A TinyViT encoder caches its attention biases when switched to eval mode: call ``.eval()``
    again after loading weights (`load_sam` does).
    """
    config = get_sam_config(config)
    embedding = config.embedding_size
    sam = Sam(
        image_encoder=_build_image_encoder(config),
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


def _count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many consecutive ``prefix.format(i)`` (i = 0, 1, ...) start some key of the state dict."""
    n = 0
    while any(key.startswith(prefix.format(n)) for key in state_dict):
        n += 1
    return n


def _infer_vit_encoder(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
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
    return dict(
        image_encoder="vit",
        image_size=int(grid * patch),
        vit_patch_size=int(patch),
        encoder_embed_dim=int(embed_dim),
        encoder_depth=depth,
        encoder_num_heads=int(num_heads) if num_heads else SamConfig.encoder_num_heads,
        encoder_global_attn_indexes=tuple(global_idx),
        encoder_mlp_ratio=mlp_hidden / embed_dim,
        window_size=window if window else grid,
        use_rel_pos=use_rel_pos,
    )


def _infer_tiny_vit_encoder(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    # Stage 0 is convolutional (MBConv): no heads and no window in its shapes, so those two entries
    # come from MobileSAM's config. Attention stages: heads = rows of attention_biases, and a window of
    # w x w tokens has w*w distinct offsets. The input size is not in the shapes (convolutions and
    # windows); TinyViT's forward fixes it at 1024.
    mobile = SAM_CONFIGS[MOBILE_SAM_TYPE]
    stages = _count(sd, "image_encoder.layers.{}.")
    if stages < 2:
        raise KeyError("image_encoder.layers.1")
    dims, depths, heads, windows = [], [], [], []
    for i in range(stages):
        depths.append(_count(sd, f"image_encoder.layers.{i}.blocks.{{}}."))
        if i == 0:
            dims.append(int(sd["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[1]))
            heads.append(mobile.tiny_vit_num_heads[0])
            windows.append(mobile.tiny_vit_window_sizes[0])
            continue
        biases = sd[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]
        dims.append(int(sd[f"image_encoder.layers.{i}.blocks.0.attn.norm.weight"].shape[0]))
        heads.append(int(biases.shape[0]))
        windows.append(round(int(biases.shape[1]) ** 0.5))
    mlp_hidden = sd["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        image_encoder="tiny_vit",
        image_size=mobile.image_size,
        vit_patch_size=mobile.vit_patch_size,
        encoder_mlp_ratio=mlp_hidden / dims[1],
        tiny_vit_embed_dims=tuple(dims),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
    )


def infer_sam_config(state_dict: dict[str, torch.Tensor]) -> SamConfig:
    """Read a SAM architecture off a state dict's tensor shapes (ViT or MobileSAM's TinyViT encoder).

    Everything is visible in the shapes except the decoder's number of attention heads, which is taken
    from a registry config with the same decoder width, else 8 (the official value); for TinyViT also
    the convolutional first stage's (unused) heads and window. The preprocessing is not in the shapes:
    the result has SAM's (a MedSAM file is recognised from its wrapper or name, see
    `resolve_sam_checkpoint`). The returned config is named after the registry entry it equals, else
    ``"custom"``. Raises KeyError/ValueError when the dict is not a SAM state dict.
    """
    sd = state_dict
    if "image_encoder.patch_embed.seq.0.c.weight" in sd:
        encoder = _infer_tiny_vit_encoder(sd)
    else:
        encoder = _infer_vit_encoder(sd)
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
        **encoder,
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
    if config.image_encoder == "tiny_vit":
        encoder = (
            f"TinyViT embed_dims={list(config.tiny_vit_embed_dims)}, depths={list(config.tiny_vit_depths)}"
        )
    else:
        encoder = (
            f"image_size={config.image_size}, patch={config.vit_patch_size}, "
            f"embed_dim={config.encoder_embed_dim}, depth={config.encoder_depth}"
        )
    extra = ", MedSAM preprocessing" if config.preprocessing == "medsam" else ""
    return f"{encoder}, prompt_embed_dim={config.prompt_embed_dim}{extra}"


def encoder_label(config: SamConfig) -> str:
    """The image encoder's usual name: ``"ViT-B"``, ``"ViT-L"``, ``"ViT-H"``, ``"TinyViT-5M"`` ..., else
    its sizes (``"ViT (width 160, 4 blocks)"``)."""
    if config.image_encoder == "tiny_vit":
        named = {
            (64, 128, 160, 320): "TinyViT-5M",
            (64, 128, 256, 448): "TinyViT-11M",
            (96, 192, 384, 576): "TinyViT-21M",
        }
        label = named.get(config.tiny_vit_embed_dims)
        if label and config.tiny_vit_depths == (2, 2, 6, 2):
            return label
        return f"TinyViT (widths {list(config.tiny_vit_embed_dims)}, depths {list(config.tiny_vit_depths)})"
    official = {(768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
    label = official.get((config.encoder_embed_dim, config.encoder_depth))
    return label or f"ViT (width {config.encoder_embed_dim}, {config.encoder_depth} blocks)"


def _looks_like(state_dict: dict[str, torch.Tensor]) -> str:
    """A short guess of what a state dict is, for error messages."""
    try:
        guess = infer_sam_config(state_dict)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return "it does not look like a SAM state dict"
    family = f" ({FAMILY_NAMES[guess.family]}, {encoder_label(guess)})"
    if guess.name != "custom":
        return f"it looks like SAM type {guess.name!r}{family}"
    return f"it looks like a custom SAM config{family}: {_describe_config(guess)}"


_PREPROCESSING_TEXT = {
    "sam": "longest side resized to {size} (Pillow bilinear), pixel mean/std, zero-padded to {size}x{size}",
    "medsam": "resized to {size}x{size} (bicubic, anti-aliased, aspect not kept), min-max scaled to 0..1",
}


@lru_cache(maxsize=16)
def _parameter_count(config: SamConfig) -> int:
    # Counting needs only shapes: build on the meta device (no memory, no init). TinyViT's constructor
    # reads a scalar off a tensor (.item()), which meta tensors cannot give: build it on the CPU (5M).
    if config.image_encoder == "vit":
        with torch.device("meta"):
            model = build_sam_model(config)
    else:
        model = build_sam_model(config)
    return sum(p.numel() for p in model.parameters())


def describe_sam(config_or_model: Any) -> dict[str, Any]:
    """What a SAM model is, for reports (``doctor``, model packs): a JSON-ready dict.

    ``config_or_model``: a `SamConfig`, a registry name (``"vit_b"``, ``"vit_t"``, ``"medsam"`` ...),
    a loaded `Sam` model (its ``sam_config``, else its config read off its state dict) or a
    `SamSegmenter`. Returns ``{"family": "sam"|"mobilesam"|"medsam", "family_name": "SAM"|...,
    "model_type": name, "image_encoder": "ViT-B"|"TinyViT-5M"|..., "input_size": [H, W] pixels,
    "embedding_size": [h, w] tokens, "preprocessing": one line, "parameters": int}``. For a model the
    parameters are counted on it, for a config on a shape-only (meta-device) build. Raises
    `CheckpointError` for an unknown name.
    """
    model = None
    config: SamConfig | None
    if isinstance(config_or_model, (SamConfig, str)):
        config = get_sam_config(config_or_model)
    else:
        model = getattr(config_or_model, "model", config_or_model)  # a SamSegmenter holds .model
        config = getattr(config_or_model, "config", None) or getattr(model, "sam_config", None)
        if config is None:
            config = infer_sam_config(model.state_dict())
    if model is not None:
        parameters = sum(p.numel() for p in model.parameters())
    else:
        parameters = _parameter_count(config)
    size = config.image_size
    return {
        "family": config.family,
        "family_name": FAMILY_NAMES[config.family],
        "model_type": config.name,
        "image_encoder": encoder_label(config),
        "input_size": [size, size],
        "embedding_size": [config.embedding_size, config.embedding_size],
        "preprocessing": _PREPROCESSING_TEXT[config.preprocessing].format(size=size),
        "parameters": int(parameters),
    }
