"""SAM box-prompted segmentation that stays on the device: `SamSegmenter`, configs and checkpoints.

Built on ``segment_anything``'s own modeling blocks (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`, `Sam`). What this module adds to the official `SamPredictor`:

* the image goes in as a device tensor (HxW gray or HxWx3 uint8) and is resized, normalised and padded
  on the device, bit-exactly like `ResizeLongestSide.apply_image` (PIL bilinear with antialiasing) +
  `Sam.preprocess`, so the image embedding is bit-equal to the official predictor's, and so are the
  masks of one box per call (a batch of N boxes may differ in the last bits of the logits, i.e. only at
  pixels whose logit is within ~1e-6 of the threshold);
* all N boxes of a frame go through ONE prompt-encoder + mask-decoder call, and the outputs
  (`SamOutput`: masks, mask probabilities, IoU scores) stay on the device: the resident path
  (``as_numpy=False``) makes no host sync. ``as_numpy=True`` is the legacy path (numpy outputs);
* checkpoints load with ``torch.load(..., weights_only=True)`` or safetensors, never plain pickle, and
  every problem is a `CheckpointError` naming the file.

Checkpoint formats (`load_sam`, `save_sam_checkpoint`):

* **Official ``.pth``** (Meta's ``sam_vit_b_01ec64.pth`` ...): a plain state dict. The architecture is
  given by ``model_type`` (``vit_b``, ``vit_l``, ``vit_h``, or any name in `SAM_CONFIGS`) or, with
  ``model_type="auto"``, recognised from the tensor shapes.
* **safetensors** (``.safetensors``): the state dict, with the config in the file's metadata:
  ``{"format": "ultramotion-igt/sam", "format_version": "1", "model_type": NAME,
  "sam_config": JSON of SamConfig}``.
* **``.pth`` + sidecar JSON**: a plain state dict ``NAME.pth`` next to ``NAME.json`` holding
  ``{"format": "ultramotion-igt/sam", "format_version": 1, "model_type": NAME, "sam_config": {...}}``.

A config carried by the file (metadata or sidecar) defines the architecture; an explicit ``model_type``
must then agree with its name. Files are recognised by their first bytes, not their suffix.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from UltramotionIGTLib.device import resolve_device
from UltramotionIGTLib.errors import CheckpointError, UnsupportedImageTypeError
from UltramotionIGTLib.hostsync import allowed_host_transfer

CHECKPOINT_FORMAT = "ultramotion-igt/sam"
CHECKPOINT_FORMAT_VERSION = 1
OFFICIAL_SAM_TYPES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h")
_TYPE_ALIASES = {"default": "vit_h"}

# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------


def sidecar_config_path(path: str | Path) -> Path:
    """Where the sidecar JSON of a ``.pth`` checkpoint lives: ``NAME.pth`` -> ``NAME.json``."""
    return Path(path).with_suffix(".json")


def _sniff_format(path: Path) -> str:
    """``"torch"`` (zip or legacy pickle), ``"safetensors"``, or raise CheckpointError."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"SAM checkpoint {path} is empty (0 bytes): copy it again")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    raise CheckpointError(
        f"{path} is not a SAM checkpoint: neither a PyTorch file nor safetensors "
        "(unrecognised first bytes); expected an official .pth state dict or a .safetensors file"
    )


def _read_torch_state_dict(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"{path} contains Python objects that safe loading (torch.load weights_only=True) "
                "refuses, so it was not loaded: re-save it as a plain state dict "
                "(torch.save(model.state_dict(), path)) or as safetensors"
            ) from exc
        raise CheckpointError(f"SAM checkpoint {path} is corrupt ({exc}): copy it again") from exc
    except Exception as exc:  # truncated zip, bad records, ...: torch raises RuntimeError and others
        raise CheckpointError(
            f"SAM checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}): copy it again"
        ) from exc
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not any(torch.is_tensor(v) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a SAM state dict")
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # SafetensorError for truncated/corrupt files
        raise CheckpointError(
            f"SAM checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}): copy it again"
        ) from exc
    return tensors, metadata


def _config_from_record(record: dict[str, Any], source: Path) -> SamConfig:
    try:
        raw = record["sam_config"]
        data = json.loads(raw) if isinstance(raw, str) else raw
        config = SamConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid SAM config in {source}: {exc}") from exc
    name = record.get("model_type")
    if name and name != config.name:
        config = replace(config, name=str(name))
    return config


def read_sam_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], SamConfig | None]:
    """Read a SAM checkpoint file into a CPU state dict and the config it carries (None if none).

    Safe by construction: ``torch.load(weights_only=True)`` or safetensors. Raises `CheckpointError`
    naming the file when it is missing, empty, truncated, corrupt, refused by safe loading, not a
    state dict, or when its sidecar JSON is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"SAM checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint {path} is not a file")
    kind = _sniff_format(path)
    config: SamConfig | None = None
    if kind == "safetensors":
        state_dict, metadata = _read_safetensors(path)
        if metadata.get("format") == CHECKPOINT_FORMAT and "sam_config" in metadata:
            config = _config_from_record(metadata, path)
    else:
        state_dict = _read_torch_state_dict(path)
    sidecar = sidecar_config_path(path)
    if config is None and sidecar != path and sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"SAM config sidecar {sidecar} is not valid JSON: {exc}") from exc
        if isinstance(record, dict) and record.get("format") == CHECKPOINT_FORMAT:
            config = _config_from_record(record, sidecar)
    bad = [key for key, value in state_dict.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if bad:
        raise CheckpointError(
            f"{path} is not a SAM state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r})"
        )
    return state_dict, config


def _check_state_dict(model: Sam, state_dict: dict[str, torch.Tensor], config: SamConfig, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    details = []
    if mismatched:
        details.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
    if missing:
        details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    raise CheckpointError(
        f"SAM checkpoint {path} does not match model type {config.name!r} "
        f"({_describe_config(config)}): {'; '.join(details)}; {_looks_like(state_dict)}. "
        "Pass the matching --sam-type / model_type, or auto"
    )


def resolve_sam_checkpoint(
    path: str | Path, model_type: str | SamConfig = "auto"
) -> tuple[dict[str, torch.Tensor], SamConfig]:
    """Read a checkpoint and decide its architecture (see the module docstring for the rules)."""
    path = Path(path)
    state_dict, carried = read_sam_checkpoint(path)
    if carried is not None:
        if isinstance(model_type, SamConfig):
            if not model_type.same_architecture(carried):
                raise CheckpointError(
                    f"SAM checkpoint {path} carries config {carried.name!r} ({_describe_config(carried)}), "
                    f"which differs from the config passed ({_describe_config(model_type)})"
                )
        elif model_type != "auto" and _TYPE_ALIASES.get(model_type, model_type) != carried.name:
            raise CheckpointError(
                f"SAM checkpoint {path} says it is type {carried.name!r}, but {model_type!r} was asked for: "
                f"pass {carried.name!r} or auto"
            )
        return state_dict, carried
    if isinstance(model_type, SamConfig) or model_type != "auto":
        return state_dict, get_sam_config(model_type)
    try:
        config = infer_sam_config(state_dict)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"{path} does not look like a SAM state dict (no usable {exc}): expected keys like "
            "image_encoder.patch_embed.proj.weight"
        ) from exc
    if config.name == "custom":
        raise CheckpointError(
            f"SAM checkpoint {path} is a custom config ({_describe_config(config)}) but carries no config: "
            f"add the sidecar {sidecar_config_path(path).name} (see save_sam_checkpoint) or pass model_type"
        )
    return state_dict, config


def load_sam(
    path: str | Path,
    model_type: str | SamConfig = "auto",
    device: str | torch.device | None = "auto",
) -> Sam:
    """Load a SAM checkpoint into a `Sam` model in eval mode on ``device``.

    ``model_type``: ``"auto"`` (config carried by the file, else recognised from the shapes), a name
    in `SAM_CONFIGS` (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t_demo``) or a `SamConfig`. The model's
    config is attached as ``model.sam_config``. Raises `CheckpointError` naming the file for a missing,
    truncated, corrupt or unsafe file and for keys/shapes that do not fit the type (saying what the
    file looks like), `DeviceUnavailableError` for an unusable device.
    """
    model, _ = load_sam_with_config(path, model_type, device)
    return model


def load_sam_with_config(
    path: str | Path,
    model_type: str | SamConfig = "auto",
    device: str | torch.device | None = "auto",
) -> tuple[Sam, SamConfig]:
    """Like `load_sam`, also returning the resolved `SamConfig`."""
    path = Path(path)
    target = resolve_device(device)
    state_dict, config = resolve_sam_checkpoint(path, model_type)
    model = build_sam_model(config)
    _check_state_dict(model, state_dict, config, path)
    model.load_state_dict(state_dict, strict=True)
    model.sam_config = config
    return model.to(target).eval(), config


def save_sam_checkpoint(
    model: Sam, path: str | Path, config: SamConfig, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights in one of the formats `load_sam` reads, chosen by the suffix.

    ``.safetensors``: state dict + config in the metadata (plus ``metadata``, string values).
    Anything else (``.pth``): a plain state dict (``torch.save``); for a config that is not an
    official type, the sidecar ``NAME.json`` with the config is written too. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    record = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_type": config.name,
        "sam_config": config.to_dict(),
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update(
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": str(CHECKPOINT_FORMAT_VERSION),
                "model_type": config.name,
                "sam_config": json.dumps(config.to_dict()),
            }
        )
        save_file(state_dict, str(path), metadata=meta)
    else:
        torch.save(state_dict, path)
        if config.name not in OFFICIAL_SAM_TYPES:
            if metadata:
                record["metadata"] = dict(metadata)
            sidecar_config_path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def random_sam_model(model_type: str | SamConfig = "vit_t_demo", seed: int = 0) -> Sam:
    """A SAM model with random weights, deterministic by seed, in eval mode on the CPU.

    PyTorch's default initialisation, except that parameters it leaves at zero (positional
    embeddings, relative positions) get N(0, 0.02) noise so that every tensor carries information.
    Does not disturb the global RNG.
    """
    config = get_sam_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam_model(config)
        with torch.no_grad():
            for param in model.parameters():
                if not param.any():
                    param.normal_(0.0, 0.02)
    model.sam_config = config
    return model


def write_random_sam_checkpoint(
    path: str | Path, model_type: str | SamConfig = "vit_t_demo", seed: int = 0
) -> Path:
    """Write a random-weight SAM (`random_sam_model`) in the real format chosen by the suffix.

    For tests and ``make-test-models``: ``.pth`` for an official type is exactly the official layout
    (a plain state dict); ``.pth`` for other types also writes the sidecar JSON; ``.safetensors``
    embeds the config. Returns ``path``.
    """
    config = get_sam_config(model_type)
    return save_sam_checkpoint(random_sam_model(config, seed), path, config)


# ----------------------------------------------------------------------------------------------------
# Device-side image preprocessing, bit-exact with ResizeLongestSide.apply_image (PIL bilinear)
# ----------------------------------------------------------------------------------------------------

_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side ``long_side``; same rounding as `ResizeLongestSide`."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def _pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear taps for one axis: (indices out x K int64, weights out x K int32).

    Same arithmetic as Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (doubles, then
    fixed point with 22 fractional bits, rounded half away from zero); unused taps get weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.int32)
    one = float(1 << _PIL_PRECISION_BITS)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = []
        total = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - t if t < 1.0 else 0.0
            taps.append(w)
            total += w
        for x, w in enumerate(taps):
            if total != 0.0:
                w /= total
            weight[xx, x] = int(w * one - 0.5) if w < 0 else int(w * one + 0.5)
            index[xx, x] = x + xmin
        index[xx, xmax:] = min(xmin + max(xmax - 1, 0), in_size - 1)
    return index, weight


def _resample_rows(x: torch.Tensor, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One Pillow pass along dim 1 of a contiguous CxNxM int32 tensor: rounded, clipped to 0..255.

    Each tap gathers whole rows (``index_select`` on dim 1, memory-friendly) and accumulates
    ``row * weight`` in int32, exactly Pillow's integer arithmetic.
    """
    index, weight = taps[0]
    acc = x.index_select(1, index) * weight
    for index, weight in taps[1:]:
        acc.add_(x.index_select(1, index) * weight)
    acc.add_(1 << (_PIL_PRECISION_BITS - 1))
    return acc.bitwise_right_shift_(_PIL_PRECISION_BITS).clamp_(0, 255)


def _pillow_order_rule(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Pillow >= 13 resamples vertically first when the height shrinks by more than twice the width."""
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


_PILLOW_ORDER: list[bool] = []  # [uses the vertical-first rule], probed once


def _pillow_uses_order_rule() -> bool:
    """Whether the installed Pillow follows `_pillow_order_rule` (13+) or always goes horizontal first.

    Probed once on a small image whose two pass orders give different pixels, so the device resize
    keeps matching the official (PIL-based) preprocessing whatever Pillow version is installed.
    """
    if not _PILLOW_ORDER:
        try:
            from PIL import Image
        except ImportError:  # no Pillow: the official predictor cannot run either; use the modern rule
            _PILLOW_ORDER.append(True)
            return True
        image = np.random.default_rng(20240611).integers(0, 256, (200, 9), dtype=np.uint8)
        in_hw, out_hw = (200, 9), (50, 2)
        reference = np.asarray(Image.fromarray(image).resize((out_hw[1], out_hw[0]), Image.BILINEAR))
        tables = _ResizeTables(in_hw, out_hw, torch.device("cpu"), vertical_first=True)
        vertical = tables.apply(torch.from_numpy(image)[None])[0]
        with allowed_host_transfer("Pillow resize-order probe: once per process, on CPU tensors"):
            _PILLOW_ORDER.append(torch.equal(torch.from_numpy(np.array(reference)), vertical))
    return _PILLOW_ORDER[0]


class _ResizeTables:
    """Device-resident Pillow taps for one (input size -> output size), built once per size."""

    def __init__(
        self,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        device: torch.device,
        vertical_first: bool | None = None,
    ) -> None:
        self.need_w = in_hw[1] != out_hw[1]
        self.need_h = in_hw[0] != out_hw[0]
        if vertical_first is None:
            vertical_first = _pillow_order_rule(in_hw, out_hw) and _pillow_uses_order_rule()
        self.vertical_first = vertical_first
        self.taps_w = self._upload(*_pil_bilinear_taps(in_hw[1], out_hw[1]), device)
        self.taps_h = self._upload(*_pil_bilinear_taps(in_hw[0], out_hw[0]), device)

    @staticmethod
    def _upload(
        index: np.ndarray, weight: np.ndarray, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.from_numpy(np.ascontiguousarray(index[:, k])).to(device),
                torch.from_numpy(np.ascontiguousarray(weight[:, k : k + 1])).to(device),
            )
            for k in range(index.shape[1])
        ]

    def _horizontal(self, x: torch.Tensor) -> torch.Tensor:
        # Transposed so that the pass gathers rows; back to CxHxW afterwards.
        out = _resample_rows(x.transpose(1, 2).contiguous(), self.taps_w)
        return out.transpose(1, 2).contiguous()

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """CxHxW uint8 -> CxH'xW' uint8, the two passes in Pillow's order."""
        x = image.to(torch.int32)
        if self.vertical_first and self.need_h:
            x = _resample_rows(x.contiguous(), self.taps_h)
        if self.need_w:
            x = self._horizontal(x)
        if self.need_h and not self.vertical_first:
            x = _resample_rows(x.contiguous(), self.taps_h)
        return x.to(torch.uint8)


def resize_longest_side_uint8(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize a CxHxW uint8 tensor so its longest side is ``long_side``, on its own device.

    Bit-exact with ``ResizeLongestSide(long_side).apply_image`` (Pillow bilinear, antialiased) on the
    HxWxC numpy image. Returns CxH'xW' uint8 on the input's device.
    """
    out_hw = get_preprocess_shape(image.shape[-2], image.shape[-1], long_side)
    return _ResizeTables(tuple(image.shape[-2:]), out_hw, image.device).apply(image)


# ----------------------------------------------------------------------------------------------------
# Image-encoder attention without host tensors
# ----------------------------------------------------------------------------------------------------


def _relative_index(q_size: int, k_size: int) -> torch.Tensor:
    """Index into a (2*size-1) x C relative-position table for every (query, key) pair (CPU int64).

    Same arithmetic as segment_anything's ``get_rel_pos`` (which builds it on the host every call).
    """
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    rel = torch.arange(q_size)[:, None] * q_scale - torch.arange(k_size)[None, :] * k_scale
    return (rel + (k_size - 1) * k_scale).long()


def _resident_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """`segment_anything` ViT ``Attention.forward`` with the relative-position index cached on the device.

    The official forward rebuilds the index with ``torch.arange`` on the host and indexes a device
    tensor with it: a blocking host-to-device copy in every block on CUDA. Same operations otherwise,
    so the results are identical.
    """
    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if self.use_rel_pos:
        key = (height, width, str(x.device))
        tables = self._ultramotion_rel_index
        if key not in tables:
            tables.clear()
            with torch.inference_mode(False):  # usable later for training too, not only inference
                tables[key] = (
                    _relative_index(height, height).to(x.device),
                    _relative_index(width, width).to(x.device),
                )
        index_h, index_w = tables[key]
        if self.rel_pos_h.shape[0] != 2 * height - 1 or self.rel_pos_w.shape[0] != 2 * width - 1:
            # Tables of another size need segment_anything's interpolation: keep its code path.
            from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

            attn = add_decomposed_rel_pos(
                attn, q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width)
            )
        else:
            rel_h = self.rel_pos_h[index_h]  # H x H x C
            rel_w = self.rel_pos_w[index_w]  # W x W x C
            dim = q.shape[-1]
            q_grid = q.reshape(q.shape[0], height, width, dim)
            bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, rel_h)
            bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, rel_w)
            attn = (
                attn.view(q.shape[0], height, width, height, width)
                + bias_h[:, :, :, :, None]
                + bias_w[:, :, :, None, :]
            ).view(q.shape[0], tokens, tokens)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return self.proj(out.reshape(batch, height, width, -1))


def make_encoder_device_resident(model: Sam) -> Sam:
    """Give every relative-position attention block of ``model``'s image encoder a forward whose index
    tensors live on the device (see `_resident_attention_forward`). Numerically identical; in place."""
    import types

    for block in model.image_encoder.blocks:
        attn = block.attn
        if getattr(attn, "use_rel_pos", False) and not hasattr(attn, "_ultramotion_rel_index"):
            attn._ultramotion_rel_index = {}
            attn.forward = types.MethodType(_resident_attention_forward, attn)
    return model


# ----------------------------------------------------------------------------------------------------
# The segmenter
# ----------------------------------------------------------------------------------------------------


@dataclass
class SamOutput:
    """Masks for N box prompts, at the original image size (HxW).

    masks: NxHxW bool (logit > 0); mask_probs: NxHxW float32 (sigmoid of the upscaled logits);
    iou_scores: N float32 (the decoder's predicted IoU). Device tensors from the resident path,
    numpy arrays from ``as_numpy=True``.
    """

    masks: Any
    mask_probs: Any
    iou_scores: Any

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def to_numpy(self) -> SamOutput:
        """Host copy as numpy (a device-to-host hop per field; not for the per-frame resident path)."""
        if isinstance(self.masks, np.ndarray):
            return self
        return SamOutput(
            masks=self.masks.cpu().numpy(),
            mask_probs=self.mask_probs.cpu().numpy(),
            iou_scores=self.iou_scores.cpu().numpy(),
        )


class SamSegmenter:
    """Box-prompted SAM on device tensors: one image embedding per frame, one decoder call for all boxes.

    Usage::

        seg = SamSegmenter.from_checkpoint("sam.safetensors", model_type="auto", device="auto")
        seg.set_torch_image(frame)                   # HxW or HxWx3 uint8 tensor on seg.device
        out = seg.predict_boxes(boxes, valid=valid)  # Nx4 XYXY pixels of the frame, on seg.device
        out.masks, out.mask_probs, out.iou_scores    # NxHxW bool, NxHxW float32, N float32 (device)

    Same weights, same results as the official ``SamPredictor.set_image(rgb); predict(box=b,
    multimask_output=False)``: bit-equal embedding, bit-equal masks for one box per call; in a batch
    the logits may differ in the last bits (masks only at pixels within ~1e-6 of the threshold).
    The resident path makes no host sync; the first image of a new size uploads its resize tables
    once (kept for the last few sizes).
    """

    def __init__(
        self, model: Sam, config: SamConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        self.device = resolve_device(device) if device is not None else torch.device(model.device)
        self.model = make_encoder_device_resident(model.to(self.device).eval())
        self.config = config or getattr(model, "sam_config", None)
        self.image_size = int(model.image_encoder.img_size)
        with torch.inference_mode():
            self._image_pe = self.model.prompt_encoder.get_dense_pe()
        self._tables: dict[tuple[int, int], _ResizeTables] = {}
        self.reset_image()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        model_type: str | SamConfig = "auto",
        device: str | torch.device | None = "auto",
    ) -> SamSegmenter:
        """Load a checkpoint (see `load_sam`) and wrap it. Raises `CheckpointError` naming the file."""
        model, config = load_sam_with_config(path, model_type, device)
        return cls(model, config, device=model.device)

    # -- image ---------------------------------------------------------------------------------------

    def reset_image(self) -> None:
        """Forget the current image embedding."""
        self._features: torch.Tensor | None = None
        self._original_size: tuple[int, int] | None = None
        self._input_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """(H, W) of the current image."""
        return self._original_size

    def get_image_embedding(self) -> torch.Tensor:
        """1 x prompt_embed_dim x E x E image embedding of the current image, on the device."""
        if self._features is None:
            raise RuntimeError("set an image with set_torch_image(...) before asking for its embedding")
        return self._features

    def _as_chw_uint8(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if not torch.is_tensor(image):
            raise UnsupportedImageTypeError(
                f"SAM image must be a torch tensor or numpy array, not {type(image).__name__}"
            )
        image = image.to(self.device, non_blocking=True)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            chw = image[None]
        elif image.ndim == 3 and image.shape[-1] == 3:
            chw = image.permute(2, 0, 1)
        else:
            raise UnsupportedImageTypeError(
                f"SAM image must be HxW (gray) or HxWx3 (RGB), got shape {tuple(image.shape)}"
            )
        if chw.shape[-2] == 0 or chw.shape[-1] == 0:
            raise UnsupportedImageTypeError(f"SAM image is empty (shape {tuple(image.shape)})")
        if chw.dtype == torch.uint8:
            return chw
        if chw.dtype.is_floating_point:
            # Float frames are taken as 0..255 intensities.
            return chw.round().clamp_(0, 255).to(torch.uint8)
        raise UnsupportedImageTypeError(
            f"SAM image must be uint8 (or float in 0..255), got {chw.dtype}: rescale it to 8 bits first"
        )

    def set_torch_image(self, image: torch.Tensor | np.ndarray) -> None:
        """Compute and keep the image embedding of one frame.

        ``image``: HxW (gray, replicated to RGB) or HxWx3 RGB, uint8 (float is taken as 0..255), on
        ``self.device`` (a host tensor/array is copied there once). Resize of the longest side to
        ``image_size``, normalisation and padding run on the device, bit-exactly like the official
        `SamPredictor.set_image`.
        """
        with torch.inference_mode():
            chw = self._as_chw_uint8(image)
            in_hw = (int(chw.shape[-2]), int(chw.shape[-1]))
            out_hw = get_preprocess_shape(in_hw[0], in_hw[1], self.image_size)
            tables = self._tables.get(in_hw)
            if tables is None:
                if len(self._tables) >= 8:
                    self._tables.clear()
                tables = self._tables[in_hw] = _ResizeTables(in_hw, out_hw, self.device)
            resized = tables.apply(chw)
            if resized.shape[0] == 1:
                resized = resized.expand(3, -1, -1)
            features = self.model.image_encoder(self.model.preprocess(resized[None]))
        self._features = features
        self._original_size = in_hw
        self._input_size = out_hw

    # -- prompts -------------------------------------------------------------------------------------

    def _empty_output(self, as_numpy: bool) -> SamOutput:
        h, w = self._original_size
        out = SamOutput(
            masks=torch.zeros((0, h, w), dtype=torch.bool, device=self.device),
            mask_probs=torch.zeros((0, h, w), dtype=torch.float32, device=self.device),
            iou_scores=torch.zeros((0,), dtype=torch.float32, device=self.device),
        )
        return out.to_numpy() if as_numpy else out

    def predict_boxes(
        self,
        boxes: torch.Tensor | np.ndarray,
        valid: torch.Tensor | np.ndarray | None = None,
        as_numpy: bool = False,
        multimask_output: bool = False,
    ) -> SamOutput:
        """Masks for N box prompts on the current image, in one batched decoder call.

        ``boxes``: Nx4 XYXY in pixels of the original image (N may be 0), on ``self.device``;
        non-finite coordinates are replaced by 0 so that dummy rows cannot poison the batch.
        ``valid``: optional N bool on the device; rows that are False come back with an empty mask,
        zero probabilities and zero IoU (for a fixed number of prompts with some unused).
        ``multimask_output``: the decoder predicts 3 masks per box and the one with the highest
        predicted IoU is returned. ``as_numpy``: the legacy path, numpy outputs (host copies).
        Returns `SamOutput` at the original image size.
        """
        if self._features is None:
            raise RuntimeError("set an image with set_torch_image(...) before predicting masks")
        if not torch.is_tensor(boxes):
            boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
        boxes = boxes.to(self.device, non_blocking=True)
        if boxes.ndim == 1 and boxes.shape[0] == 4:
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be Nx4 (XYXY pixels), got shape {tuple(boxes.shape)}")
        n = int(boxes.shape[0])
        if n == 0:
            return self._empty_output(as_numpy)
        with torch.inference_mode():
            out = self._predict(boxes, valid, multimask_output)
        return out.to_numpy() if as_numpy else out

    def _predict(
        self, boxes: torch.Tensor, valid: torch.Tensor | np.ndarray | None, multimask_output: bool
    ) -> SamOutput:
        old_h, old_w = self._original_size
        new_h, new_w = self._input_size
        # float64 like ResizeLongestSide.apply_boxes (numpy), then float32 like SamPredictor.predict.
        corners = torch.nan_to_num(boxes.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).reshape(-1, 2, 2)
        corners = torch.stack([corners[..., 0] * (new_w / old_w), corners[..., 1] * (new_h / old_h)], dim=-1)
        box_input = corners.reshape(-1, 4).to(torch.float32)

        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_input, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self._features,
            image_pe=self._image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        if multimask_output:
            best = iou.argmax(dim=1, keepdim=True)
            low_res = low_res.gather(1, best[:, :, None, None].expand(-1, 1, *low_res.shape[-2:]))
            iou = iou.gather(1, best)
        logits = self.model.postprocess_masks(low_res, self._input_size, self._original_size)[:, 0]
        masks = logits > self.model.mask_threshold
        probs = logits.sigmoid_()  # in place: the logits are not returned, and NxHxW is the big buffer
        scores = iou[:, 0].to(torch.float32)
        if valid is not None:
            keep = torch.as_tensor(valid).to(self.device, non_blocking=True).to(torch.bool).reshape(-1)
            masks.logical_and_(keep[:, None, None])
            probs.mul_(keep[:, None, None])
            scores = scores * keep
        return SamOutput(masks=masks, mask_probs=probs, iou_scores=scores)

    def segment(
        self,
        image: torch.Tensor | np.ndarray,
        boxes: torch.Tensor | np.ndarray,
        valid: torch.Tensor | np.ndarray | None = None,
        as_numpy: bool = False,
        multimask_output: bool = False,
    ) -> SamOutput:
        """`set_torch_image` then `predict_boxes` in one call (see both for shapes and devices)."""
        self.set_torch_image(image)
        return self.predict_boxes(boxes, valid=valid, as_numpy=as_numpy, multimask_output=multimask_output)


__all__ = [
    "CHECKPOINT_FORMAT",
    "OFFICIAL_SAM_TYPES",
    "SAM_CONFIGS",
    "SamConfig",
    "SamOutput",
    "SamSegmenter",
    "build_sam_model",
    "get_preprocess_shape",
    "get_sam_config",
    "infer_sam_config",
    "load_sam",
    "load_sam_with_config",
    "make_encoder_device_resident",
    "random_sam_model",
    "read_sam_checkpoint",
    "resize_longest_side_uint8",
    "resolve_sam_checkpoint",
    "save_sam_checkpoint",
    "sidecar_config_path",
    "write_random_sam_checkpoint",
]
