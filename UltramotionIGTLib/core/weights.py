"""Load-time checks of model weights (not the per-frame path)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.errors import CheckpointError

__all__ = ["check_finite_weights"]


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """`CheckpointError` naming ``what`` (the file) and the first tensors holding NaN or infinity.

    A model with such weights loads and runs, but its outputs are NaN: masks come back empty and
    nothing says why. ``named``: (name, tensor) pairs, e.g. a state dict's items or
    ``model.named_parameters()``; floating-point tensors are checked (once, at load time).
    """
    bad: list[str] = []
    with allowed_host_transfer("load-time check that the weights are finite (once per model)"):
        for name, tensor in named:
            if (
                torch.is_tensor(tensor)
                and tensor.is_floating_point()
                and not bool(torch.isfinite(tensor).all())
            ):
                bad.append(name)
    if bad:
        raise CheckpointError(
            f"{what} holds NaN or infinite weights in {len(bad)} tensor(s) (e.g. {bad[0]}): the model would "
            "produce no result; the file is damaged or came from a diverged training run"
        )
