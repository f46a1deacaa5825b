"""Import D-FINE checkpoints of the original code as HF detector folders (``models import-dfine``).

The original D-FINE implementation (github.com/Peterande/D-FINE, module ``src.zoo.dfine``, HGNetv2
backbone in ``src.nn.backbone.hgnetv2``) and training frameworks built on its modules save the model as
a state dict in that module layout: ``backbone.stem.stem1.conv.weight``, ``encoder.fpn_blocks.0.cv1
.conv.weight``, ``decoder.dec_score_head.2.weight``... The original trainer wraps it as
``{"model": state_dict, "ema": {"module": state_dict, ...}, "optimizer": ...}``; other frameworks
``torch.save(model.state_dict())``. `import_original_dfine` reads either (EMA weights first: they are
what D-FINE evaluates), decides the architecture (from the training YAML when given, which the
original configs assemble with ``__include__``; otherwise from the tensor shapes), renames and splits
the tensors into transformers' `DFineForObjectDetection` layout and writes a detector folder
(config.json + model.safetensors + preprocessor_config.json) that `DFineDetector.from_pretrained`
loads.

What the shapes do not tell (and the YAML does): the number of queries (default 300), the encoder's
attention heads (8), which feature level the encoder attends on (the last), ``eval_idx`` (-1), the
activations (SiLU / GELU / ReLU) and the input size when the checkpoint holds no anchors (640x640).
Every value decided is reported with where it came from.

Mapping notes (module names of the original on the left, transformers on the right):
- HGNetv2 ``stem``/``stages`` -> ``model.backbone.model.embedder``/``encoder.stages``, ``conv``/``bn``
  -> ``convolution``/``normalization``; ``return_idx`` (0-based stages) -> ``out_indices`` (1-based).
- HybridEncoder ``input_proj`` -> ``model.encoder_input_proj``; ``encoder.{i}`` (nn.TransformerEncoder
  layers with a fused ``in_proj``) -> ``model.encoder.aifi.{i}`` with separate q/k/v projections;
  RepNCSPELAN4 ``cv1, cv2.0, cv2.1, cv3.0, cv3.1, cv4`` -> ``conv1, csp_rep1, conv2, csp_rep2, conv3,
  conv4``; SCDown ``cv1, cv2`` -> ``conv1, conv2``.
- DFINETransformer ``dec_score_head``/``dec_bbox_head`` -> ``model.decoder.class_embed``/``bbox_embed``
  (transformers ties the top-level ``class_embed``/``bbox_embed`` to them); ``enc_output.proj/norm`` ->
  ``model.enc_output.0/1``. Decoder layers after ``eval_idx`` are dropped: in eval mode the original
  stops there (as its ``deploy()`` does), so the converted model is the one D-FINE evaluates.
- ``decoder.anchors``/``valid_mask`` are not weights (transformers recomputes them per input size); their
  length tells the training input size.

Limits (refused with a one-line reason): backbones other than HGNetv2, fused (``deploy()``-ed)
checkpoints, learned query content, ``query_select_method`` other than ``default``, more decoder levels
than encoder outputs, and non-square input sizes (the original's encoder position embedding equals
transformers' only for square feature maps).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from UltramotionIGTLib.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported when a checkpoint is read, so that the CLI parser stays light
    import torch

__all__ = [
    "OriginalArchitecture",
    "ImportReport",
    "configure",
    "convert_state_dict",
    "import_original_dfine",
    "infer_architecture",
    "load_original_state_dict",
    "read_original_config",
    "run",
]

DEFAULT_INPUT_SIZE = 640
DEFAULT_NUM_QUERIES = 300
DEFAULT_HEADS = 8

#: HGNetv2 variants by (stem channels, stage output channels), to name what the shapes show
_HGNET_NAMES = {
    ((16, 16), (64, 256, 512, 1024)): "B0",
    ((24, 32), (64, 256, 512, 1024)): "B1",
    ((24, 32), (96, 384, 768, 1536)): "B2",
    ((24, 32), (128, 512, 1024, 2048)): "B3",
    ((32, 48), (128, 512, 1024, 2048)): "B4",
    ((32, 64), (128, 512, 1024, 2048)): "B5",
    ((48, 96), (192, 512, 1024, 2048)): "B6",
}


def dfine_size_names(
    stem_channels: Sequence[int], stage_out: Sequence[int], num_levels: int, encoder_hidden: int
) -> tuple[str, str]:
    """(HGNetv2 backbone B0..B6, D-FINE size N/S/M/L/X), each "custom" when no published config has it.

    ``stem_channels``: the stem's (in, mid, out) channels; ``stage_out``: the 4 stages' output channels;
    ``num_levels``: feature levels fed to the encoder; ``encoder_hidden``: the encoder width. The rule
    is the original repository's configs (dfine_hgnetv2_{n,s,m,l,x}_*.yml): N and S share B0 (N with 2
    levels and width 128), M is B2, L B4, X B5.
    """
    backbone = _HGNET_NAMES.get((tuple(int(c) for c in stem_channels[-2:]), tuple(int(c) for c in stage_out)))
    backbone = backbone or "custom"
    if backbone == "B0":
        size = "N" if num_levels == 2 and encoder_hidden == 128 else "S" if num_levels == 3 else "custom"
    else:
        size = {"B2": "M", "B4": "L", "B5": "X"}.get(backbone, "custom")
    return backbone, size


_RESAVE_HINT = (
    "re-save it as a state dict where its code is importable: "
    "python -c \"import torch; m = torch.load('{path}', weights_only=False); "
    "torch.save(getattr(m, 'module', m).state_dict(), '{path}.state_dict.pt')\""
)


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The original-layout state dict and where in the file it was found (for the report)."""

    state_dict: dict[str, torch.Tensor]
    source: str


def _is_state_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and sum(isinstance(v, torch.Tensor) for v in value.values()) >= max(1, len(value) // 2)
    )


def _strip_wrappers(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop non-tensors and the ``module.`` (DDP) / ``model.`` prefixes a wrapper adds to every key."""
    import torch

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def load_original_state_dict(path: str | Path) -> LoadedCheckpoint:
    """Read an original-code D-FINE checkpoint with ``torch.load(weights_only=True)``.

    Accepts ``{"ema": {"module": sd}, "model": sd, ...}`` (the EMA weights are taken when present),
    ``{"model": sd}``, ``{"state_dict": sd}`` and a plain state dict; ``module.``/``model.`` key prefixes
    are removed. Raises CheckpointError naming the file for a missing or unreadable file, a pickled
    model object (with a one-line way to re-save it as a state dict) and content that holds no state
    dict.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"D-FINE checkpoint {path} {what}: pass the .pt/.pth file the training saved")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise CheckpointError(f"D-FINE checkpoint {path} is empty (0 bytes): copy it again")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or its legacy pickle
        raise CheckpointError(
            f"D-FINE checkpoint {path} is not a PyTorch file (unrecognised first bytes): pass the .pt/.pth "
            "file the training saved"
        )
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its message
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found and "torch" not in found.group(1).split(".")[0]:
            raise CheckpointError(
                f"D-FINE checkpoint {path} is a pickled model object ({found.group(1)}), not a state dict; "
                + _RESAVE_HINT.format(path=path)
            ) from exc
        raise CheckpointError(
            f"D-FINE checkpoint {path} cannot be read safely: {text.splitlines()[0]}"
        ) from exc
    except Exception as exc:  # truncated zip, bad records, ...: torch raises RuntimeError and others
        raise CheckpointError(
            f"D-FINE checkpoint {path} is not a readable PyTorch file, truncated or corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}): copy it again"
        ) from exc
    candidates: list[tuple[str, Any]] = []
    if isinstance(data, Mapping):
        ema = data.get("ema")
        if isinstance(ema, Mapping) and _is_state_dict(ema.get("module")):
            candidates.append(("EMA weights (ema.module)", ema["module"]))
        for key in ("model", "state_dict", "module"):
            if _is_state_dict(data.get(key)):
                candidates.append((f"'{key}' weights", data[key]))
        if _is_state_dict(data):
            candidates.append(("plain state dict", data))
    if not candidates:
        kind = type(data).__name__
        keys = f" with keys {sorted(map(str, data))[:6]}" if isinstance(data, Mapping) else ""
        raise CheckpointError(
            f"D-FINE checkpoint {path} holds a {kind}{keys}, not a state dict "
            "(expected a state dict, {'model': ...} or {'ema': {'module': ...}})"
        )
    source, state = candidates[0]
    if source.startswith("EMA") and len(candidates) > 1:
        source += "; the file also holds the non-EMA training weights"
    return LoadedCheckpoint(_strip_wrappers(dict(state)), source)


# --------------------------------------------------------------------------------------------------
# The training YAML


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(base.get(key), dict) and isinstance(value, Mapping):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def read_original_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read an original D-FINE YAML config with its ``__include__`` files, merged as the original does.

    Includes are read first (paths relative to the including file, ``~`` expanded), in order; the
    including file's own keys override them (nested mappings merge). Raises CheckpointError naming the
    file for missing or unreadable files, YAML errors and include cycles.
    """
    import yaml

    path = Path(path).expanduser()
    if path in _seen:
        raise CheckpointError(f"D-FINE config {path} includes itself (via {_seen[-1]})")
    if not path.is_file():
        where = f" (included by {_seen[-1]})" if _seen else ""
        raise CheckpointError(f"D-FINE config {path}{where} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"D-FINE config {path} is not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"D-FINE config {path} is not a YAML mapping")
    merged: dict[str, Any] = {}
    for include in data.pop("__include__", None) or []:
        included = Path(str(include)).expanduser()
        if not included.is_absolute():
            included = path.parent / included
        _merge(merged, read_original_config(included, (*_seen, path)))
    return _merge(merged, data)


# --------------------------------------------------------------------------------------------------
# Architecture


@dataclass
class OriginalArchitecture:
    """The original D-FINE hyper-parameters that shape the model; ``notes`` says where each came from."""

    in_channels: int
    stem_channels: list[int]
    stage_in: list[int]
    stage_mid: list[int]
    stage_out: list[int]
    stage_blocks: list[int]
    stage_layers: list[int]
    stage_downsample: list[bool]
    stage_light: list[bool]
    stage_kernel: list[int]
    use_lab: bool
    frozen_norms: bool
    return_idx: list[int]
    feat_strides: list[int]
    encoder_in_channels: list[int]
    encoder_hidden: int
    encoder_ffn: int
    encoder_layers: int
    encoder_heads: int
    use_encoder_idx: list[int]
    expansion: float
    depth_mult: float
    pe_temperature: int
    encoder_act: str
    act: str
    decoder_hidden: int
    decoder_in_channels: list[int]
    decoder_ffn: int
    decoder_layers: int
    decoder_heads: int
    num_points: list[int]
    num_queries: int
    num_classes: int
    num_denoising: int
    reg_max: int
    reg_scale: float
    up: float
    eval_idx: int
    decoder_act: str
    cross_attn_method: str
    lqe_hidden: int
    lqe_layers: int
    lqe_top_k: int
    input_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def backbone_name(self) -> str:
        return dfine_size_names(self.stem_channels, self.stage_out, len(self.encoder_in_channels), 0)[0]

    @property
    def size_name(self) -> str:
        """D-FINE-N/S/M/L/X as the original configs define them, else "custom"."""
        return dfine_size_names(
            self.stem_channels, self.stage_out, len(self.encoder_in_channels), self.encoder_hidden
        )[1]

    def describe(self) -> str:
        grey = "1 channel (grey)" if self.in_channels == 1 else f"{self.in_channels} channels"
        return (
            f"D-FINE-{self.size_name} (HGNetv2-{self.backbone_name}, {len(self.feat_strides)} feature levels "
            f"{self.feat_strides}, encoder {self.encoder_hidden}, decoder {self.decoder_hidden} x "
            f"{self.decoder_layers} layers, {self.num_queries} queries, {self.num_classes} classes), "
            f"input {grey} {self.input_size[0]}x{self.input_size[1]}"
        )


def _count(state: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"the checkpoint has no tensor {key!r}: it is not a D-FINE (HGNetv2) model in the original "
            "module layout"
        )
    return tuple(state[key].shape)


def _points_from_scale(scale: torch.Tensor) -> list[int]:
    """Recover ``num_points`` per level from the ``num_points_scale`` buffer (1/n repeated n times)."""
    values = scale.float().tolist()
    points, i = [], 0
    while i < len(values):
        n = round(1.0 / values[i]) if values[i] > 0 else 0
        if n <= 0 or i + n > len(values) or any(abs(v - 1.0 / n) > 1e-6 for v in values[i : i + n]):
            raise CheckpointError("the checkpoint's num_points_scale buffer is not 1/n repeated n times")
        points.append(n)
        i += n
    return points


def _same(stated: Any, value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return (
            isinstance(stated, (list, tuple)) and len(stated) == len(value) and all(map(_same, stated, value))
        )
    if isinstance(value, bool) or isinstance(stated, bool):
        return bool(stated) == bool(value)
    if isinstance(value, (int, float)) and isinstance(stated, (int, float)):
        return math.isclose(float(stated), float(value), rel_tol=1e-6, abs_tol=1e-9)
    return stated == value


def _section(cfg: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    value = (cfg or {}).get(name) or {}
    return dict(value) if isinstance(value, Mapping) else {}


def infer_architecture(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any] | None = None, config_name: str = "config"
) -> OriginalArchitecture:
    """Decide the architecture from the tensor shapes, with the YAML (``cfg``) for what shapes cannot show.

    Every shape-derived value the YAML also states must agree (else CheckpointError naming both).
    Raises CheckpointError for layouts this import does not support (see the module docstring).
    """
    notes: list[str] = []
    hg, enc, dec = _section(cfg, "HGNetv2"), _section(cfg, "HybridEncoder"), _section(cfg, "DFINETransformer")
    if cfg:
        backbone = _section(cfg, "DFINE").get("backbone", "HGNetv2")
        if backbone != "HGNetv2":
            raise CheckpointError(
                f"{config_name} uses backbone {backbone!r}: only HGNetv2 D-FINE models import"
            )

    def agree(section: dict[str, Any], key: str, value: Any, label: str) -> Any:
        """The shape-derived ``value``, checked against the YAML's ``section[key]`` when it states one."""
        stated = section.get(key)
        if stated is not None and not _same(stated, value):
            raise CheckpointError(
                f"{config_name} says {label}={stated!r} but the checkpoint's tensors have {value!r}: "
                "is it the config this checkpoint was trained with?"
            )
        return value

    def choose(section: dict[str, Any], key: str, default: Any, label: str) -> Any:
        if key in section and section[key] is not None:
            notes.append(f"{label}={section[key]!r} (from {config_name})")
            return section[key]
        notes.append(f"{label}={default!r} (assumed: not stored in the weights; pass --config to read it)")
        return default

    if (
        any(k.endswith("conv_bn_fused.weight") for k in state)
        or "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv.weight" in state
    ):
        raise CheckpointError(
            "the checkpoint was saved after deploy() (convolutions fused with their BatchNorm): save the "
            "state dict of the training model instead"
        )
    if "decoder.tgt_embed.weight" in state:
        raise CheckpointError(
            "the checkpoint learns its query content (learn_query_content=True): not supported"
        )

    # ---------------------------------------------------------------- backbone (HGNetv2)
    stem1 = _shape(state, "backbone.stem.stem1.conv.weight")
    in_channels = stem1[1]
    stem_channels = [in_channels, stem1[0], _shape(state, "backbone.stem.stem4.conv.weight")[0]]
    num_stages = _count(state, r"backbone\.stages\.(\d+)\.")
    if num_stages == 0:
        _shape(state, "backbone.stages.0.blocks.0.aggregation.0.conv.weight")
    stage_in, stage_mid, stage_out, blocks, layers, downsample, light, kernel = ([] for _ in range(8))
    for i in range(num_stages):
        prefix = f"backbone.stages.{i}"
        is_light = f"{prefix}.blocks.0.layers.0.conv1.conv.weight" in state
        first = f"{prefix}.blocks.0.layers.0." + ("conv1.conv.weight" if is_light else "conv.weight")
        last = f"{prefix}.blocks.0.layers.0." + ("conv2.conv.weight" if is_light else "conv.weight")
        stage_in.append(_shape(state, first)[1])
        stage_mid.append(_shape(state, first)[0])
        kernel.append(_shape(state, last)[-1])
        stage_out.append(_shape(state, f"{prefix}.blocks.0.aggregation.1.conv.weight")[0])
        blocks.append(_count(state, rf"{re.escape(prefix)}\.blocks\.(\d+)\."))
        layers.append(_count(state, rf"{re.escape(prefix)}\.blocks\.0\.layers\.(\d+)\."))
        downsample.append(f"{prefix}.downsample.conv.weight" in state)
        light.append(is_light)
    use_lab = agree(
        hg, "use_lab", any(".lab.scale" in k for k in state if k.startswith("backbone.")), "HGNetv2.use_lab"
    )
    if in_channels not in (1, 3):
        raise CheckpointError(
            f"the checkpoint's backbone takes {in_channels} input channels: only 1 or 3 import"
        )
    # FrozenBatchNorm2d (HGNetv2 freeze_norm=True, the L/X configs) keeps no num_batches_tracked; the
    # converted backbone uses the same normalisation formula, so that the outputs agree to rounding
    frozen_norms = not any(k.startswith("backbone.") and k.endswith(".num_batches_tracked") for k in state)
    if hg.get("freeze_norm") is not None and bool(hg["freeze_norm"]) != frozen_norms:
        notes.append(
            f"HGNetv2.freeze_norm={hg['freeze_norm']!r} in {config_name} but the checkpoint's backbone "
            f"norms are {'frozen' if frozen_norms else 'BatchNorm2d'}: following the checkpoint"
        )
    stride, stage_strides = 4, []
    for has_downsample in downsample:
        stride *= 2 if has_downsample else 1
        stage_strides.append(stride)

    # ---------------------------------------------------------------- hybrid encoder
    levels = _count(state, r"encoder\.input_proj\.(\d+)\.")
    if levels == 0:
        _shape(state, "encoder.input_proj.0.conv.weight")
    encoder_in = [_shape(state, f"encoder.input_proj.{i}.conv.weight")[1] for i in range(levels)]
    # the stages whose outputs feed the encoder: the last ones with these channel counts
    return_idx: list[int] = []
    stage = num_stages - 1
    for channels in reversed(encoder_in):
        while stage >= 0 and stage_out[stage] != channels:
            stage -= 1
        if stage < 0:
            raise CheckpointError(
                f"no backbone stage gives the encoder's {encoder_in} input channels (stages give {stage_out})"
            )
        return_idx.insert(0, stage)
        stage -= 1
    return_idx = agree(hg, "return_idx", return_idx, "HGNetv2.return_idx")
    feat_strides = agree(
        enc, "feat_strides", [stage_strides[i] for i in return_idx], "HybridEncoder.feat_strides"
    )
    agree(enc, "in_channels", encoder_in, "HybridEncoder.in_channels")
    encoder_hidden = agree(
        enc, "hidden_dim", _shape(state, "encoder.input_proj.0.conv.weight")[0], "HybridEncoder.hidden_dim"
    )
    aifi = _count(state, r"encoder\.encoder\.(\d+)\.")
    encoder_layers = _count(state, r"encoder\.encoder\.0\.layers\.(\d+)\.") if aifi else 0
    agree(enc, "num_encoder_layers", encoder_layers, "HybridEncoder.num_encoder_layers")
    encoder_ffn = (
        _shape(state, "encoder.encoder.0.layers.0.linear1.weight")[0] if aifi else 4 * encoder_hidden
    )
    agree(enc, "dim_feedforward", encoder_ffn, "HybridEncoder.dim_feedforward")
    use_encoder_idx = [
        int(i) for i in choose(enc, "use_encoder_idx", [levels - 1], "HybridEncoder.use_encoder_idx")
    ]
    if len(use_encoder_idx) != aifi:
        raise CheckpointError(
            f"HybridEncoder.use_encoder_idx={use_encoder_idx} but the checkpoint has {aifi} encoder stacks"
        )
    encoder_heads = int(choose(enc, "nhead", DEFAULT_HEADS, "HybridEncoder.nhead"))
    # RepNCSPELAN4 branch width round(expansion * hidden // 2) and round(3 * depth_mult) blocks
    width = _shape(state, "encoder.fpn_blocks.0.cv2.1.conv.weight")[0]
    depth = _count(state, r"encoder\.fpn_blocks\.0\.cv2\.0\.bottlenecks\.(\d+)\.")
    expansion = float(
        enc.get("expansion")
        or next(
            (e for e in (0.34, 0.5, 1.0) if round(e * encoder_hidden // 2) == width),
            (2 * width + 1) / encoder_hidden,
        )
    )
    depth_mult = float(
        enc.get("depth_mult") or next((d for d in (0.34, 0.5, 0.67, 1.0) if round(3 * d) == depth), depth / 3)
    )
    if round(expansion * encoder_hidden // 2) != width or round(3 * depth_mult) != depth:
        raise CheckpointError(
            f"{config_name} says HybridEncoder expansion={expansion}, depth_mult={depth_mult} but the "
            f"checkpoint's encoder blocks are {width} wide with {depth} blocks: is it the config this "
            "checkpoint was trained with?"
        )

    # ---------------------------------------------------------------- decoder
    enc_output = "decoder.enc_output.proj.weight"
    if enc_output not in state and "decoder.enc_output.0.weight" in state:  # older saves: unnamed Sequential
        enc_output = "decoder.enc_output.0.weight"
    decoder_hidden = agree(dec, "hidden_dim", _shape(state, enc_output)[0], "DFINETransformer.hidden_dim")
    # the decoder projects the encoder outputs (encoder_hidden channels) unless the widths are equal
    decoder_in = [
        _shape(state, f"decoder.input_proj.{i}.conv.weight")[1]
        if f"decoder.input_proj.{i}.conv.weight" in state
        else decoder_hidden
        for i in range(levels)
    ]
    if any(c != encoder_hidden for c in decoder_in):
        raise CheckpointError(
            f"the decoder's input projections take {decoder_in} channels but the encoder gives "
            f"{encoder_hidden}"
        )
    agree(dec, "feat_channels", decoder_in, "DFINETransformer.feat_channels")
    _shape(state, "decoder.decoder.layers.0.cross_attn.num_points_scale")
    points = _points_from_scale(state["decoder.decoder.layers.0.cross_attn.num_points_scale"])
    if len(points) != levels:
        raise CheckpointError(
            f"the decoder attends on {len(points)} levels but the encoder gives {levels}: extra decoder "
            "levels are not supported"
        )
    num_points = points
    if "num_points" in dec and not isinstance(dec["num_points"], list):
        dec["num_points"] = [dec["num_points"]] * levels
    agree(dec, "num_points", num_points, "DFINETransformer.num_points")
    agree(dec, "num_levels", levels, "DFINETransformer.num_levels")
    offsets = _shape(state, "decoder.decoder.layers.0.cross_attn.sampling_offsets.weight")[0]
    decoder_heads = agree(dec, "nhead", offsets // (2 * sum(num_points)), "DFINETransformer.nhead")
    decoder_layers = agree(
        dec, "num_layers", _count(state, r"decoder\.decoder\.layers\.(\d+)\."), "DFINETransformer.num_layers"
    )
    decoder_ffn = agree(
        dec,
        "dim_feedforward",
        _shape(state, "decoder.decoder.layers.0.linear1.weight")[0],
        "DFINETransformer.dim_feedforward",
    )
    num_classes = _shape(state, "decoder.dec_score_head.0.weight")[0]
    agree(dict(cfg or {}), "num_classes", num_classes, "num_classes")
    if _shape(state, "decoder.enc_score_head.weight")[0] != num_classes:
        raise CheckpointError(
            "the checkpoint selects queries class-agnostically (query_select_method='agnostic'): "
            "not supported"
        )
    method = str(dec.get("query_select_method", "default"))
    if method != "default":
        raise CheckpointError(f"{config_name} sets query_select_method={method!r}: only 'default' imports")
    reg_max = agree(
        dec,
        "reg_max",
        _shape(state, "decoder.dec_bbox_head.0.layers.2.weight")[0] // 4 - 1,
        "DFINETransformer.reg_max",
    )
    reg_scale = (
        float(state["decoder.reg_scale"].reshape(-1)[0])
        if "decoder.reg_scale" in state
        else float(dec.get("reg_scale", 4.0))
    )
    agree(dec, "reg_scale", reg_scale, "DFINETransformer.reg_scale")
    up = float(state["decoder.up"].reshape(-1)[0]) if "decoder.up" in state else 0.5
    eval_idx = int(choose(dec, "eval_idx", -1, "DFINETransformer.eval_idx"))
    if not -decoder_layers <= eval_idx < decoder_layers:
        raise CheckpointError(
            f"eval_idx={eval_idx} is outside the checkpoint's {decoder_layers} decoder layers"
        )
    lqe_in, lqe_hidden = (
        _shape(state, "decoder.decoder.lqe_layers.0.reg_conf.layers.0.weight")[1],
        _shape(state, "decoder.decoder.lqe_layers.0.reg_conf.layers.0.weight")[0],
    )
    lqe_layers = _count(state, r"decoder\.decoder\.lqe_layers\.0\.reg_conf\.layers\.(\d+)\.")
    num_queries = int(choose(dec, "num_queries", DEFAULT_NUM_QUERIES, "DFINETransformer.num_queries"))
    num_denoising = (
        int(dec.get("num_denoising", 100)) if "decoder.denoising_class_embed.weight" in state else 0
    )

    # ---------------------------------------------------------------- input size
    size_cfg = (
        (cfg or {}).get("eval_spatial_size") or enc.get("eval_spatial_size") or dec.get("eval_spatial_size")
    )
    if size_cfg:
        input_size = (int(size_cfg[0]), int(size_cfg[1]))
        notes.append(f"input size {input_size[0]}x{input_size[1]} (eval_spatial_size from {config_name})")
    elif "decoder.anchors" in state:
        tokens = int(state["decoder.anchors"].shape[1])
        per_pixel = sum(1.0 / (s * s) for s in feat_strides)
        side = round(math.sqrt(tokens / per_pixel))
        if sum((side // s) ** 2 for s in feat_strides) != tokens:
            raise CheckpointError(
                f"the checkpoint's decoder.anchors ({tokens} positions) fit no square input size: "
                "pass --config with eval_spatial_size"
            )
        input_size = (side, side)
        notes.append(f"input size {side}x{side} (from the {tokens} anchors in the checkpoint)")
    else:
        input_size = (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
        notes.append(
            f"input size {DEFAULT_INPUT_SIZE}x{DEFAULT_INPUT_SIZE} (assumed: pass --config to read it)"
        )
    if input_size[0] != input_size[1]:
        raise CheckpointError(
            f"input size {input_size[0]}x{input_size[1]} is not square: the original encoder's position "
            "embedding equals transformers' only for square inputs"
        )
    if any(input_size[0] % s for s in feat_strides):
        raise CheckpointError(
            f"input size {input_size} is not a multiple of the feature strides {feat_strides}"
        )

    return OriginalArchitecture(
        in_channels=in_channels,
        stem_channels=stem_channels,
        stage_in=stage_in,
        stage_mid=stage_mid,
        stage_out=stage_out,
        stage_blocks=blocks,
        stage_layers=layers,
        stage_downsample=downsample,
        stage_light=light,
        stage_kernel=kernel,
        use_lab=bool(use_lab),
        frozen_norms=frozen_norms,
        return_idx=[int(i) for i in return_idx],
        feat_strides=[int(s) for s in feat_strides],
        encoder_in_channels=encoder_in,
        encoder_hidden=int(encoder_hidden),
        encoder_ffn=int(encoder_ffn),
        encoder_layers=encoder_layers,
        encoder_heads=encoder_heads,
        use_encoder_idx=use_encoder_idx,
        expansion=float(expansion),
        depth_mult=float(depth_mult),
        pe_temperature=int(enc.get("pe_temperature", 10000)),
        encoder_act=str(enc.get("enc_act", "gelu")),
        act=str(enc.get("act", "silu")),
        decoder_hidden=int(decoder_hidden),
        decoder_in_channels=decoder_in,
        decoder_ffn=int(decoder_ffn),
        decoder_layers=int(decoder_layers),
        decoder_heads=int(decoder_heads),
        num_points=num_points,
        num_queries=num_queries,
        num_classes=int(num_classes),
        num_denoising=num_denoising,
        reg_max=int(reg_max),
        reg_scale=reg_scale,
        up=up,
        eval_idx=eval_idx,
        decoder_act=str(dec.get("activation", "relu")),
        cross_attn_method=str(dec.get("cross_attn_method", "default")),
        lqe_hidden=int(lqe_hidden),
        lqe_layers=int(lqe_layers),
        lqe_top_k=int(lqe_in // 4 - 1),
        input_size=input_size,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# transformers config and tensors


def to_dfine_config(arch: OriginalArchitecture, class_names: Sequence[str]) -> Any:
    """The `transformers.DFineConfig` of the model the original evaluates (decoder cut after eval_idx).

    ``eval_size``/``anchor_image_size`` stay unset: transformers then builds the position embedding and
    the anchors for each input size, as the original does in training (its eval buffers are the same
    values for the eval size).
    """
    from transformers import DFineConfig, HGNetV2Config

    names = [str(n) for n in class_names]
    backbone = HGNetV2Config(
        num_channels=arch.in_channels,
        embedding_size=arch.stem_channels[2],
        stem_channels=list(arch.stem_channels),
        stage_in_channels=list(arch.stage_in),
        stage_mid_channels=list(arch.stage_mid),
        stage_out_channels=list(arch.stage_out),
        stage_num_blocks=list(arch.stage_blocks),
        stage_numb_of_layers=list(arch.stage_layers),
        stage_downsample=list(arch.stage_downsample),
        stage_light_block=list(arch.stage_light),
        stage_kernel_size=list(arch.stage_kernel),
        hidden_sizes=list(arch.stage_out),
        depths=list(arch.stage_blocks),
        out_indices=[i + 1 for i in arch.return_idx],  # transformers counts the stem as stage 0
        use_learnable_affine_block=arch.use_lab,
    )
    kept_layers = _kept_layers(arch)
    config = DFineConfig(
        backbone_config=backbone,
        freeze_backbone_batch_norms=arch.frozen_norms,
        encoder_in_channels=list(arch.encoder_in_channels),
        feat_strides=list(arch.feat_strides),
        encoder_hidden_dim=arch.encoder_hidden,
        encoder_layers=arch.encoder_layers,
        encoder_ffn_dim=arch.encoder_ffn,
        encoder_attention_heads=arch.encoder_heads,
        encode_proj_layers=list(arch.use_encoder_idx),
        positional_encoding_temperature=arch.pe_temperature,
        encoder_activation_function=arch.encoder_act,
        activation_function=arch.act,
        hidden_expansion=arch.expansion,
        depth_mult=arch.depth_mult,
        d_model=arch.decoder_hidden,
        num_queries=arch.num_queries,
        decoder_in_channels=list(arch.decoder_in_channels),
        decoder_ffn_dim=arch.decoder_ffn,
        num_feature_levels=len(arch.num_points),
        decoder_n_points=list(arch.num_points),
        decoder_layers=kept_layers,
        decoder_attention_heads=arch.decoder_heads,
        decoder_activation_function=arch.decoder_act,
        decoder_method=arch.cross_attn_method,
        num_denoising=arch.num_denoising,
        eval_idx=-1,
        max_num_bins=arch.reg_max,
        reg_scale=arch.reg_scale,
        up=arch.up,
        lqe_hidden_dim=arch.lqe_hidden,
        lqe_layers=arch.lqe_layers,
        top_prob_values=arch.lqe_top_k,
        eval_size=None,
        anchor_image_size=None,
        num_labels=arch.num_classes,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    config.image_size = list(arch.input_size)
    return config


def _kept_layers(arch: OriginalArchitecture) -> int:
    return (arch.eval_idx % arch.decoder_layers) + 1


_RENAMES_ELAN = {
    "cv1": "conv1",
    "cv2.0": "csp_rep1",
    "cv2.1": "conv2",
    "cv3.0": "csp_rep2",
    "cv3.1": "conv3",
    "cv4": "conv4",
}
_RENAMES_LAYER = {
    "linear1": "mlp.layers.0",
    "linear2": "mlp.layers.1",
    "norm1": "self_attn_layer_norm",
    "self_attn.out_proj": "self_attn.o_proj",
}


def _rename(key: str, arch: OriginalArchitecture) -> list[str] | None:
    """transformers names for one original key; [] drops it, None means "not in the original layout"."""
    parts = key.split(".")
    leaf = parts[-1]
    if key.startswith("backbone."):
        body = [{"conv": "convolution", "bn": "normalization"}.get(p, p) for p in parts[1:-1]]
        if not body or body[0] not in ("stem", "stages"):
            return None
        body[0] = "embedder" if body[0] == "stem" else "encoder.stages"
        return [".".join(["model.backbone.model", *body, leaf])]
    if key.startswith("encoder."):
        rest = ".".join(parts[1:])
        if m := re.fullmatch(r"input_proj\.(\d+)\.(conv|norm)\.(\w+)", rest):
            return [f"model.encoder_input_proj.{m[1]}.{'0' if m[2] == 'conv' else '1'}.{m[3]}"]
        if m := re.fullmatch(r"encoder\.(\d+)\.layers\.(\d+)\.(.+)", rest):
            return [
                _attention_layer(
                    f"model.encoder.aifi.{m[1]}.layers.{m[2]}", m[3], {"norm2": "final_layer_norm"}
                )
            ]
        if re.fullmatch(r"lateral_convs\.\d+\.(conv|norm)\.\w+", rest):
            return [f"model.encoder.{rest}"]
        if m := re.fullmatch(
            r"(fpn_blocks|pan_blocks)\.(\d+)\.(cv1|cv2\.0|cv2\.1|cv3\.0|cv3\.1|cv4)\.(.+)", rest
        ):
            return [f"model.encoder.{m[1]}.{m[2]}.{_RENAMES_ELAN[m[3]]}.{m[4]}"]
        if m := re.fullmatch(r"downsample_convs\.(\d+)\.0\.cv([12])\.(.+)", rest):
            return [f"model.encoder.downsample_convs.{m[1]}.conv{m[2]}.{m[3]}"]
        return None
    if not key.startswith("decoder."):
        return None
    rest = ".".join(parts[1:])
    kept = _kept_layers(arch)
    if rest in ("anchors", "valid_mask", "decoder.up", "decoder.reg_scale"):
        return []  # recomputed per input size / duplicates of decoder.up and decoder.reg_scale
    if rest in ("up", "reg_scale"):
        return [f"model.decoder.{rest}"]
    if m := re.fullmatch(r"input_proj\.(\d+)\.(conv|norm)\.(\w+)", rest):
        return [f"model.decoder_input_proj.{m[1]}.{'0' if m[2] == 'conv' else '1'}.{m[3]}"]
    if m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", rest):
        if int(m[1]) >= kept:
            return []
        body = m[2].replace("cross_attn.", "encoder_attn.")
        return [_attention_layer(f"model.decoder.layers.{m[1]}", body, {"norm3": "final_layer_norm"})]
    if m := re.fullmatch(r"decoder\.lqe_layers\.(\d+)\.(.+)", rest):
        return [] if int(m[1]) >= kept else [f"model.decoder.lqe_layers.{m[1]}.{m[2]}"]
    if m := re.fullmatch(r"dec_score_head\.(\d+)\.(\w+)", rest):
        return (
            []
            if int(m[1]) >= kept
            else [f"model.decoder.class_embed.{m[1]}.{m[2]}", f"class_embed.{m[1]}.{m[2]}"]
        )
    if m := re.fullmatch(r"dec_bbox_head\.(\d+)\.(.+)", rest):
        return (
            []
            if int(m[1]) >= kept
            else [f"model.decoder.bbox_embed.{m[1]}.{m[2]}", f"bbox_embed.{m[1]}.{m[2]}"]
        )
    if m := re.fullmatch(r"(pre_bbox_head|query_pos_head)\.(.+)", rest):
        return [f"model.decoder.{m[1]}.{m[2]}"]
    if m := re.fullmatch(r"enc_output\.(proj|norm|0|1)\.(\w+)", rest):
        return [f"model.enc_output.{'0' if m[1] in ('proj', '0') else '1'}.{m[2]}"]
    if m := re.fullmatch(r"(enc_score_head|enc_bbox_head|denoising_class_embed)\.(.+)", rest):
        return [f"model.{m[1]}.{m[2]}"]
    return None


def _attention_layer(prefix: str, body: str, extra: dict[str, str]) -> str:
    for old, new in {**_RENAMES_LAYER, **extra}.items():
        if body == old or body.startswith(old + "."):
            return f"{prefix}.{new}{body[len(old) :]}"
    return f"{prefix}.{body}"


def convert_state_dict(
    state: Mapping[str, torch.Tensor], arch: OriginalArchitecture
) -> dict[str, torch.Tensor]:
    """Original-layout tensors -> `DFineForObjectDetection` keys (fused attention projections split).

    Raises CheckpointError listing keys that are not in the original D-FINE layout.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.endswith(".in_proj_weight") or key.endswith(".in_proj_bias"):
            names = _rename(
                key.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias"),
                arch,
            )
            if names is None:
                unknown.append(key)
                continue
            for name in names:  # nn.MultiheadAttention stacks q, k, v along dim 0
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                    out[name.replace(".in_proj.", f".{proj}.")] = part.clone()
            continue
        names = _rename(key, arch)
        if names is None:
            unknown.append(key)
            continue
        for name in names:
            out[name] = tensor
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors are not in the original D-FINE (HGNetv2) layout, "
            f"e.g. {sorted(unknown)[:3]}"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Import


@dataclass(frozen=True)
class ImportReport:
    """What `import_original_dfine` did: the folder written and the decisions, as printable lines."""

    folder: Path
    architecture: OriginalArchitecture
    lines: tuple[str, ...]


def import_original_dfine(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> ImportReport:
    """Convert an original-code D-FINE checkpoint into a detector folder `DFineDetector` loads.

    checkpoint: ``.pt``/``.pth`` as the original trainer or a framework on its modules saves it (see
    `load_original_state_dict`). config: the training YAML (``__include__`` followed), else the
    architecture comes from the tensor shapes with the defaults of the original configs for what they
    do not show. class_names: one per class of the checkpoint (default ``class_0``...). out: the folder
    to write (config.json, model.safetensors, preprocessor_config.json: resize to the training input
    size, bilinear, rescale 1/255, no normalisation -- the original's evaluation transform); refused
    when it exists and is not empty unless ``overwrite``. echo: called with each report line as it is
    decided (e.g. ``print``). Raises CheckpointError for everything the user can fix.
    """
    from transformers import DFineForObjectDetection

    from UltramotionIGTLib.core.detector import (
        DFineDetector,
        Preprocessing,
        _quiet_transformers,
        save_detector_folder,
    )

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if echo is not None:
            echo(line)

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(
            f"output {out} exists and is not an empty folder: choose another --out or pass --force"
        )
    loaded = load_original_state_dict(checkpoint)
    say(f"checkpoint: {checkpoint}: {loaded.source}, {len(loaded.state_dict)} tensors")
    cfg = read_original_config(config) if config is not None else None
    arch = infer_architecture(
        loaded.state_dict, cfg, config_name=str(config) if config is not None else "config"
    )
    source = f"from {config} and the tensor shapes" if config is not None else "from the tensor shapes"
    say(f"architecture ({source}): {arch.describe()}")
    for note in arch.notes:
        say(f"  {note}")
    if arch.eval_idx % arch.decoder_layers != arch.decoder_layers - 1:
        say(
            f"  decoder cut after layer {_kept_layers(arch)} of {arch.decoder_layers} "
            f"(eval_idx={arch.eval_idx})"
        )
    if class_names is None:
        names = [f"class_{i}" for i in range(arch.num_classes)]
        say(f"classes: {arch.num_classes} ({', '.join(names)}; name them with --classes)")
    else:
        names = [str(n).strip() for n in class_names]
        if len(names) != arch.num_classes or len(set(names)) != len(names) or not all(names):
            raise CheckpointError(
                f"--classes gives {len(names)} names {names} but the checkpoint has {arch.num_classes} "
                "classes (distinct, non-empty names, one per class)"
            )
        say(f"classes: {', '.join(names)}")
    tensors = convert_state_dict(loaded.state_dict, arch)
    config_hf = to_dfine_config(arch, names)
    with _quiet_transformers():
        model = DFineForObjectDetection(config_hf).eval()
    expected = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} tensors do not fit the decided architecture, e.g. {mismatched[:2]}"
        )
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the converted weights do not fill the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {list(result.unexpected_keys)[:3]})"
        )
    preprocessing = Preprocessing(input_size=arch.input_size)
    folder = save_detector_folder(model, out, preprocessing=preprocessing)
    DFineDetector.from_pretrained(folder, device="cpu")  # the folder loads the way the pipeline loads it
    say(f"wrote {folder} (config.json, model.safetensors, preprocessor_config.json)")
    return ImportReport(folder=folder, architecture=arch, lines=tuple(lines))


# --------------------------------------------------------------------------------------------------
# Command line (``ultramotion-igt models import-dfine``)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``import-dfine`` options to ``parser``; `run` executes them."""
    parser.description = (
        "Convert a checkpoint of the original D-FINE code (or of a framework built on its modules: a state "
        "dict, {'model': ...} or {'ema': {'module': ...}}) into a detector folder. Prints what it decided."
    )
    parser.add_argument("checkpoint", help="the .pt/.pth file the training saved")
    parser.add_argument(
        "--config", default=None, help="the training YAML (default: decide from the tensor shapes)"
    )
    parser.add_argument("--classes", default=None, help="class names, comma-separated, one per class")
    parser.add_argument("--out", required=True, help="the detector folder to write")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``import-dfine``; errors a user can fix raise `CheckpointError` (one line, exit 2 in the CLI)."""
    classes = [c for c in args.classes.split(",")] if args.classes else None
    import_original_dfine(
        args.checkpoint, args.out, config=args.config, class_names=classes, overwrite=args.force, echo=print
    )
    return 0
