"""The SAM image encoder without host tensors in its forward, with a switchable attention kernel.

``segment_anything``'s ViT attention rebuilds its relative-position index with ``torch.arange`` on the
host in every block (a blocking host-to-device copy per block on CUDA); `make_encoder_device_resident`
builds the index once, as a buffer on the model's device, instead. Numerically identical. MobileSAM's
TinyViT needs nothing: its attention biases are gathered once, into a buffer on the model's device,
when it is put in eval mode.

`set_encoder_attention` chooses how each ViT block computes softmax(Q K^T * scale + B) V, where B is
the decomposed relative-position bias (Li et al., "MViTv2", 2022; segment_anything's
``add_decomposed_rel_pos``):

* ``explicit`` (default): segment_anything's arithmetic, the attention matrix materialised and
  the two bias terms added to it; bit-identical to the official encoder.
* ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` with B as its additive ``attn_mask``,
  so CUDA runs a fused (memory-efficient) kernel. Same result to float rounding (within 1e-5 in
  fp32, `Testing/test_acceleration.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

ATTENTION_MODES: tuple[str, ...] = ("explicit", "sdpa")


def _relative_index(q_size: int, k_size: int) -> torch.Tensor:
    """Index into a (2*size-1) x C relative-position table for every (query, key) pair (CPU int64).

    Same arithmetic as segment_anything's ``get_rel_pos`` (which builds it on the host every call).
    """
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    rel = torch.arange(q_size)[:, None] * q_scale - torch.arange(k_size)[None, :] * k_scale
    return (rel + (k_size - 1) * k_scale).long()


def _decomposed_bias(
    self: Any, q: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two relative-position terms of ``add_decomposed_rel_pos`` for queries ``q`` ((B*heads) x HW x C):
    (B*heads) x H x W x H (along the height) and (B*heads) x H x W x W (along the width)."""
    rel_h = self.rel_pos_h[self._ultramotion_index_h]  # H x H x C
    rel_w = self.rel_pos_w[self._ultramotion_index_w]  # W x W x C
    q_grid = q.reshape(q.shape[0], height, width, q.shape[-1])
    bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, rel_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, rel_w)
    return bias_h, bias_w


def _resident_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """`segment_anything` ViT ``Attention.forward`` with the relative-position index kept on the device,
    and the attention computed explicitly (bit-identical to the official forward) or by SDPA."""
    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
    # tables of another size than the input need segment_anything's interpolation: keep its code path
    resident_bias = self.use_rel_pos and self._ultramotion_index_h.shape[0] == height
    resident_bias = resident_bias and self._ultramotion_index_w.shape[0] == width
    if self._ultramotion_attention == "sdpa" and (resident_bias or not self.use_rel_pos):
        mask = None
        if resident_bias:
            bias_h, bias_w = _decomposed_bias(self, q, height, width)
            mask = (bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]).reshape(q.shape[0], tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if resident_bias:
            bias_h, bias_w = _decomposed_bias(self, q, height, width)
            attn = (
                attn.view(q.shape[0], height, width, height, width)
                + bias_h[:, :, :, :, None]
                + bias_w[:, :, :, None, :]
            ).view(q.shape[0], tokens, tokens)
        elif self.use_rel_pos:
            from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

            attn = add_decomposed_rel_pos(
                attn, q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width)
            )
        out = attn.softmax(dim=-1) @ v
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return self.proj(out.reshape(batch, height, width, -1))


def _vit_attention_blocks(model: Sam) -> list[Any]:
    blocks = getattr(model.image_encoder, "blocks", ())
    return [b.attn for b in blocks if hasattr(getattr(b, "attn", None), "qkv")]


def make_encoder_device_resident(model: Sam) -> Sam:
    """Give every attention block of ``model``'s ViT image encoder a forward whose relative-position
    index lives on the device (non-persistent int64 buffers, sized from the block's tables) and whose
    attention kernel `set_encoder_attention` chooses (``explicit`` at first). Numerically identical to
    segment_anything; in place; idempotent. Encoders without such blocks (TinyViT) are left as they are.
    """
    import types

    for attn in _vit_attention_blocks(model):
        if hasattr(attn, "_ultramotion_attention"):
            continue
        if getattr(attn, "use_rel_pos", False):
            device = attn.rel_pos_h.device
            size_h = (int(attn.rel_pos_h.shape[0]) + 1) // 2
            size_w = (int(attn.rel_pos_w.shape[0]) + 1) // 2
            index_h, index_w = _relative_index(size_h, size_h), _relative_index(size_w, size_w)
        else:
            device = attn.qkv.weight.device
            index_h = index_w = torch.zeros(0, 0, dtype=torch.long)
        with torch.inference_mode(False):  # ordinary tensors: usable for training too, not only inference
            attn.register_buffer("_ultramotion_index_h", index_h.to(device), persistent=False)
            attn.register_buffer("_ultramotion_index_w", index_w.to(device), persistent=False)
        attn._ultramotion_attention = "explicit"
        attn.forward = types.MethodType(_resident_attention_forward, attn)
    return model


def set_encoder_attention(model: Sam, attention: str) -> Sam:
    """Compute the ViT image encoder's attention ``explicit``ly (segment_anything's arithmetic) or by
    ``sdpa`` (`scaled_dot_product_attention`, fused kernels on CUDA). In place; makes the encoder
    device-resident first if needed. TinyViT encoders (MobileSAM) are left as they are.
    Raises ValueError for another mode."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    make_encoder_device_resident(model)
    for attn in _vit_attention_blocks(model):
        attn._ultramotion_attention = attention
    return model


def encoder_attention(model: Sam) -> str | None:
    """The attention mode of ``model``'s ViT encoder blocks (None for encoders without them)."""
    blocks = _vit_attention_blocks(model)
    return getattr(blocks[0], "_ultramotion_attention", "explicit") if blocks else None
