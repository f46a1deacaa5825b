"""Model packs: the offline way to ship, verify, install and load a detector + SAM pair.

A **pack** is a folder (or a ``.zip`` of one) holding ``manifest.json`` beside the model files::

    {
      "format": "ultramotion-igt/model-pack", "version": 1,
      "name": "demo-phantom", "description": "...", "created": "2026-11-23 10:00 UTC",
      "models": [
        {"role": "detector", "name": "detector", "architecture": "d-fine", "model_type": "d_fine",
         "path": "detector", "classes": ["vessel", "needle", "bone"], "input_size": [256, 256],
         "files": {"detector/config.json": {"sha256": "...", "bytes": 1234}, ...}},
        {"role": "segmenter", "name": "sam_vit_t_demo", "architecture": "sam", "model_type": "vit_t_demo",
         "path": "sam/sam_vit_t_demo.safetensors", "classes": [], "input_size": [256, 256],
         "files": {"sam/sam_vit_t_demo.safetensors": {...}}}
      ],
      "files": {"detector/MODEL_CARD.md": {...}, ...}
    }

Every path is relative to the pack folder, with ``/`` separators, and may not leave it. ``path`` is
what the loader opens: an HF D-FINE folder (``config.json`` + ``model.safetensors``) for the detector,
a checkpoint file for SAM (official ``.pth``, ``.safetensors`` with its config in the metadata, or
``.pth`` + sidecar ``.json``). A model's ``files`` are the files it loads; the top-level ``files``
are every other file of the pack (model cards, training records): together, every file in the pack
has a size and a sha256. A segmenter is class-agnostic (``classes`` = []).

Where packs live: the shipped demo pack is ``Resources/Models`` (`models_root`: beside the library,
in the source tree and in an installed Slicer extension alike); packs a user imports go to
`user_models_dir` (``$ULTRAMOTION_MODELS``, else ``~/.ultramotion-igt/models``), one folder per pack.

This module is the one place that knows where the shipped models live (`models_root`,
`default_models`, `find_sam_checkpoint`; ``doctor`` uses them). It imports no torch at module
scope, so the doctor can run it on a bare Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.tools.options import SAM_TYPE_HELP

MANIFEST_NAME = "manifest.json"
PACK_FORMAT = "ultramotion-igt/model-pack"
PACK_VERSION = 1
ROLES = ("detector", "segmenter")
#: Checkpoint file suffixes looked for in a SAM model folder, best first.
SAM_SUFFIXES = (".safetensors", ".pth", ".pt")
#: Files never taken into a pack: resumable training state, temporary and hidden files.
EXCLUDED_NAMES = ("training-state.pt",)
ENV_MODELS_DIR = "ULTRAMOTION_MODELS"
_HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Where models live
# ----------------------------------------------------------------------------------------------------


def models_root() -> Path:
    """``Resources/Models`` beside the library: the shipped demo pack.

    The same relative place in the source tree (``<repo>/Resources/Models``) and in an installed
    Slicer extension (``<qt-scripted-modules>/Resources/Models``, shipped next to ``UltramotionIGTLib/``).
    """
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_dir() -> Path:
    """Where imported packs are installed: ``$ULTRAMOTION_MODELS``, else ``~/.ultramotion-igt/models``."""
    env = os.environ.get(ENV_MODELS_DIR)
    return Path(env).expanduser() if env else Path.home() / ".ultramotion-igt" / "models"


def sam_checkpoints_in(folder: str | Path) -> list[Path]:
    """The checkpoint files in ``folder``, ``.safetensors`` before ``.pth``/``.pt``, then by name
    (empty when it is not a folder)."""
    p = Path(folder)
    if not p.is_dir():
        return []
    files = [q for q in p.iterdir() if q.is_file() and q.suffix in SAM_SUFFIXES]
    return sorted(files, key=lambda q: (SAM_SUFFIXES.index(q.suffix), q.name))


def find_sam_checkpoint(path: str | Path) -> Path | None:
    """A SAM checkpoint file: ``path`` itself if it is a file, else the first of
    `sam_checkpoints_in` the folder; None if there is none."""
    p = Path(path)
    if p.is_file():
        return p
    found = sam_checkpoints_in(p)
    return found[0] if found else None


def default_models() -> dict[str, Path | None]:
    """The shipped demo models: ``{"detector": folder or None, "sam": checkpoint file or None}``.

    From the demo pack's manifest when there is one, else by the folder layout
    (``detector/config.json``, first checkpoint in ``sam/``). Existence is checked, hashes are not
    (`verify_pack` does that).
    """
    root = models_root()
    try:
        manifest = read_manifest(root)
    except CheckpointError:
        manifest = None
    if manifest is not None:
        det = manifest.model("detector")
        seg = manifest.model("segmenter")
        det_path = root / det.path if det is not None else None
        seg_path = root / seg.path if seg is not None else None
        return {
            "detector": det_path if det_path is not None and det_path.is_dir() else None,
            "sam": seg_path if seg_path is not None and seg_path.is_file() else None,
        }
    detector = root / "detector"
    return {
        "detector": detector if (detector / "config.json").is_file() else None,
        "sam": find_sam_checkpoint(root / "sam"),
    }


# ----------------------------------------------------------------------------------------------------
# Manifest data
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model of a pack (see the module docstring). ``path`` and the keys of ``files`` are
    relative to the pack folder; ``input_size`` is (H, W) of the model input in pixels."""

    role: str
    name: str
    architecture: str
    model_type: str
    path: str
    classes: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "role": self.role,
            "name": self.name,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "path": self.path,
            "classes": list(self.classes),
            "input_size": [int(v) for v in self.input_size],
            "files": {k: dict(self.files[k]) for k in sorted(self.files)},
        }
        out.update(self.extra)
        return out


@dataclass
class PackManifest:
    """A parsed ``manifest.json``. ``files`` holds the pack's files that belong to no model."""

    name: str
    description: str
    models: list[ModelSpec]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = PACK_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, role: str) -> ModelSpec | None:
        """The model with this role (``detector`` / ``segmenter``), None if the pack has none."""
        for spec in self.models:
            if spec.role == role:
                return spec
        return None

    def all_files(self) -> dict[str, dict[str, Any]]:
        """Every file the manifest lists (model files and pack files): relpath -> {sha256, bytes}."""
        out: dict[str, dict[str, Any]] = {}
        for spec in self.models:
            out.update(spec.files)
        out.update(self.files)
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": PACK_FORMAT,
            "version": self.version,
            "name": self.name,
            "description": self.description,
        }
        out.update(self.extra)
        out["models"] = [m.to_dict() for m in self.models]
        out["files"] = {k: dict(self.files[k]) for k in sorted(self.files)}
        return out


def _check_relpath(rel: Any, where: str) -> str:
    """A safe pack-relative POSIX path, or CheckpointError naming ``where``."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise CheckpointError(f"{where}: invalid path {rel!r} (a relative path with / separators)")
    posix = PurePosixPath(rel)
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", rel) or ".." in posix.parts:
        raise CheckpointError(f"{where}: path {rel!r} leaves the pack folder; paths must stay inside it")
    return posix.as_posix()


def _parse_files(data: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: 'files' must be an object {{relpath: {{sha256, bytes}}}}")
    out: dict[str, dict[str, Any]] = {}
    for rel, entry in data.items():
        rel = _check_relpath(rel, where)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            or not isinstance(entry.get("bytes"), int)
            or entry["bytes"] < 0
        ):
            raise CheckpointError(f"{where}: entry for {rel} needs a hex 'sha256' and an integer 'bytes'")
        out[rel] = {"sha256": entry["sha256"], "bytes": int(entry["bytes"])}
    return out


def parse_manifest(data: Any, source: str | Path = MANIFEST_NAME) -> PackManifest:
    """Validate a manifest dict; raises CheckpointError naming ``source`` and what is wrong."""
    where = str(source)
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if data.get("format") != PACK_FORMAT:
        raise CheckpointError(
            f"{where} has format {data.get('format')!r}, expected {PACK_FORMAT!r}: not a model pack manifest"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > PACK_VERSION or version < 1:
        raise CheckpointError(
            f"{where} is pack format version {version!r}; this ultramotion-igt reads version "
            f"{PACK_VERSION}: update ultramotion-igt"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"{where} has no pack 'name'")
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise CheckpointError(f"{where} lists no 'models'")
    models: list[ModelSpec] = []
    keys = ("role", "name", "architecture", "model_type", "path", "classes", "input_size", "files")
    for i, raw in enumerate(raw_models):
        mwhere = f"{where} models[{i}]"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{mwhere} is not an object")
        missing = [k for k in keys if k not in raw]
        if missing:
            raise CheckpointError(f"{mwhere} lacks {', '.join(missing)}")
        if raw["role"] not in ROLES:
            raise CheckpointError(f"{mwhere} has role {raw['role']!r}; roles are {', '.join(ROLES)}")
        if any(m.role == raw["role"] for m in models):
            raise CheckpointError(
                f"{where} has two models with role {raw['role']!r}; a pack holds one of each"
            )
        classes = raw["classes"]
        size = raw["input_size"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(f"{mwhere} 'classes' must be a list of names")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise CheckpointError(f"{mwhere} 'input_size' must be [height, width] in pixels")
        spec = ModelSpec(
            role=raw["role"],
            name=str(raw["name"]),
            architecture=str(raw["architecture"]),
            model_type=str(raw["model_type"]),
            path=_check_relpath(raw["path"], mwhere),
            classes=list(classes),
            input_size=[int(v) for v in size],
            files=_parse_files(raw["files"], mwhere),
            extra={k: v for k, v in raw.items() if k not in keys},
        )
        if not spec.files:
            raise CheckpointError(f"{mwhere} ({spec.name}) lists no files")
        if not any(rel == spec.path or rel.startswith(spec.path.rstrip("/") + "/") for rel in spec.files):
            raise CheckpointError(f"{mwhere} ({spec.name}): its path {spec.path} is not among its files")
        models.append(spec)
    pack_files = _parse_files(data.get("files", {}), where)
    top = ("format", "version", "name", "description", "models", "files")
    return PackManifest(
        name=name.strip(),
        description=str(data.get("description", "")),
        models=models,
        files=pack_files,
        version=version,
        extra={k: v for k, v in data.items() if k not in top},
    )


def read_manifest(pack_dir: str | Path) -> PackManifest:
    """Read and validate ``pack_dir/manifest.json``; CheckpointError naming the file on any problem."""
    path = Path(pack_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{Path(pack_dir)} is not a model pack: it has no {MANIFEST_NAME} "
            "(create one with: ultramotion-igt models manifest DIR --name NAME)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"pack manifest {path} is not valid JSON: {exc}") from exc
    return parse_manifest(data, path)


# ----------------------------------------------------------------------------------------------------
# Hashing and describing files
# ----------------------------------------------------------------------------------------------------


def hash_file(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _excluded(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return (
        any(p.startswith(".") for p in parts)
        or "__pycache__" in parts
        or parts[-1] in EXCLUDED_NAMES
        or parts[-1].endswith((".tmp", ".part"))
    )


def pack_files_on_disk(pack_dir: str | Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``pack_dir`` a pack takes in (sorted):
    everything except ``manifest.json``, hidden files, ``training-state.pt`` and ``*.tmp``/``*.part``."""
    root = Path(pack_dir)
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST_NAME and not _excluded(rel):
                out.append(rel)
    return sorted(out)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} if none), read by safetensors from the header only
    (``framework="numpy"``: no tensor is loaded, no torch needed). `CheckpointError` when unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata()
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return dict(meta) if meta else {}


def describe_detector(pack_dir: str | Path, rel: str, name: str | None = None) -> ModelSpec:
    """A detector `ModelSpec` read from an HF D-FINE folder ``pack_dir/rel`` (config.json and
    preprocessor_config.json only: no torch). Files: every file of the folder (`pack_files_on_disk`)."""
    root = Path(pack_dir)
    folder = root / rel
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"detector folder {folder} has no config.json: not an HF D-FINE folder")
    config = _read_json(config_path)
    id2label = config.get("id2label") or {}
    classes = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    size: list[int] = []
    proc = folder / "preprocessor_config.json"
    if proc.is_file():
        data = _read_json(proc)
        s = data.get("size") or {}
        pad = data.get("pad_size") or {}
        if isinstance(s, dict) and "height" in s and "width" in s:
            size = [int(s["height"]), int(s["width"])]
        elif data.get("do_pad") and isinstance(pad, dict) and "height" in pad and "width" in pad:
            size = [int(pad["height"]), int(pad["width"])]  # letterbox: the padded input
    if not size:
        image_size = config.get("image_size")
        if isinstance(image_size, int):
            size = [image_size, image_size]
        elif isinstance(image_size, list) and len(image_size) == 2:
            size = [int(v) for v in image_size]
        else:
            size = [640, 640]  # transformers' RTDetrImageProcessor default
    prefix = rel.rstrip("/") + "/"
    files = [f for f in pack_files_on_disk(root) if f.startswith(prefix)]
    return ModelSpec(
        role="detector",
        name=name or PurePosixPath(rel).name,
        architecture="d-fine",
        model_type=str(config.get("model_type", "d_fine")),
        path=rel.rstrip("/"),
        classes=classes,
        input_size=size,
        files={f: {} for f in files},
    )


def describe_segmenter(
    pack_dir: str | Path, rel: str, sam_type: str = "auto", name: str | None = None
) -> ModelSpec:
    """A segmenter `ModelSpec` for the SAM checkpoint ``pack_dir/rel``.

    The type comes from the file (safetensors metadata or sidecar ``.json``), else from ``sam_type``
    (``vit_b``/``vit_l``/``vit_h``/...), else (``auto``) from the tensor shapes (this loads the file
    with torch). Files: the checkpoint and its sidecar JSON if any.
    """
    root = Path(pack_dir)
    path = root / rel
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint {path} does not exist")
    carried: dict[str, Any] | None = None
    with open(path, "rb") as fh:
        first = fh.read(9)
    is_safetensors = len(first) == 9 and first[8:9] == b"{"
    if is_safetensors:
        meta = _safetensors_metadata(path)
        if "sam_config" in meta:
            carried = {"model_type": meta.get("model_type"), "sam_config": json.loads(meta["sam_config"])}
    sidecar = path.with_suffix(".json")
    files = [rel]
    if carried is None and sidecar.is_file() and sidecar != path:
        record = _read_json(sidecar)
        if "sam_config" in record:
            carried = {"model_type": record.get("model_type"), "sam_config": record["sam_config"]}
            files.append(sidecar.relative_to(root).as_posix())
    if carried is not None:
        model_type = str(carried.get("model_type") or carried["sam_config"].get("name", "custom"))
        if sam_type not in ("auto", model_type):
            raise CheckpointError(f"SAM checkpoint {path} says it is type {model_type!r}, not {sam_type!r}")
        image_size = int(carried["sam_config"].get("image_size", 1024))
    else:
        from UltramotionIGTLib.core.sam import get_sam_config, resolve_sam_checkpoint

        if sam_type == "auto":
            _, config = resolve_sam_checkpoint(path, "auto")
        else:
            config = get_sam_config(sam_type)
        model_type, image_size = config.name, int(config.image_size)
    return ModelSpec(
        role="segmenter",
        name=name or path.stem,
        architecture="sam",
        model_type=model_type,
        path=rel,
        classes=[],
        input_size=[image_size, image_size],
        files={f: {} for f in files},
    )


# ----------------------------------------------------------------------------------------------------
# Writing and verifying manifests
# ----------------------------------------------------------------------------------------------------


def _spec_from(pack_dir: Path, item: ModelSpec | dict[str, Any]) -> ModelSpec:
    if isinstance(item, ModelSpec):
        spec = item
    else:
        role = item.get("role")
        if role not in ROLES or "path" not in item:
            raise CheckpointError(f"a model needs 'role' ({' or '.join(ROLES)}) and 'path', got {item!r}")
        rel = _check_relpath(item["path"], "model")
        if role == "detector":
            spec = describe_detector(pack_dir, rel, item.get("name"))
        else:
            spec = describe_segmenter(pack_dir, rel, item.get("model_type", "auto"), item.get("name"))
        for key in ("name", "architecture", "model_type", "classes", "input_size"):
            if key in item and not (key == "model_type" and role == "segmenter"):
                setattr(spec, key, item[key])
        spec.extra.update({k: v for k, v in item.items() if k not in ModelSpec.__dataclass_fields__})
    return spec


def discover_models(pack_dir: str | Path) -> list[dict[str, Any]]:
    """The default layout: ``detector/`` (with config.json) and the first checkpoint in ``sam/``."""
    root = Path(pack_dir)
    found: list[dict[str, Any]] = []
    if (root / "detector" / "config.json").is_file():
        found.append({"role": "detector", "path": "detector"})
    sam = find_sam_checkpoint(root / "sam")
    if sam is not None:
        found.append({"role": "segmenter", "path": sam.relative_to(root).as_posix()})
    return found


def write_manifest(
    pack_dir: str | Path,
    name: str,
    description: str = "",
    models: Sequence[ModelSpec | dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``pack_dir/manifest.json``, hashing every file of the pack; returns its path.

    ``models``: `ModelSpec`s or dicts with at least ``role`` and ``path`` (relative to ``pack_dir``);
    the other fields are read from the model files (`describe_detector`, `describe_segmenter`) unless
    given. Default: `discover_models` (``detector/`` + ``sam/*.safetensors|.pth``). Each model's
    ``files`` are the files it loads; every other file of the pack (`pack_files_on_disk`) goes into
    the top-level ``files``. ``extra``: more top-level keys (e.g. ``{"license": ...}``).
    """
    from UltramotionIGTLib import __version__

    root = Path(pack_dir)
    if not root.is_dir():
        raise CheckpointError(f"pack folder {root} does not exist")
    items = list(models) if models is not None else discover_models(root)
    if not items:
        raise CheckpointError(
            f"no models found in {root}: expected detector/config.json and/or sam/*.safetensors|.pth, "
            "or pass the models explicitly"
        )
    specs = [_spec_from(root, item) for item in items]
    if len({s.role for s in specs}) != len(specs):
        raise CheckpointError(f"two models with the same role in {root}: a pack holds one of each")
    claimed: set[str] = set()
    for spec in specs:
        for rel in list(spec.files):
            if not (root / rel).is_file():
                raise CheckpointError(f"model {spec.name}: file {root / rel} does not exist")
            spec.files[rel] = hash_file(root / rel)
            claimed.add(rel)
    pack_files = {rel: hash_file(root / rel) for rel in pack_files_on_disk(root) if rel not in claimed}
    meta = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ultramotion_igt": __version__}
    meta.update(extra or {})
    manifest = PackManifest(name=name, description=description, models=specs, files=pack_files, extra=meta)
    parse_manifest(manifest.to_dict(), root / MANIFEST_NAME)  # what we write must read back
    path = root / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Checking a pack by loading it
# ----------------------------------------------------------------------------------------------------

#: The files of a detector folder that inference reads (transformers' config, weights, weight index,
#: image processor) or that document the model (model cards, licence, our training record). A pack
#: takes only these: a training output folder also holds optimizer.pt, scheduler.pt, rng_state.pth,
#: trainer_state.json and a pickled training_args.bin, which no inference needs.
_DETECTOR_INFERENCE_FILE = re.compile(
    r"config\.json|preprocessor_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|training\.json|[^/]*\.md|LICEN[CS]E[^/]*"
)


def detector_inference_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """(taken, left out): the files of the detector folder ``folder`` that a pack takes (relative
    POSIX paths, top level only, hidden files ignored) and the other files and subfolders."""
    taken: list[str] = []
    left: list[str] = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue
        ok = p.is_file() and not p.is_symlink() and _DETECTOR_INFERENCE_FILE.fullmatch(p.name)
        (taken if ok else left).append(p.name + ("" if p.is_file() else "/"))
    return taken, left


@dataclass
class ModelSummary:
    """What loading a model showed: ``family`` ("D-FINE", "SAM"), ``size`` (D-FINE N/S/M/L/X or
    "custom"; SAM type such as vit_b), ``classes`` (detector; [] for SAM), ``input_channels`` (1 grey
    or 3), ``input_size`` (H, W model input, pixels), ``parameters`` (count), ``path`` (the file or
    folder loaded)."""

    role: str
    family: str
    size: str
    classes: list[str]
    input_channels: int
    input_size: tuple[int, int]
    parameters: int
    path: Path

    def format(self) -> str:
        classes = f", {len(self.classes)} classes ({_short_list(self.classes)})" if self.classes else ""
        return (
            f"{self.family}-{self.size}{classes}, {self.input_channels}-channel input "
            f"{self.input_size[0]}x{self.input_size[1]}, {self.parameters / 1e6:.2f} M parameters"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "family": self.family,
            "size": self.size,
            "classes": list(self.classes),
            "input_channels": self.input_channels,
            "input_size": list(self.input_size),
            "parameters": self.parameters,
            "path": str(self.path),
        }


def _short_list(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def summarize_detector(detector: Any, path: str | Path) -> ModelSummary:
    """A `ModelSummary` of a loaded `DFineDetector` (size named by `dfine_original.dfine_size_names`)."""
    from UltramotionIGTLib.models.dfine_original import dfine_size_names

    config = detector.model.config
    backbone = config.backbone_config
    _, size = dfine_size_names(
        getattr(backbone, "stem_channels", ()),
        getattr(backbone, "stage_out_channels", ()),
        len(config.encoder_in_channels),
        int(config.encoder_hidden_dim),
    )
    return ModelSummary(
        role="detector",
        family="D-FINE",
        size=size,
        classes=list(detector.class_names),
        input_channels=int(detector.num_channels),
        input_size=tuple(int(v) for v in detector.input_size),
        parameters=_parameters(detector.model),
        path=Path(path),
    )


def summarize_segmenter(segmenter: Any, path: str | Path) -> ModelSummary:
    """A `ModelSummary` of a loaded `SamSegmenter` (size: its SAM type, e.g. vit_b; family from the
    config's ``family`` where the registry has families, else SAM)."""
    import torch

    from UltramotionIGTLib.core.sam import config as sam_config

    config = segmenter.config
    family = getattr(config, "family", "sam")
    first_conv = next(m for m in segmenter.model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    return ModelSummary(
        role="segmenter",
        family=getattr(sam_config, "FAMILY_NAMES", {}).get(family, "SAM"),
        size=str(getattr(config, "name", "custom")),
        classes=[],
        input_channels=int(first_conv.in_channels),
        input_size=(int(segmenter.image_size), int(segmenter.image_size)),
        parameters=_parameters(segmenter.model),
        path=Path(path),
    )


def load_detector_summary(folder: str | Path) -> ModelSummary:
    """Load an HF D-FINE folder on the CPU as the pipeline does and summarise it; CheckpointError
    (naming the file) for anything that would not run."""
    from UltramotionIGTLib.core.detector import DFineDetector

    return summarize_detector(
        DFineDetector.from_pretrained(folder, device="cpu", channels_last=False), folder
    )


def load_segmenter_summary(path: str | Path, sam_type: str = "auto") -> ModelSummary:
    """Load a SAM checkpoint on the CPU as the pipeline does and summarise it; CheckpointError
    (naming the file) for anything that would not run."""
    from UltramotionIGTLib.core.sam import SamSegmenter

    return summarize_segmenter(SamSegmenter.from_checkpoint(path, model_type=sam_type, device="cpu"), path)


def check_models_load(root: str | Path, manifest: PackManifest) -> list[ModelSummary]:
    """Build each model of a pack from its files on the CPU, as the pipeline will, and compare it
    with the manifest: the detector's classes, the SAM type. Returns one `ModelSummary` per model.

    A file whose hashes match but that holds something the pipeline cannot run (an RT-DETR folder,
    a SAM-HQ or SAM 2 file, a checkpoint labelled with another SAM type) raises CheckpointError
    naming it. Loads the full weights (memory: the model's size, once, on the CPU).
    """
    root = Path(root)
    out: list[ModelSummary] = []
    for spec in manifest.models:
        path = root / spec.path
        if spec.role == "detector":
            summary = load_detector_summary(path)
            if spec.classes and summary.classes != list(spec.classes):
                raise CheckpointError(
                    f"pack {manifest.name!r}: detector {path} has classes {summary.classes}, "
                    f"the manifest says {spec.classes}"
                )
        else:
            summary = load_segmenter_summary(path, spec.model_type)
        out.append(summary)
    return out


def _renamed(exc: CheckpointError, paths: Sequence[tuple[Path, Path]]) -> CheckpointError:
    """``exc`` with each staging path replaced by the path the user gave (first match wins per spot)."""
    message = str(exc)
    for staged, shown in paths:
        message = message.replace(str(staged), str(shown))
    return CheckpointError(message)


@dataclass
class PackReport:
    """What `verify_pack` found: the pack folder, its manifest, how many files and bytes were
    checked, files present in the folder that the manifest does not list (``extra_files``), and what
    loading each model showed (``loaded``; empty when the models were not loaded)."""

    root: Path
    manifest: PackManifest
    checked_files: int
    checked_bytes: int
    extra_files: list[str]
    loaded: list[ModelSummary] = field(default_factory=list)

    def format(self) -> str:
        loaded = " and its models load" if self.loaded else ""
        lines = [
            f"pack {self.manifest.name!r} at {self.root}: OK, {self.checked_files} files "
            f"({self.checked_bytes / 1e6:.1f} MB) match their sha256{loaded}"
        ]
        summaries = {m.role: m for m in self.loaded}
        for spec in self.manifest.models:
            if spec.role in summaries:
                lines.append(f"  {spec.role:<9} {spec.name}: {summaries[spec.role].format()}: {spec.path}")
                continue
            classes = f", classes {', '.join(spec.classes)}" if spec.classes else ""
            lines.append(
                f"  {spec.role:<9} {spec.name} ({spec.architecture} {spec.model_type}, input "
                f"{spec.input_size[0]}x{spec.input_size[1]}{classes}): {spec.path}"
            )
        if self.extra_files:
            lines.append(
                f"  note: {len(self.extra_files)} file(s) not listed in the manifest (not verified, "
                f"not installed by import): {', '.join(self.extra_files)}"
            )
        return "\n".join(lines)


def _verify_dir(root: Path, load: bool = True) -> PackReport:
    manifest = read_manifest(root)
    listed = manifest.all_files()
    total = 0
    # cheap checks first (existence and size of every file), then the hashes
    for rel in sorted(listed):
        path = root / rel
        if not path.is_file():
            raise CheckpointError(
                f"pack {manifest.name!r}: file {path} is missing (listed in {MANIFEST_NAME})"
            )
        size = path.stat().st_size
        if size != listed[rel]["bytes"]:
            raise CheckpointError(
                f"pack {manifest.name!r}: file {path} has {size} bytes, the manifest says "
                f"{listed[rel]['bytes']}: it is truncated or was changed; copy the pack again"
            )
    for rel in sorted(listed):
        path = root / rel
        got = hash_file(path)["sha256"]
        if got != listed[rel]["sha256"]:
            raise CheckpointError(
                f"pack {manifest.name!r}: file {path} does not match its sha256 in {MANIFEST_NAME} "
                f"(corrupt or changed; copy the pack again)"
            )
        total += listed[rel]["bytes"]
    extra = [rel for rel in pack_files_on_disk(root) if rel not in listed]
    loaded = check_models_load(root, manifest) if load else []
    return PackReport(root, manifest, len(listed), total, extra, loaded)


@contextmanager
def naming_the_zip(unpacked: Path | None, zip_path: Path | None) -> Iterator[None]:
    """Errors raised inside name ``zip_path`` (``pack.zip:sam/sam.safetensors``) instead of the
    temporary folder it was unpacked into (``unpacked``), which is gone when the message is read.
    Without ``unpacked`` nothing changes."""
    try:
        yield
    except CheckpointError as exc:
        if unpacked is None or zip_path is None:
            raise
        text = str(exc)
        for root in {str(unpacked), str(Path(unpacked).resolve())}:
            text = text.replace(root + os.sep, f"{zip_path}:").replace(root, str(zip_path))
        if text == str(exc):
            raise
        raise CheckpointError(text) from None


def verify_pack(path: str | Path, load: bool = True) -> PackReport:
    """Check every file a pack lists (existence, size, sha256), then (``load``) build its models
    on the CPU from those files (`check_models_load`); returns a `PackReport`.

    ``path``: a pack folder or a ``.zip`` of one (verified in a temporary folder, then removed; errors
    name the file inside the zip as ``ZIP:member``, never the temporary folder). Raises CheckpointError
    naming the first file that is missing, whose size/sha256 differ or that does not load, and for a
    missing or invalid manifest. Files the manifest does not list are reported, not an error.
    """
    path = Path(path).expanduser()
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="ultramotion-verify-") as tmp:
            inner = extract_pack_zip(path, Path(tmp))
            with naming_the_zip(inner, path):
                report = _verify_dir(inner, load)
            report.root = path
            for summary in report.loaded:
                summary.path = path / summary.path.relative_to(inner)
            return report
    if not path.exists():
        raise CheckpointError(f"model pack {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a pack folder nor a .zip of one")
    return _verify_dir(path, load)


# ----------------------------------------------------------------------------------------------------
# Zips, import, make
# ----------------------------------------------------------------------------------------------------


def _zip_member_path(info: zipfile.ZipInfo, zip_path: Path) -> str | None:
    """The safe relative path of a zip member (None for a directory); CheckpointError if it escapes."""
    name = info.filename
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{zip_path}: entry {name!r} is a symbolic link; refusing to install the pack")
    if "\\" in name or "\x00" in name:
        raise CheckpointError(f"{zip_path}: entry {name!r} has an invalid name; refusing to install the pack")
    posix = PurePosixPath(name)
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in posix.parts:
        raise CheckpointError(
            f"{zip_path}: entry {name!r} would be written outside the pack folder (zip-slip); "
            "refusing to install the pack"
        )
    if info.is_dir():
        return None
    return posix.as_posix()


def extract_pack_zip(zip_path: Path, dest: Path) -> Path:
    """Extract a pack zip into the empty folder ``dest``; returns the folder holding manifest.json.

    Every entry is checked before anything is written (no absolute paths, no ``..``, no links);
    ``manifest.json`` may sit at the zip's root or in one top-level folder.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{zip_path} is not a readable zip file: {exc}") from exc
    with zf:
        members = [(info, _zip_member_path(info, zip_path)) for info in zf.infolist()]
        files = [(info, rel) for info, rel in members if rel is not None]
        needed = sum(info.file_size for info, _ in files)
        free = shutil.disk_usage(dest).free
        if needed > free:
            raise CheckpointError(
                f"{zip_path} unpacks to {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free in {dest}"
            )
        names = {rel for _, rel in files}
        if MANIFEST_NAME in names:
            base = ""
        else:
            tops = {rel.split("/", 1)[0] for rel in names}
            if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_NAME}" in names:
                base = next(iter(tops)) + "/"
            else:
                raise CheckpointError(
                    f"{zip_path} has no {MANIFEST_NAME} at its root or in a single top folder: "
                    "not a model pack"
                )
        for info, rel in files:
            target = dest.joinpath(*PurePosixPath(rel).parts)
            if dest.resolve() not in target.resolve().parents:  # belt and braces after the checks
                raise CheckpointError(f"{zip_path}: entry {rel!r} escapes the pack folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _HASH_CHUNK)
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise CheckpointError(
                    f"{zip_path}: entry {rel!r} cannot be read ({exc}): copy the zip again"
                ) from exc
    return dest / base if base else dest


def zip_pack(pack_dir: str | Path, zip_path: str | Path) -> Path:
    """Write the pack (manifest + the files it lists) into ``zip_path``, manifest.json at the root."""
    root = Path(pack_dir)
    manifest = read_manifest(root)
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # weights do not compress
        zf.write(root / MANIFEST_NAME, MANIFEST_NAME)
        for rel in sorted(manifest.all_files()):
            zf.write(root / rel, rel)
    os.replace(tmp, zip_path)
    return zip_path


def _safe_folder_name(name: str) -> str:
    folder = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not folder:
        raise CheckpointError(f"pack name {name!r} gives no usable folder name: rename the pack")
    return folder


def import_pack(src: str | Path, dest_root: str | Path | None = None, overwrite: bool = False) -> PackReport:
    """Install a pack (folder or .zip) into ``dest_root/<name>`` after verifying it; returns the
    report of the installed copy.

    ``dest_root`` defaults to `user_models_dir`. The pack is unpacked/copied into a temporary folder
    beside the destination, verified there (sha256 of every listed file), and only then renamed into
    place, so a failed or interrupted import leaves no half-installed pack. Only the manifest and the
    files it lists are installed. Zip entries that would land outside the pack (absolute paths,
    ``..``, links) make the whole import fail. The models are built from the files before anything is
    installed (`check_models_load`): a pack that would fail at first use is refused, naming the file
    as the user knows it (the zip or folder given, never the staging folder). An installed pack of
    the same name is replaced only with ``overwrite=True``. Raises CheckpointError saying what to do.
    """
    src = Path(src).expanduser()
    dest_root = Path(dest_root).expanduser() if dest_root is not None else user_models_dir()
    if not src.exists():
        raise CheckpointError(f"model pack {src} does not exist")
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".importing-", dir=dest_root))
    try:
        unpacked = staging / "unpacked"
        unpacked.mkdir()
        if src.is_file():
            if not zipfile.is_zipfile(src):
                raise CheckpointError(f"{src} is neither a pack folder nor a .zip of one")
            pack_dir = extract_pack_zip(src, unpacked)
        else:
            pack_dir = src
        with naming_the_zip(pack_dir if pack_dir != src else None, src):
            report = _verify_dir(pack_dir)
        manifest = report.manifest
        final = dest_root / _safe_folder_name(manifest.name)
        if pack_dir.resolve() == final.resolve():
            raise CheckpointError(f"{src} is already installed at {final}")
        if final.exists() and not overwrite:
            raise CheckpointError(
                f"a pack named {manifest.name!r} is already installed at {final}: "
                "pass --force (overwrite=True) to replace it"
            )
        ready = staging / "pack"
        ready.mkdir()
        for rel in [MANIFEST_NAME, *sorted(manifest.all_files())]:
            target = ready.joinpath(*PurePosixPath(rel).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pack_dir / rel, target)
        installed = _verify_dir(ready, load=False)  # the copy's hashes, before it becomes visible
        if final.exists():
            old = staging / "previous"
            os.replace(final, old)
            try:
                os.replace(ready, final)
            except OSError:
                os.replace(old, final)  # put the previous pack back
                raise
        else:
            os.replace(ready, final)
        installed.root = final
        installed.extra_files = report.extra_files
        installed.loaded = [
            dataclasses.replace(m, path=final / m.path.relative_to(pack_dir)) for m in report.loaded
        ]
        return installed
    except OSError as exc:
        raise CheckpointError(f"cannot install {src} into {dest_root}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_pack(
    dest: str | Path,
    detector_dir: str | Path | None = None,
    sam_checkpoint: str | Path | None = None,
    sam_type: str = "auto",
    name: str | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Build a pack from a user's checkpoints: copies ``detector_dir`` (an HF D-FINE folder) to
    ``dest/detector`` and ``sam_checkpoint`` (+ its sidecar ``.json``) to ``dest/sam/``, then writes
    the manifest. ``dest`` ending in ``.zip`` writes a zip (one file to carry). Returns ``dest``.

    Both models are first built on the CPU from the user's own files (`load_detector_summary`,
    `load_segmenter_summary`): what cannot run is refused with a CheckpointError naming that file.
    Only the detector folder's inference files are taken (`detector_inference_files`); what is left
    out (optimizer state, ``training_args.bin``, ...) is recorded as the detector's ``left_out``.
    """
    if detector_dir is None and sam_checkpoint is None:
        raise CheckpointError("make_pack needs a detector folder and/or a SAM checkpoint")
    dest = Path(dest).expanduser()
    as_zip = dest.suffix.lower() == ".zip"
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{dest} already exists: choose another --out or remove it")
    work = Path(tempfile.mkdtemp(prefix=".making-pack-", dir=dest.parent if dest.parent.exists() else None))
    try:
        folder = work / "pack"
        folder.mkdir()
        models: list[dict[str, Any]] = []
        staged: list[tuple[Path, Path]] = []
        if detector_dir is not None:
            det = Path(detector_dir).expanduser()
            if not (det / "config.json").is_file():
                raise CheckpointError(f"{det} is not an HF D-FINE folder (no config.json)")
            load_detector_summary(det)
            taken, left_out = detector_inference_files(det)
            (folder / "detector").mkdir()
            for file_name in taken:
                shutil.copy2(det / file_name, folder / "detector" / file_name)
            item: dict[str, Any] = {"role": "detector", "path": "detector"}
            if left_out:
                item["left_out"] = left_out
            models.append(item)
            staged.append((folder / "detector", det))
        if sam_checkpoint is not None:
            ckpt = find_sam_checkpoint(Path(sam_checkpoint).expanduser())
            if ckpt is None:
                raise CheckpointError(f"SAM checkpoint {sam_checkpoint} does not exist")
            load_segmenter_summary(ckpt, sam_type)
            staged.append((folder / "sam" / ckpt.name, ckpt))
            (folder / "sam").mkdir()
            shutil.copy2(ckpt, folder / "sam" / ckpt.name)
            sidecar = ckpt.with_suffix(".json")
            if sidecar.is_file() and sidecar != ckpt:
                shutil.copy2(sidecar, folder / "sam" / sidecar.name)
            models.append({"role": "segmenter", "path": f"sam/{ckpt.name}", "model_type": sam_type})
        pack_name = name or dest.stem
        try:
            write_manifest(folder, pack_name, description, models)
        except CheckpointError as exc:
            raise _renamed(exc, staged) from exc
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        if as_zip:
            zip_pack(folder, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(folder), str(dest))
        return dest
    except OSError as exc:
        raise CheckpointError(f"cannot make pack {dest}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Finding and loading packs
# ----------------------------------------------------------------------------------------------------


@dataclass
class InstalledPack:
    """A pack found on this machine: ``source`` is ``"shipped"`` (the demo pack) or ``"user"``."""

    name: str
    root: Path
    source: str
    manifest: PackManifest | None
    problem: str = ""


def default_pack() -> Path:
    """The shipped demo pack folder (`models_root`); CheckpointError if it has no manifest."""
    root = models_root()
    if not (root / MANIFEST_NAME).is_file():
        raise CheckpointError(
            f"the shipped demo model pack is missing: {root / MANIFEST_NAME} does not exist "
            "(reinstall the extension, or pass --pack / --detector and --sam)"
        )
    return root


def installed_packs(user_root: str | Path | None = None) -> list[InstalledPack]:
    """The shipped demo pack (if present) and every pack folder in ``user_root`` (default
    `user_models_dir`). Manifests are parsed, hashes are not checked (`verify_pack` does that);
    a pack whose manifest cannot be read is listed with its ``problem``."""
    found: list[InstalledPack] = []
    candidates = [(models_root(), "shipped")]
    root = Path(user_root).expanduser() if user_root is not None else user_models_dir()
    if root.is_dir():
        candidates += [
            (p, "user") for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
        ]
    for path, source in candidates:
        if not (path / MANIFEST_NAME).is_file():
            continue
        try:
            manifest = read_manifest(path)
            found.append(InstalledPack(manifest.name, path, source, manifest))
        except CheckpointError as exc:
            found.append(InstalledPack(path.name, path, source, None, str(exc)))
    return found


def resolve_pack(path_or_name: str | Path | None = None, user_root: str | Path | None = None) -> Path:
    """A pack folder: None -> `default_pack`; an existing folder; else the name of an installed pack."""
    if path_or_name is None:
        return default_pack()
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file: install the pack first (ultramotion-igt models import {path}), then use "
            "its name"
        )
    packs = installed_packs(user_root)
    for pack in packs:
        if str(path_or_name) in (pack.name, pack.root.name):
            return pack.root
    names = ", ".join(p.name for p in packs) or "none"
    raise CheckpointError(
        f"no model pack {str(path_or_name)!r}: not a folder and not installed (installed: {names})"
    )


def load_pack(
    path_or_name: str | Path | None = None,
    device: Any = "auto",
    user_root: str | Path | None = None,
) -> tuple[Any, Any, PackManifest]:
    """Verify a pack, then load its models: returns (`DFineDetector`, `SamSegmenter`, manifest).

    ``path_or_name``: a pack folder, the name of an installed pack, or None for the shipped demo
    pack. Raises CheckpointError naming the file for a pack that fails verification, lacks a
    detector or segmenter, or whose detector classes differ from the manifest's.
    """
    from UltramotionIGTLib.core.detector import DFineDetector
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.sam import SamSegmenter

    root = resolve_pack(path_or_name, user_root)
    manifest = verify_pack(root, load=False).manifest  # the models are loaded below, once
    det_spec, seg_spec = manifest.model("detector"), manifest.model("segmenter")
    for role, spec in (("detector", det_spec), ("segmenter", seg_spec)):
        if spec is None:
            raise CheckpointError(f"pack {manifest.name!r} at {root} has no {role}; the pipeline needs both")
    dev = resolve_device(device)
    detector = DFineDetector.from_pretrained(root / det_spec.path, device=dev)
    if det_spec.classes and list(detector.class_names) != list(det_spec.classes):
        raise CheckpointError(
            f"pack {manifest.name!r}: detector {root / det_spec.path} has classes {list(detector.class_names)}, "
            f"the manifest says {det_spec.classes}"
        )
    segmenter = SamSegmenter.from_checkpoint(root / seg_spec.path, model_type=seg_spec.model_type, device=dev)
    return detector, segmenter, manifest


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    packs = installed_packs(args.root)
    if not packs:
        print(f"no model packs found (shipped: {models_root()}, user: {args.root or user_models_dir()})")
        return 1
    for pack in packs:
        if pack.manifest is None:
            print(f"{pack.name}  [{pack.source}]  {pack.root}\n  UNREADABLE: {pack.problem}")
            continue
        size = sum(e["bytes"] for e in pack.manifest.all_files().values())
        print(f"{pack.name}  [{pack.source}]  {pack.root}  ({size / 1e6:.1f} MB)")
        if pack.manifest.description:
            print(f"  {pack.manifest.description}")
        for spec in pack.manifest.models:
            classes = f" classes={','.join(spec.classes)}" if spec.classes else ""
            print(
                f"  {spec.role:<9} {spec.architecture} {spec.model_type} "
                f"input={spec.input_size[0]}x{spec.input_size[1]}{classes}  {spec.path}"
            )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    target = args.pack
    if target is not None and not Path(target).expanduser().exists():
        target = resolve_pack(target, args.root)
    report = verify_pack(target if target is not None else default_pack())
    print(report.format())
    return 0


def run_import(args: argparse.Namespace) -> int:
    report = import_pack(args.pack, args.root, overwrite=args.force)
    print(f"installed: {report.format()}")
    return 0


def run_manifest(args: argparse.Namespace) -> int:
    models = None
    if args.detector or args.sam:
        models = []
        if args.detector:
            models.append({"role": "detector", "path": args.detector})
        if args.sam:
            models.append({"role": "segmenter", "path": args.sam, "model_type": args.sam_type})
    path = write_manifest(args.dir, args.name, args.description, models)
    print(f"wrote {path}")
    print(verify_pack(args.dir).format())
    return 0


def run_make(args: argparse.Namespace) -> int:
    out = make_pack(
        args.out,
        detector_dir=args.detector,
        sam_checkpoint=args.sam,
        sam_type=args.sam_type,
        name=args.name,
        description=args.description,
        overwrite=args.force,
    )
    print(f"wrote {out}")
    report = verify_pack(out)
    print(report.format())
    detector = report.manifest.model("detector")
    left_out = detector.extra.get("left_out") if detector is not None else None
    if left_out:
        print(f"  left out of the pack (not needed for inference): {', '.join(left_out)}")
    return 0


def _add_root(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--root",
        default=default,
        metavar="DIR",
        help=f"user pack folder (default: ${ENV_MODELS_DIR}, else ~/.ultramotion-igt/models)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """``ultramotion-igt models``: the group's own option, ``--root`` (also accepted after list, verify
    and import, the commands that use it)."""
    parser.description = (
        "Model packs: a folder or .zip holding manifest.json beside the model files (models, classes, "
        "input size, sha256 of every file). Install real checkpoints offline by copying one file. "
        "A pack that is missing, fails verification or cannot be installed is an error (exit 2)."
    )
    _add_root(parser, None)


def _configure_leaf(parser: argparse.ArgumentParser, description: str, root: bool = True) -> None:
    parser.description = description
    if root:  # SUPPRESS: an absent --root after the command must not reset one given before it
        _add_root(parser, argparse.SUPPRESS)


def configure_list(parser: argparse.ArgumentParser) -> None:
    _configure_leaf(
        parser, "List the shipped demo pack and the packs installed in the user folder (exit 1 if none)."
    )


def configure_verify(parser: argparse.ArgumentParser) -> None:
    _configure_leaf(
        parser, "Check that every file a pack lists exists with its size and sha256; print the pack."
    )
    parser.add_argument(
        "pack",
        nargs="?",
        default=None,
        metavar="PACK",
        help="pack folder, .zip or installed name (default: the shipped demo pack)",
    )


def configure_import(parser: argparse.ArgumentParser) -> None:
    _configure_leaf(
        parser,
        "Verify a pack (folder or .zip) and install it into the user pack folder as <root>/<pack name>; "
        "nothing is installed unless every file verifies.",
    )
    parser.add_argument("pack", metavar="PACK", help="pack folder or .zip")
    parser.add_argument("--force", action="store_true", help="replace an installed pack of the same name")


def configure_manifest(parser: argparse.ArgumentParser) -> None:
    _configure_leaf(
        parser,
        "Write DIR/manifest.json for the models already in DIR (hashes every file), then verify it.",
        root=False,
    )
    parser.add_argument("dir", metavar="DIR", help="pack folder holding the model files")
    parser.add_argument("--name", required=True, help="pack name (what --pack NAME finds once installed)")
    parser.add_argument("--description", default="", help="one line about the pack")
    parser.add_argument(
        "--detector",
        default=None,
        metavar="REL",
        help="detector folder relative to DIR (default: detector/ when it holds config.json)",
    )
    parser.add_argument(
        "--sam",
        default=None,
        metavar="REL",
        help="SAM checkpoint relative to DIR (default: the first checkpoint in sam/)",
    )
    parser.add_argument(
        "--sam-type",
        default="auto",
        metavar="TYPE",
        help=SAM_TYPE_HELP,
    )


def configure_make(parser: argparse.ArgumentParser) -> None:
    _configure_leaf(
        parser,
        "Build a pack (folder or .zip) from a D-FINE folder and/or a SAM checkpoint: copies the files, "
        "writes manifest.json, verifies the result.",
        root=False,
    )
    parser.add_argument(
        "--detector", default=None, metavar="DIR", help="D-FINE folder (config.json + model.safetensors)"
    )
    parser.add_argument(
        "--sam", default=None, metavar="CKPT", help="SAM checkpoint (official .pth or .safetensors)"
    )
    parser.add_argument(
        "--sam-type",
        default="auto",
        metavar="TYPE",
        help=SAM_TYPE_HELP,
    )
    parser.add_argument("--out", required=True, metavar="PACK", help="pack folder to create, or a .zip file")
    parser.add_argument("--name", default=None, help="pack name (default: the --out name)")
    parser.add_argument("--description", default="", help="one line about the pack")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
