"""SAM checkpoint files: read (safely), recognise, check against the architecture, write.

Formats (`load_sam`, `save_sam_checkpoint`):

* **Official ``.pth``** (Meta's ``sam_vit_b_01ec64.pth`` ...): a plain state dict. The architecture is
  given by ``model_type`` (``vit_b``, ``vit_l``, ``vit_h``, or any name in `SAM_CONFIGS`) or, with
  ``model_type="auto"``, recognised from the tensor shapes.
* **safetensors** (``.safetensors``): the state dict, with the config in the file's metadata:
  ``{"format": "ultramotion-igt/sam", "format_version": "1", "model_type": NAME,
  "sam_config": JSON of SamConfig}``.
* **``.pth`` + sidecar JSON**: a plain state dict ``NAME.pth`` next to ``NAME.json`` holding
  ``{"format": "ultramotion-igt/sam", "format_version": 1, "model_type": NAME, "sam_config": {...}}``.
* **MobileSAM** ``mobile_sam.pt``: a plain state dict with the TinyViT encoder's keys
  (``image_encoder.layers.*``), recognised as ``vit_t``.
* **MedSAM**: the released ``medsam_vit_b.pth`` (a plain ViT-B state dict) or MedSAM's training
  checkpoint ``{"model": state dict, "optimizer": ..., "epoch": ...}``. The keys are SAM ViT-B's, so
  with ``model_type="auto"`` a ViT-B file is taken as MedSAM (its own preprocessing) when it has that
  training wrapper or its file name contains ``medsam``; otherwise pass ``model_type="medsam"``.

State dicts are also unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}`` and from the
``module.`` prefix of multi-GPU (DataParallel/DDP) training. A config carried by the file (metadata or
sidecar) defines the architecture; an explicit ``model_type`` must then agree with its name; otherwise
an explicit type wins over what the file looks like. Files are recognised by their first bytes, not
their suffix. Loading is safe by construction: ``torch.load(weights_only=True)`` or safetensors, never
plain pickle; every problem is a `CheckpointError` naming the file.

Formats that are not run here get one line saying what the file is: SAM 2 / SAM 2.1 (``.pt`` with a
``model`` dict of ``image_encoder.trunk.*`` keys), HQ-SAM (``mask_decoder.hf_token`` /
``compress_vit_feat`` keys) and Hugging Face transformers models (``vision_encoder.*`` keys, or a
folder whose ``config.json`` says ``model_type: sam``...).
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.sam.config import (
    _TYPE_ALIASES,
    MEDSAM_TYPE,
    MOBILE_SAM_TYPE,
    OFFICIAL_SAM_TYPES,
    SAM_CONFIGS,
    SamConfig,
    _count,
    _describe_config,
    _looks_like,
    build_sam_model,
    encoder_label,
    get_sam_config,
    infer_sam_config,
)
from UltramotionIGTLib.core.weights import check_finite_weights
from UltramotionIGTLib.errors import CheckpointError

CHECKPOINT_FORMAT = "ultramotion-igt/sam"
CHECKPOINT_FORMAT_VERSION = 1

SUPPORTED_SAM_FORMATS = (
    "supported: SAM vit_b/vit_l/vit_h .pth (Meta's releases), MobileSAM vit_t (mobile_sam.pt), "
    "MedSAM ViT-B (medsam_vit_b.pth or its training checkpoint), and this project's .safetensors "
    "or .pth + .json"
)
"""The tail of every 'this format is not run here' message."""

# Types whose plain state dict is recognised from its keys and shapes alone (no sidecar needed).
_RECOGNISED_FROM_SHAPES = (*OFFICIAL_SAM_TYPES, MOBILE_SAM_TYPE)

# MedSAM's train_one_gpu.py / train_multi_gpus.py save {"model": ..., "optimizer": ..., "epoch": ...}.
_MEDSAM_TRAINING_WRAPPER = ("epoch", "model", "optimizer")


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


def _read_torch_state_dict(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The state dict of a torch file and the sorted top-level keys of the dict it was wrapped in
    (``()`` for a plain state dict)."""
    if path.suffix.lower() == ".safetensors":
        # torch.load would hand the file to safetensors by its name and report a misleading error
        raise CheckpointError(
            f"SAM checkpoint {path} is a PyTorch checkpoint (torch.save format), not safetensors, although "
            "it is named .safetensors: rename it to .pth"
        )
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
    wrapper: tuple[str, ...] = ()
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and not any(torch.is_tensor(v) for v in obj.values()):
                wrapper = tuple(sorted(str(k) for k in obj))
                obj = inner
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a SAM state dict")
    return obj, wrapper


def _strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys without the ``module.`` that DataParallel/DistributedDataParallel put before every key."""
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


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


@dataclass
class _ReadCheckpoint:
    state_dict: dict[str, torch.Tensor]
    carried: SamConfig | None  # config from the safetensors metadata or the sidecar JSON
    wrapper: tuple[str, ...]  # sorted top-level keys around the state dict, () if plain
    hf_model_type: str | None  # model_type of a Hugging Face config.json beside the file


def _hf_model_type(folder: Path) -> str | None:
    """``model_type`` of a Hugging Face ``config.json`` in ``folder``, if there is a readable one."""
    try:
        record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    model_type = record.get("model_type") if isinstance(record, dict) else None
    return str(model_type) if model_type else None


def _read_checkpoint(path: Path) -> _ReadCheckpoint:
    if not path.exists():
        raise CheckpointError(f"SAM checkpoint not found: {path}")
    if path.is_dir():
        model_type = _hf_model_type(path)
        if model_type and _is_hf_sam_type(model_type):
            raise CheckpointError(_hf_message(path, model_type))
        what = f" (a Hugging Face {model_type!r} model folder)" if model_type else ""
        raise CheckpointError(
            f"SAM checkpoint {path} is a folder{what}, not a checkpoint file: pass the file itself"
        )
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint {path} is not a file")
    kind = _sniff_format(path)
    config: SamConfig | None = None
    wrapper: tuple[str, ...] = ()
    if kind == "safetensors":
        state_dict, metadata = _read_safetensors(path)
        if metadata.get("format") == CHECKPOINT_FORMAT and "sam_config" in metadata:
            config = _config_from_record(metadata, path)
    else:
        state_dict, wrapper = _read_torch_state_dict(path)
    state_dict = _strip_module_prefix(state_dict)
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
    return _ReadCheckpoint(state_dict, config, wrapper, _hf_model_type(path.parent))


def read_sam_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], SamConfig | None]:
    """Read a SAM checkpoint file into a CPU state dict and the config it carries (None if none).

    Safe by construction: ``torch.load(weights_only=True)`` or safetensors. Unwraps ``{"model": ...}``
    / ``{"state_dict": ...}`` and the multi-GPU ``module.`` key prefix. Raises `CheckpointError`
    naming the file when it is missing, a folder, empty, truncated, corrupt, refused by safe loading,
    not a state dict, or when its sidecar JSON is unreadable.
    """
    read = _read_checkpoint(Path(path))
    return read.state_dict, read.carried


# ---------------------------------------------------------------------------------------------------
# Formats that are not run here: say what the file is
# ---------------------------------------------------------------------------------------------------

_HF_LABELS = {
    "sam": "SAM",
    "sam_hq": "HQ-SAM",
    "sam2": "SAM 2",
    "sam2_video": "SAM 2 (video)",
    "sam3": "SAM 3",
    "sam3_tracker": "SAM 3 tracker",
    "sam3_video": "SAM 3 (video)",
    "edgetam": "EdgeTAM",
    "edgetam_video": "EdgeTAM (video)",
}

# Hiera trunks of the released SAM 2 / 2.1 models: (embed_dim, blocks) -> name.
_HIERA_SIZES = {(96, 12): "Hiera-T", (96, 16): "Hiera-S", (112, 24): "Hiera-B+", (144, 48): "Hiera-L"}


def _is_hf_sam_type(model_type: str) -> bool:
    return model_type in _HF_LABELS or model_type.startswith(("sam", "edgetam"))


def _hf_message(path: Path, model_type: str) -> str:
    label = _HF_LABELS.get(model_type, model_type)
    if model_type == "sam":
        advice = (
            "load Meta's original release instead (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
            "sam_vit_h_4b8939.pth)"
        )
    else:
        advice = f"{label} models are not supported here"
    return (
        f"{path} is a Hugging Face transformers {label} model (model_type {model_type!r}, "
        f"vision_encoder.* keys), not an original checkpoint layout: {advice}; {SUPPORTED_SAM_FORMATS}"
    )


def _other_format_message(path: Path, read: _ReadCheckpoint) -> str | None:
    """One line naming a SAM-like format that is not run here (SAM 2, HQ-SAM, transformers), else None."""
    sd = read.state_dict
    keys = list(sd)

    def has_prefix(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if has_prefix("vision_encoder.", "shared_image_embedding."):
        model_type = (
            read.hf_model_type if read.hf_model_type and _is_hf_sam_type(read.hf_model_type) else None
        )
        if model_type is None:
            if "mask_decoder.hq_token.weight" in sd:
                model_type = "sam_hq"
            elif has_prefix("vision_encoder.backbone.", "memory_attention.", "no_memory_embedding"):
                model_type = "sam2"
            else:
                model_type = "sam"
        return _hf_message(path, model_type)
    if has_prefix("image_encoder.trunk.", "sam_mask_decoder.", "sam_prompt_encoder."):
        version = "SAM 2.1" if ("no_obj_embed_spatial" in sd or "obj_ptr_tpos_proj.weight" in sd) else "SAM 2"
        if has_prefix("sam_mask_decoder.hf_token."):
            version = f"HQ-SAM 2 ({version} based)"
        trunk = "Hiera"
        patch = sd.get("image_encoder.trunk.patch_embed.proj.weight")
        if patch is not None and patch.ndim == 4:
            width, blocks = int(patch.shape[0]), _count(sd, "image_encoder.trunk.blocks.{}.")
            trunk = _HIERA_SIZES.get((width, blocks), f"Hiera (width {width}, {blocks} blocks)")
        return (
            f"{path} is a {version} checkpoint ({trunk} image encoder with video memory modules): "
            f"SAM 2 models are not supported here; {SUPPORTED_SAM_FORMATS}"
        )
    if has_prefix("mask_decoder.hf_token.", "mask_decoder.hf_mlp.", "mask_decoder.compress_vit_feat."):
        try:
            encoder = f"a {encoder_label(infer_sam_config(sd))} image encoder"
        except (KeyError, ValueError, IndexError, ZeroDivisionError):
            encoder = "an unrecognised image encoder"
        return (
            f"{path} is an HQ-SAM (SAM-HQ) checkpoint (SAM with {encoder} and HQ-SAM's extra mask "
            f"decoder layers hf_token/hf_mlp/compress_vit_feat): HQ-SAM is not supported here; "
            f"{SUPPORTED_SAM_FORMATS}"
        )
    return None


def _looks_like_medsam(path: Path, read: _ReadCheckpoint) -> bool:
    """MedSAM's weights have SAM ViT-B's keys: recognised by MedSAM's training wrapper or by the name."""
    return read.wrapper == _MEDSAM_TRAINING_WRAPPER or "medsam" in path.name.lower()


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
    """Read a checkpoint and decide its architecture and preprocessing (rules: the module docstring).

    Returns the CPU state dict (unwrapped) and the `SamConfig`. Raises `CheckpointError` with one
    line naming the file for unreadable files, formats that are not run here (SAM 2, HQ-SAM,
    transformers), types that contradict the file's own config, and files that are not SAM.
    """
    path = Path(path)
    read = _read_checkpoint(path)
    other = _other_format_message(path, read)
    if other is not None:
        raise CheckpointError(other)
    state_dict, carried = read.state_dict, read.carried
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
    if config.name == "vit_b" and _looks_like_medsam(path, read):
        config = SAM_CONFIGS[MEDSAM_TYPE]
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

    ``model_type``: ``"auto"`` (config carried by the file, else recognised from the keys and shapes),
    a name in `SAM_CONFIGS` (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t`` (MobileSAM), ``medsam``,
    ``vit_t_demo``) or a `SamConfig`. The model's config is attached as ``model.sam_config``. Raises
    `CheckpointError` naming the file for a missing, truncated, corrupt or unsafe file, for keys/shapes
    that do not fit the type (saying what the file looks like) and for formats not run here (SAM 2,
    HQ-SAM, transformers: one line saying what the file is), `DeviceUnavailableError` for an unusable
    device.
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
    check_finite_weights(state_dict.items(), f"SAM checkpoint {path}")
    model.load_state_dict(state_dict, strict=True)
    model.sam_config = config
    # eval() after loading: TinyViT caches its attention biases from the weights in eval().
    return model.to(target).eval(), config


def save_sam_checkpoint(
    model: Sam, path: str | Path, config: SamConfig, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights in one of the formats `load_sam` reads, chosen by the suffix.

    ``.safetensors``: state dict + config in the metadata (plus ``metadata``, string values).
    Anything else (``.pth``): a plain state dict (``torch.save``); for a config that is not recognised
    from its shapes alone (anything but vit_b/l/h and MobileSAM's vit_t; MedSAM included, for its
    preprocessing), the sidecar ``NAME.json`` with the config is written too. Returns ``path``.
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
        if not (
            config.name in _RECOGNISED_FROM_SHAPES and config.same_architecture(SAM_CONFIGS[config.name])
        ):
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
    return model.eval()  # again: TinyViT caches its attention biases from the weights in eval()


def write_random_sam_checkpoint(
    path: str | Path, model_type: str | SamConfig = "vit_t_demo", seed: int = 0
) -> Path:
    """Write a random-weight SAM (`random_sam_model`) in the real format chosen by the suffix.

    For tests and ``make-test-models``: ``.pth`` for vit_b/l/h and vit_t is exactly the official
    layout (a plain state dict); ``.pth`` for other types also writes the sidecar JSON; ``.safetensors``
    embeds the config. Returns ``path``.
    """
    config = get_sam_config(model_type)
    return save_sam_checkpoint(random_sam_model(config, seed), path, config)
