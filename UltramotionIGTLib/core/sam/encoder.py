"""The SAM image encoder without host tensors in its forward.

``segment_anything``'s ViT attention rebuilds its relative-position index with ``torch.arange`` on the
host in every block (a blocking host-to-device copy per block on CUDA); `make_encoder_device_resident`
caches the index on the device instead. Numerically identical. MobileSAM's TinyViT needs nothing: its
attention biases are gathered once, into a buffer on the model's device, when it is put in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling import Sam

from UltramotionIGTLib.core.hostsync import allowed_host_transfer


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
            # Two uploads per block, once per token grid; declared so that steady frames show none.
            with (
                allowed_host_transfer("SAM relative-position index, once per token grid", max_syncs=2),
                torch.inference_mode(False),  # usable later for training too, not only inference
            ):
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
    tensors live on the device (see `_resident_attention_forward`). Numerically identical; in place.
    Encoders without such blocks (TinyViT) are left as they are."""
    import types

    for block in getattr(model.image_encoder, "blocks", ()):
        attn = block.attn
        if getattr(attn, "use_rel_pos", False) and not hasattr(attn, "_ultramotion_rel_index"):
            attn._ultramotion_rel_index = {}
            attn.forward = types.MethodType(_resident_attention_forward, attn)
    return model
