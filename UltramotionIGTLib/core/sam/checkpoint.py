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

A config carried by the file (metadata or sidecar) defines the architecture; an explicit ``model_type``
must then agree with its name. Files are recognised by their first bytes, not their suffix. Loading is
safe by construction: ``torch.load(weights_only=True)`` or safetensors, never plain pickle; every
problem is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.sam.config import (
    _TYPE_ALIASES,
    OFFICIAL_SAM_TYPES,
    SamConfig,
    _describe_config,
    _looks_like,
    build_sam_model,
    get_sam_config,
    infer_sam_config,
)
from UltramotionIGTLib.errors import CheckpointError

CHECKPOINT_FORMAT = "ultramotion-igt/sam"
CHECKPOINT_FORMAT_VERSION = 1


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
