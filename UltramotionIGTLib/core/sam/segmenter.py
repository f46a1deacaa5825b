"""`SamSegmenter`: box-prompted SAM on device tensors, one image embedding per frame, one batched
decoder call for all boxes.

What it adds to the official ``segment_anything`` `SamPredictor`:

* the image goes in as a device tensor (HxW gray or HxWx3 uint8) and is resized, normalised and padded
  on the device, bit-exactly like `ResizeLongestSide.apply_image` (PIL bilinear with antialiasing) +
  `Sam.preprocess` (`UltramotionIGTLib.core.sam.resize`), so the image embedding is bit-equal to the
  official predictor's, and so are the masks of one box per call (a batch of N boxes may differ in the
  last bits of the logits, i.e. only at pixels whose logit is within ~1e-6 of the threshold);
* all N boxes of a frame go through ONE prompt-encoder + mask-decoder call, and the outputs
  (`SamOutput`: masks, mask probabilities, IoU scores) stay on the device: no host sync.

Each family keeps the recipe its weights were trained with (`SamConfig.preprocessing`): SAM and
MobileSAM (TinyViT encoder) as above, equal to their packages' ``SamPredictor``; MedSAM as its
published inference (bowang-lab/MedSAM ``MedSAM_Inference.py``): the frame resized to the encoder's
square input (skimage bicubic, `UltramotionIGTLib.core.sam.resize._SquareResizeTables`) and min-max
scaled, boxes scaled by ``image_size / (W, H)``, masks = bilinear resize of the low-resolution
probabilities straight to the frame, thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.sam.checkpoint import load_sam_with_config
from UltramotionIGTLib.core.sam.config import SamConfig
from UltramotionIGTLib.core.sam.encoder import (
    encoder_attention,
    make_encoder_device_resident,
    set_encoder_attention,
)
from UltramotionIGTLib.core.sam.resize import _ResizeTables, _SquareResizeTables, get_preprocess_shape
from UltramotionIGTLib.errors import UnsupportedImageTypeError


@dataclass
class SamOutput:
    """Masks for N box prompts, at the original image size (HxW).

    masks: NxHxW bool (logit > 0); mask_probs: NxHxW float32 (sigmoid of the upscaled logits; for
    MedSAM the upscaled low-resolution sigmoid, masks = probs > 0.5); iou_scores: N float32 (the
    decoder's predicted IoU). Device tensors from the resident path,
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
    multimask_output=False)`` (segment_anything's for SAM, the ``mobile_sam`` package's for MobileSAM):
    bit-equal embedding, bit-equal masks for one box per call; in a batch the logits may differ in
    the last bits (masks only at pixels within ~1e-6 of the threshold). A MedSAM model follows
    MedSAM's published inference instead (see the module docstring). The resident path makes no host
    sync; the first image of a new size builds and uploads its resize tables once (kept for the last
    few sizes).

    ``dtype`` is the precision the image encoder and mask decoder compute in (float32 unless made by
    `with_precision`); ``attention`` the ViT encoder's attention kernel (`set_attention`).
    """

    def __init__(
        self, model: Sam, config: SamConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        self.device = resolve_device(device) if device is not None else torch.device(model.device)
        self.model = make_encoder_device_resident(model.to(self.device).eval())
        self.config = config or getattr(model, "sam_config", None)
        self.preprocessing = getattr(self.config, "preprocessing", "sam")
        self.image_size = int(model.image_encoder.img_size)
        #: precision of the image encoder and mask decoder; the prompt encoder and all pre- and
        #: post-processing stay in float32 (`with_precision`)
        self.dtype = torch.float32
        with torch.inference_mode():
            self._image_pe = self.model.prompt_encoder.get_dense_pe()
        self._tables: dict[tuple[int, int], _ResizeTables | _SquareResizeTables] = {}
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

    # -- how the model runs --------------------------------------------------------------------------

    def with_precision(self, dtype: torch.dtype) -> SamSegmenter:
        """A copy whose image encoder and mask decoder compute in ``dtype`` (float16/bfloat16/float32);
        this segmenter is left as it is.

        What stays in float32, so that the outputs keep their contract (`SamOutput`: bool masks,
        float32 probabilities and scores): the pixel normalisation (the model's mean/std buffers),
        the prompt encoder (the random-Fourier box embedding loses whole pixels in 8-bit mantissas)
        and everything after the decoder: its low-resolution logits and IoU predictions are cast to
        float32 before they are upsampled and thresholded, so neither the upsampling nor the
        threshold runs in half precision (no fp16 overflow, no threshold in bf16 steps).
        """
        import copy

        twin = copy.deepcopy(self)
        twin.model.image_encoder.to(dtype)
        twin.model.mask_decoder.to(dtype)
        twin.dtype = dtype
        twin._image_pe = twin._image_pe.to(dtype)  # computed in float32 once, rounded once
        twin.reset_image()
        return twin

    @property
    def attention(self) -> str | None:
        """The ViT image encoder's attention kernel, ``explicit`` or ``sdpa`` (None for TinyViT)."""
        return encoder_attention(self.model)

    def set_attention(self, attention: str) -> None:
        """``explicit`` (segment_anything's arithmetic) or ``sdpa`` (fused kernels on CUDA); see
        `UltramotionIGTLib.core.sam.encoder`. In place. TinyViT encoders are not changed."""
        set_encoder_attention(self.model, attention)

    def compile(self, mode: str = "default") -> None:
        """`torch.compile` the image encoder and the mask decoder in place, static shapes (the encoder
        input is always ``image_size`` square; the decoder sees a fixed number of prompts). Compilation
        happens on their first call."""
        from UltramotionIGTLib.core.acceleration import compile_module

        compile_module(self.model.image_encoder, mode)
        compile_module(self.model.mask_decoder, mode)

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
        ``self.device`` (a host tensor/array is copied there once). The family's preprocessing runs on
        the device: SAM/MobileSAM resize the longest side to ``image_size``, normalise and pad,
        bit-exactly like the official `SamPredictor.set_image`; MedSAM resizes to ``image_size``
        square and min-max scales, like its published inference.
        """
        with torch.inference_mode():
            chw = self._as_chw_uint8(image)
            in_hw = (int(chw.shape[-2]), int(chw.shape[-1]))
            medsam = self.preprocessing == "medsam"
            if medsam:
                out_hw = (self.image_size, self.image_size)
            else:
                out_hw = get_preprocess_shape(in_hw[0], in_hw[1], self.image_size)
            tables = self._tables.get(in_hw)
            if tables is None:
                if len(self._tables) >= 8:
                    self._tables.clear()
                if medsam:
                    tables = _SquareResizeTables(in_hw, self.image_size, self.device)
                else:
                    tables = _ResizeTables(in_hw, out_hw, self.device)
                self._tables[in_hw] = tables
            if medsam:
                features = self.model.image_encoder(tables.apply(chw).to(self.dtype))
            else:
                resized = tables.apply(chw)
                if resized.shape[0] == 1:
                    resized = resized.expand(3, -1, -1)
                features = self.model.image_encoder(self.model.preprocess(resized[None]).to(self.dtype))
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

        Contract:

        - ``boxes``: Nx4 XYXY in pixels of the original image, a tensor (any device: moved to
          ``self.device``), numpy array or nested list; one box may be given as 4 numbers; N may be
          0 (``[]``, an empty array or an empty 0x4 tensor all give N = 0).
        - A box is a *valid prompt* when its 4 coordinates are finite, ``x2 > x1`` and ``y2 > y1``
          (positive area) and it overlaps the image (``x2 > 0``, ``y2 > 0``, ``x1 < W``, ``y1 < H``).
          Reversed, zero-area, NaN/infinite and off-image boxes are invalid prompts: like rows whose
          ``valid`` is False they come back with an empty mask, zero probabilities and zero IoU
          (decided on the device, no host sync; non-finite coordinates are replaced by 0 before the
          decoder so that they cannot poison the batch).
        - ``valid``: optional N bool (any device); False rows are invalid prompts (for a fixed number
          of prompts with some unused). `ValueError` when it does not hold exactly N values (it is
          never broadcast).
        - ``multimask_output``: the decoder predicts 3 masks per box and the one with the highest
          predicted IoU is returned. ``as_numpy``: the legacy path, numpy outputs (host copies).

        Returns `SamOutput` at the original image size: masks NxHxW bool, mask_probs NxHxW float32,
        iou_scores N float32. Raises `RuntimeError` before `set_torch_image`, `ValueError` for boxes
        that are not Nx4 (the shape in the message) or a ``valid`` of another length.
        """
        if self._features is None:
            raise RuntimeError("set an image with set_torch_image(...) before predicting masks")
        if not torch.is_tensor(boxes):
            try:
                boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"boxes must be Nx4 numbers (XYXY pixels): {exc}") from None
        boxes = boxes.to(self.device, non_blocking=True)
        if boxes.numel() == 0 and boxes.ndim <= 2 and (boxes.ndim < 2 or boxes.shape[-1] in (0, 4)):
            boxes = boxes.reshape(0, 4)
        if boxes.ndim == 1 and boxes.shape[0] == 4:
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be Nx4 (XYXY pixels), got shape {tuple(boxes.shape)}")
        n = int(boxes.shape[0])
        if valid is not None:
            valid_shape = tuple(valid.shape) if hasattr(valid, "shape") else (len(valid),)
            if valid_shape != (n,):
                raise ValueError(f"valid must hold one bool per box ({n}), got shape {valid_shape}")
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
        medsam = self.preprocessing == "medsam"
        # float64 like the official transforms (numpy), then float32 like their predictors.
        xyxy = boxes.to(torch.float64)
        x1, y1, x2, y2 = xyxy.unbind(dim=1)
        prompt_ok = (
            torch.isfinite(xyxy).all(dim=1)
            & (x2 > x1)
            & (y2 > y1)
            & (x2 > 0)
            & (y2 > 0)
            & (x1 < old_w)
            & (y1 < old_h)
        )
        corners = torch.nan_to_num(xyxy, nan=0.0, posinf=0.0, neginf=0.0).reshape(-1, 2, 2)
        if medsam:  # MedSAM: box / [W, H, W, H] * image_size
            x, y = corners[..., 0] / old_w * new_w, corners[..., 1] / old_h * new_h
        else:  # ResizeLongestSide.apply_boxes
            x, y = corners[..., 0] * (new_w / old_w), corners[..., 1] * (new_h / old_h)
        box_input = torch.stack([x, y], dim=-1).reshape(-1, 4).to(torch.float32)

        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_input, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self._features,
            image_pe=self._image_pe,
            sparse_prompt_embeddings=sparse.to(self.dtype),
            dense_prompt_embeddings=dense.to(self.dtype),
            multimask_output=multimask_output,
        )
        # upsampling and threshold in float32 whatever the decoder's precision (a no-op in float32)
        low_res, iou = low_res.float(), iou.float()
        if multimask_output:
            best = iou.argmax(dim=1, keepdim=True)
            low_res = low_res.gather(1, best[:, :, None, None].expand(-1, 1, *low_res.shape[-2:]))
            iou = iou.gather(1, best)
        if medsam:
            # MedSAM's inference: sigmoid at low resolution, bilinear straight to the frame, > 0.5.
            probs = F.interpolate(
                low_res.sigmoid(), self._original_size, mode="bilinear", align_corners=False
            )
            probs = probs[:, 0]
            masks = probs > 0.5
        else:
            logits = self.model.postprocess_masks(low_res, self._input_size, self._original_size)[:, 0]
            masks = logits > self.model.mask_threshold
            probs = logits.sigmoid_()  # in place: the logits are not returned, and NxHxW is the big buffer
        scores = iou[:, 0].to(torch.float32)
        keep = prompt_ok
        if valid is not None:
            keep = keep & torch.as_tensor(valid).to(self.device, non_blocking=True).to(torch.bool).reshape(-1)
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
