"""Model packs: manifest, verification, zip import (zip-slip, atomic install), loading, CLI.

Real files only: small random-weight models in the real checkpoint formats (an HF D-FINE folder and
a SAM safetensors / .pth + sidecar), real zip files, the real loaders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.detector import DFineDetector, write_random_detector
from UltramotionIGTLib.core.sam import SamSegmenter, write_random_sam_checkpoint
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.models import packs as models
from UltramotionIGTLib.models.packs import (
    MANIFEST_NAME,
    import_pack,
    load_pack,
    make_pack,
    read_manifest,
    verify_pack,
    write_manifest,
    zip_pack,
)
from UltramotionIGTLib.tools import cli


@pytest.fixture(scope="module")
def source_models(tmp_path_factory) -> Path:
    """A detector folder and a SAM checkpoint in the real formats, with model cards beside them."""
    root = tmp_path_factory.mktemp("src_models")
    write_random_detector(root / "detector", image_size=128, seed=0, num_queries=20)
    write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", model_type="vit_t_demo", seed=0)
    (root / "detector" / "MODEL_CARD.md").write_text("# detector\nrandom weights\n", encoding="utf-8")
    (root / "sam" / "MODEL_CARD.md").write_text("# sam\nrandom weights\n", encoding="utf-8")
    (root / "sam" / "training.json").write_text('{"steps": 0}\n', encoding="utf-8")
    (root / "README.md").write_text("test pack\n", encoding="utf-8")
    return root


@pytest.fixture()
def pack(source_models, tmp_path) -> Path:
    """A fresh copy of the models with a manifest written by `write_manifest`."""
    folder = tmp_path / "pack"
    shutil.copytree(source_models, folder)
    write_manifest(folder, "test-pack", "random models for tests")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- manifest --------------------------------------------------------------------------------------


def test_manifest_round_trip_lists_every_file_once_with_its_hash(pack):
    data = json.loads((pack / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert data["format"] == "ultramotion-igt/model-pack" and data["version"] == 1
    manifest = read_manifest(pack)
    assert manifest.name == "test-pack" and manifest.description == "random models for tests"
    assert manifest.to_dict() == data  # parse -> serialise gives the file back

    det, seg = manifest.model("detector"), manifest.model("segmenter")
    assert (det.architecture, det.model_type, det.path) == ("d-fine", "d_fine", "detector")
    assert det.classes == list(CLASS_NAMES)
    assert det.input_size == [128, 128]
    assert (seg.architecture, seg.model_type, seg.path) == (
        "sam",
        "vit_t_demo",
        "sam/sam_vit_t_demo.safetensors",
    )
    assert seg.input_size == [256, 256] and seg.classes == []
    assert set(det.files) == {
        "detector/config.json",
        "detector/model.safetensors",
        "detector/preprocessor_config.json",
        "detector/MODEL_CARD.md",
    }
    assert set(seg.files) == {"sam/sam_vit_t_demo.safetensors"}
    assert set(manifest.files) == {"README.md", "sam/MODEL_CARD.md", "sam/training.json"}

    listed = manifest.all_files()
    on_disk = [f for f in all_files(pack) if f != MANIFEST_NAME]
    assert sorted(listed) == on_disk
    assert sum(len(m.files) for m in manifest.models) + len(manifest.files) == len(on_disk)
    for rel, entry in listed.items():
        assert entry == {"sha256": sha256(pack / rel), "bytes": (pack / rel).stat().st_size}


def test_write_manifest_skips_training_state_and_hidden_files(source_models, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(source_models, folder)
    (folder / "detector" / "training-state.pt").write_bytes(b"resumable state")
    (folder / ".DS_Store").write_bytes(b"x")
    write_manifest(folder, "p")
    listed = read_manifest(folder).all_files()
    assert "detector/training-state.pt" not in listed and ".DS_Store" not in listed
    report = verify_pack(folder)
    assert report.extra_files == []  # not pack content, and not reported as such either


def test_explicit_models_and_their_overrides(source_models, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(source_models, folder)
    write_manifest(
        folder,
        "p",
        models=[
            {"role": "segmenter", "path": "sam/sam_vit_t_demo.safetensors", "name": "my-sam"},
            {"role": "detector", "path": "detector", "model_type": "d_fine_tiny", "license": "MIT"},
        ],
    )
    manifest = read_manifest(folder)
    assert manifest.model("segmenter").name == "my-sam"
    assert manifest.model("detector").model_type == "d_fine_tiny"
    assert manifest.model("detector").extra == {"license": "MIT"}
    with pytest.raises(CheckpointError, match="type 'vit_t_demo', not 'vit_b'"):
        write_manifest(
            folder,
            "p",
            models=[{"role": "segmenter", "path": "sam/sam_vit_t_demo.safetensors", "model_type": "vit_b"}],
        )


@pytest.mark.parametrize(
    "bad_path",
    ["../outside.bin", "/etc/passwd", "detector/../../x", "C:/weights.bin"],
)
def test_manifest_paths_must_stay_inside_the_pack(pack, bad_path):
    data = json.loads((pack / MANIFEST_NAME).read_text(encoding="utf-8"))
    data["files"][bad_path] = {"sha256": "0" * 64, "bytes": 1}
    (pack / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="leaves the pack folder"):
        verify_pack(pack)


def test_invalid_manifests_are_named(pack, tmp_path):
    path = pack / MANIFEST_NAME
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        verify_pack(pack)
    assert str(path) in str(err.value)
    path.write_text(json.dumps({"format": "something-else", "version": 1}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a model pack manifest"):
        verify_pack(pack)
    path.write_text(json.dumps({"format": "ultramotion-igt/model-pack", "version": 99}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="version 99"):
        verify_pack(pack)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        verify_pack(empty)


# -- verification ----------------------------------------------------------------------------------


def test_verify_passes_on_an_intact_pack(pack):
    report = verify_pack(pack)
    assert report.checked_files == len(all_files(pack)) - 1
    assert report.checked_bytes == sum(
        (pack / f).stat().st_size for f in all_files(pack) if f != MANIFEST_NAME
    )
    assert report.extra_files == []
    assert "OK" in report.format()


def test_verify_names_a_file_with_one_modified_byte(pack):
    target = pack / "detector" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256") as err:
        verify_pack(pack)
    assert str(target) in str(err.value)


def test_verify_names_a_missing_file(pack):
    target = pack / "sam" / "sam_vit_t_demo.safetensors"
    target.unlink()
    with pytest.raises(CheckpointError, match="is missing") as err:
        verify_pack(pack)
    assert str(target) in str(err.value)


def test_verify_names_a_truncated_file(pack):
    target = pack / "sam" / "MODEL_CARD.md"
    target.write_bytes(target.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="bytes") as err:
        verify_pack(pack)
    assert str(target) in str(err.value)


def test_verify_reports_extra_files_without_failing(pack):
    (pack / "detector" / "notes.txt").write_text("not in the manifest", encoding="utf-8")
    (pack / "stray.bin").write_bytes(b"\x00" * 10)
    report = verify_pack(pack)
    assert report.extra_files == ["detector/notes.txt", "stray.bin"]
    assert "detector/notes.txt" in report.format() and "stray.bin" in report.format()


# -- zips and import -------------------------------------------------------------------------------


def test_zip_round_trip_and_import_installs_a_verified_copy(pack, tmp_path):
    (pack / "extra.txt").write_text("unverified", encoding="utf-8")
    archive = zip_pack(pack, tmp_path / "pack.zip")
    assert verify_pack(archive).manifest.name == "test-pack"
    dest_root = tmp_path / "installed"
    report = import_pack(archive, dest_root)
    installed = dest_root / "test-pack"
    assert report.root == installed
    assert verify_pack(installed).extra_files == []
    assert all_files(installed) == sorted([MANIFEST_NAME, *read_manifest(pack).all_files()])
    assert not (installed / "extra.txt").exists()
    assert sorted(p.name for p in dest_root.iterdir()) == ["test-pack"]  # no staging leftovers
    for rel in read_manifest(pack).all_files():
        assert sha256(installed / rel) == sha256(pack / rel)


def test_import_from_a_folder_and_a_zip_with_a_top_folder(pack, tmp_path):
    report = import_pack(pack, tmp_path / "a")
    assert report.root == tmp_path / "a" / "test-pack"
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in all_files(pack):
            zf.write(pack / rel, f"my-pack/{rel}")
    report = import_pack(archive, tmp_path / "b")
    assert verify_pack(report.root).manifest.name == "test-pack"


def _zip_with(pack: Path, path: Path, evil_name: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel in all_files(pack):
            zf.write(pack / rel, rel)
        info = zipfile.ZipInfo(evil_name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else "pwned")
    return path


@pytest.mark.parametrize(
    ("evil_name", "symlink"),
    [
        ("../evil.txt", False),
        ("detector/../../evil.txt", False),
        ("/tmp/evil_abs.txt", False),
        ("sam/link", True),
    ],
)
def test_zip_slip_entries_refuse_the_whole_import(pack, tmp_path, evil_name, symlink):
    work = tmp_path / "work"
    work.mkdir()
    archive = _zip_with(pack, work / "evil.zip", evil_name, symlink)
    dest_root = work / "installed"
    with pytest.raises(CheckpointError, match="refusing to install") as err:
        import_pack(archive, dest_root)
    assert evil_name in str(err.value)
    assert list(dest_root.iterdir()) == []  # nothing installed, no staging left behind
    assert not (work / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil_abs.txt").exists()
    with pytest.raises(CheckpointError, match="refusing"):
        verify_pack(archive)


def test_failed_verification_installs_nothing(pack, tmp_path):
    target = pack / "detector" / "config.json"
    target.write_text(target.read_text(encoding="utf-8").replace('"vessel"', '"vesseX"'), encoding="utf-8")
    archive = zip_pack(pack, tmp_path / "corrupt.zip")
    dest_root = tmp_path / "installed"
    with pytest.raises(CheckpointError, match="config.json"):
        import_pack(archive, dest_root)
    assert list(dest_root.iterdir()) == []


def test_existing_pack_is_replaced_only_with_overwrite(pack, tmp_path):
    dest_root = tmp_path / "installed"
    import_pack(pack, dest_root)
    write_manifest(pack, "test-pack", "second version")
    with pytest.raises(CheckpointError, match="already installed"):
        import_pack(pack, dest_root)
    assert read_manifest(dest_root / "test-pack").description == "random models for tests"
    import_pack(pack, dest_root, overwrite=True)
    assert read_manifest(dest_root / "test-pack").description == "second version"
    assert sorted(p.name for p in dest_root.iterdir()) == ["test-pack"]


def test_default_import_folder_follows_the_environment(pack, tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path / "env_models"))
    assert models.user_models_dir() == tmp_path / "env_models"
    report = import_pack(pack)
    assert report.root == tmp_path / "env_models" / "test-pack"
    names = [(p.name, p.source) for p in models.installed_packs()]
    assert ("test-pack", "user") in names


# -- loading and making packs ----------------------------------------------------------------------


def test_load_pack_verifies_then_loads_both_models(pack, tmp_path):
    detector, segmenter, manifest = load_pack(pack, device="cpu")
    assert isinstance(detector, DFineDetector) and isinstance(segmenter, SamSegmenter)
    assert list(detector.class_names) == manifest.model("detector").classes
    assert list(detector.input_size) == manifest.model("detector").input_size
    assert segmenter.image_size == manifest.model("segmenter").input_size[0]
    frame = np.random.default_rng(0).integers(0, 255, (96, 128), dtype=np.uint8)
    dets = detector.run_inference_torch(frame)
    out = segmenter.segment(frame, dets.boxes[:2], as_numpy=True)
    assert out.masks.shape == (2, 96, 128)

    import_pack(pack, tmp_path / "user")
    _, _, by_name = load_pack("test-pack", device="cpu", user_root=tmp_path / "user")
    assert by_name.name == "test-pack"

    weights = pack / "sam" / "sam_vit_t_demo.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sam_vit_t_demo.safetensors"):
        load_pack(pack, device="cpu")
    with pytest.raises(CheckpointError, match="no model pack 'nope'"):
        load_pack("nope", device="cpu", user_root=tmp_path / "user")


def test_load_pack_checks_detector_classes_against_the_manifest(pack):
    path = pack / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["models"][0]["classes"] = ["artery", "needle"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="classes"):
        load_pack(pack, device="cpu")


def test_make_pack_from_a_pth_with_sidecar_into_a_zip(source_models, tmp_path):
    pth = write_random_sam_checkpoint(tmp_path / "ckpt" / "my_sam.pth", model_type="vit_t_demo", seed=1)
    assert pth.with_suffix(".json").is_file()
    (source_models / "detector" / "training-state.pt").write_bytes(b"state")
    try:
        archive = make_pack(
            tmp_path / "clinic.zip",
            detector_dir=source_models / "detector",
            sam_checkpoint=pth,
            name="clinic",
        )
    finally:
        (source_models / "detector" / "training-state.pt").unlink()
    report = verify_pack(archive)
    seg = report.manifest.model("segmenter")
    assert seg.model_type == "vit_t_demo" and seg.path == "sam/my_sam.pth"
    assert set(seg.files) == {"sam/my_sam.pth", "sam/my_sam.json"}
    assert "detector/training-state.pt" not in report.manifest.all_files()
    installed = import_pack(archive, tmp_path / "user").root
    detector, segmenter, _ = load_pack(installed, device="cpu")
    assert segmenter.config.name == "vit_t_demo"
    with pytest.raises(CheckpointError, match="already exists"):
        make_pack(tmp_path / "clinic.zip", sam_checkpoint=pth)


# -- command line ----------------------------------------------------------------------------------


def test_cli_exit_codes_and_messages(pack, tmp_path, capsys):
    user = str(tmp_path / "user")
    assert cli.main(["models", "verify", str(pack)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["models", "--root", user, "import", str(pack)]) == 0
    assert cli.main(["models", "--root", user, "import", str(pack)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramotion-igt models import: error:") and "--force" in err
    assert cli.main(["models", "--root", user, "import", str(pack), "--force"]) == 0
    assert cli.main(["models", "--root", user, "list"]) == 0
    out = capsys.readouterr().out
    assert "test-pack" in out and "[user]" in out and "vit_t_demo" in out
    assert cli.main(["models", "--root", user, "verify", "test-pack"]) == 0

    (pack / "detector" / "preprocessor_config.json").write_text("{}", encoding="utf-8")
    assert cli.main(["models", "verify", str(pack)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramotion-igt models verify: error:") and "preprocessor_config.json" in err
    assert len(err.strip().splitlines()) == 1, err
    assert cli.main(["models", "verify", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err

    slip = _zip_with(pack, tmp_path / "slip.zip", "../evil.txt")
    assert cli.main(["models", "--root", user, "import", str(slip)]) == 2
    assert "zip-slip" in capsys.readouterr().err
    assert cli.main(["models", "frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_cli_manifest_and_make(source_models, tmp_path, capsys):
    folder = tmp_path / "p"
    shutil.copytree(source_models, folder)
    assert cli.main(["models", "manifest", str(folder), "--name", "cli-pack", "--description", "d"]) == 0
    assert read_manifest(folder).name == "cli-pack"
    out = tmp_path / "made"
    assert (
        cli.main(
            [
                "models",
                "make",
                "--detector",
                str(source_models / "detector"),
                "--sam",
                str(source_models / "sam" / "sam_vit_t_demo.safetensors"),
                "--sam-type",
                "vit_t_demo",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert verify_pack(out).manifest.name == "made"
    assert cli.main(["models", "manifest", str(tmp_path / "nothing-here"), "--name", "x"]) == 2


def test_shipped_demo_pack_verifies_when_present():
    root = models.models_root()
    if not (root / MANIFEST_NAME).is_file():
        pytest.skip(f"the demo pack is not shipped yet: {root / MANIFEST_NAME} does not exist")
    report = verify_pack(models.default_pack())
    assert {m.role for m in report.manifest.models} == {"detector", "segmenter"}
    defaults = models.default_models()
    assert defaults["detector"] == root / report.manifest.model("detector").path
    assert defaults["sam"] == root / report.manifest.model("segmenter").path
