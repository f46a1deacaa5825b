"""Device selection with clear errors."""

from __future__ import annotations

import torch

from UltramotionIGTLib.errors import DeviceUnavailableError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a torch.device) into a usable torch.device.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA without it raises
    `DeviceUnavailableError` with what to do, instead of failing later inside torch.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {spec!r} was asked for but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}): "
                "use --device cpu or auto, or install a CUDA build of torch and a driver"
            )
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {spec!r} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DeviceUnavailableError(f"device type {device.type!r} is not supported: use auto, cpu or cuda")
    return device
