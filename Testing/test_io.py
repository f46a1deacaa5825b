"""Recorded-ultrasound input and segmentation-sequence output (UltramotionIGTLib.io).

Real PLUS recordings (``plus_dir`` fixture), real files written in the real formats, pynrrd as an
independent NRRD reader, and slicer-core's own MRML storage nodes as the oracle for what 3D Slicer reads.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import stat
import zlib
from pathlib import Path

import nrrd
import numpy as np
import pytest

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io import (
    FORMAT_READERS,
    UltrasoundSequence,
    read_segmentation_sequence,
    read_sequence,
    reader_for,
    write_image,
    write_segmentation_sequence,
)

REPO = Path(__file__).resolve().parents[1]
HAS_SLICER = importlib.util.find_spec("slicer") is not None
needs_slicer = pytest.mark.skipif(not HAS_SLICER, reason="slicer-core (MRML) not installed")


# ------------------------------------------------------------------ helpers (independent of io.py)


def split_metaimage(path: Path) -> tuple[list[tuple[str, str]], bytes]:
    """(key, value) header lines and the bytes after 'ElementDataFile = LOCAL'."""
    raw = path.read_bytes()
    marker = raw.index(b"ElementDataFile")
    end = raw.index(b"\n", marker) + 1
    lines = [line.split("=", 1) for line in raw[:end].decode("latin-1").splitlines() if line.strip()]
    return [(k.strip(), v.strip()) for k, v in lines], raw[end:]


def join_metaimage(fields: list[tuple[str, str]], payload: bytes) -> bytes:
    return "".join(f"{k} = {v}\n" for k, v in fields).encode("latin-1") + payload


def header_value(fields: list[tuple[str, str]], key: str) -> str:
    return dict(fields)[key]


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_reference(n: int = 4, h: int = 6, w: int = 7) -> UltrasoundSequence:
    """A hand-built sequence: rotated axes, anisotropic spacing, offset origin, tracked probe."""
    rng = np.random.default_rng(3)
    probe = np.tile(np.eye(4), (n, 1, 1))
    probe[:, :3, 3] = rng.normal(size=(n, 3)) * 10
    return UltrasoundSequence(
        frames=rng.integers(0, 256, (n, h, w), dtype=np.uint8),
        spacing=(0.21, 0.37, 1.5),
        origin=(-12.5, 30.25, 101.0),
        direction=rotation(np.array([1.0, 2.0, 0.5]), 0.7),
        timestamps=100.0 + 0.05 * np.arange(n) + 0.001 * np.arange(n) ** 2,
        transforms={"ProbeToTracker": probe},
        transform_status={"ProbeToTracker": np.arange(n) % 2 == 0},
        image_orientation="MF",
        image_type="BRIGHTNESS",
    )


def ijk_to_ras_in_slicer(path: Path, sequence: bool) -> tuple[np.ndarray, object]:
    """Load ``path`` with Slicer's own storage node; (IJKToRAS 4x4, the loaded node)."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    if sequence:
        storage, node = slicer.vtkMRMLVolumeSequenceStorageNode(), slicer.vtkMRMLSequenceNode()
    else:
        storage, node = slicer.vtkMRMLVolumeArchetypeStorageNode(), slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(storage)
    scene.AddNode(node)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    volume = node.GetNthDataNode(0) if sequence else node
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]), node


# ------------------------------------------------------------------ the real PLUS recordings


def test_spine_phantom_mha(plus_dir: Path) -> None:
    path = plus_dir / "SpinePhantomFreehand.igs.mha"
    seq = read_sequence(path)
    fields, _ = split_metaimage(path)
    assert seq.frames.shape == (21, 616, 820) and seq.frames.dtype == np.uint8
    assert seq.n_frames == 21 and seq.frame_shape == (616, 820)
    assert seq.image_orientation == "MFA"
    assert seq.spacing == (1.0, 1.0, 1.0) and seq.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(seq.direction, np.eye(3))
    # LPS file -> RAS: x and y flip (what Slicer shows for this file, see test_slicer_reads_plus_geometry_like_us)
    np.testing.assert_array_equal(seq.ijk_to_ras(), np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert np.all(np.diff(seq.timestamps) > 0)
    assert seq.timestamps[0] == float(header_value(fields, "Seq_Frame0000_Timestamp"))
    assert seq.frame_status.all()
    assert sorted(seq.transforms) == ["ProbeToTracker", "ReferenceToTracker", "StylusToTracker"]
    for name, mats in seq.transforms.items():
        assert mats.shape == (21, 4, 4) and seq.transform_status[name].all()
        np.testing.assert_array_equal(mats[:, 3], np.tile([0.0, 0.0, 0.0, 1.0], (21, 1)))
        rot = mats[:, :3, :3]
        np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.tile(np.eye(3), (21, 1, 1)), atol=1e-4)
    last = [float(v) for v in header_value(fields, "Seq_Frame0020_ProbeToTrackerTransform").split()]
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"][20], np.reshape(last, (4, 4)))


def test_nwire_phantom_nrrd_matches_pynrrd(plus_dir: Path) -> None:
    path = plus_dir / "NwirePhantomFreehand.igs.nrrd"
    seq = read_sequence(path)
    data, header = nrrd.read(str(path), index_order="C")  # independent reader: 97 x 616 x 820
    assert seq.frames.shape == (97, 616, 820) and seq.frames.dtype == np.uint8
    np.testing.assert_array_equal(seq.frames, data)
    assert seq.image_orientation == "MFA" and seq.image_type == "BRIGHTNESS"
    assert seq.spacing == (1.0, 1.0, 1.0)
    assert np.all(np.diff(seq.timestamps) > 0) and seq.timestamps.shape == (97,)
    # the stylus was not tracked during this recording: every StylusToTracker status is INVALID
    assert header["Seq_Frame0000_StylusToTrackerTransformStatus"] == "INVALID"
    assert not seq.transform_status["StylusToTracker"].any()
    assert seq.transform_status["ProbeToTracker"].all() and seq.transform_status["ReferenceToTracker"].all()
    expected = np.reshape([float(v) for v in header["Seq_Frame0042_ProbeToTrackerTransform"].split()], (4, 4))
    np.testing.assert_array_equal(seq.transforms["ProbeToTracker"][42], expected)
    assert seq.frame_status.all()


def test_curvilinear_2d_image_is_one_frame(plus_dir: Path) -> None:
    path = plus_dir / "BkCurvilinearScanConvertedData.igs.mha"
    seq = read_sequence(path)
    fields, payload = split_metaimage(path)
    assert seq.frames.shape == (1, 400, 600) and seq.frames.dtype == np.uint8
    np.testing.assert_array_equal(seq.frames[0], np.frombuffer(payload, np.uint8).reshape(400, 600))
    assert seq.image_orientation == "MFA" and seq.image_type == "BRIGHTNESS"
    assert seq.spacing == (1.0, 1.0, 1.0)
    assert seq.timestamps[0] == float(header_value(fields, "Seq_Frame0000_Timestamp"))
    assert sorted(seq.transforms) == ["ReferenceToTracker", "StylusToTracker"]
    assert seq.transforms["ReferenceToTracker"].shape == (1, 4, 4)


def test_colour_nrrd_luminance_and_rgb(plus_dir: Path) -> None:
    path = plus_dir / "ColorNrrdSample.igs.nrrd"
    rgb_ref, _ = nrrd.read(str(path), index_order="C")  # 648 x 1152 x 3
    assert rgb_ref.shape == (648, 1152, 3)
    seq = read_sequence(path)
    assert seq.frames.shape == (1, 648, 1152) and seq.frames.dtype == np.uint8
    r, g, b = (rgb_ref[..., c].astype(np.float64) for c in range(3))
    manual = np.clip(np.rint(0.299 * r + 0.587 * g + 0.114 * b), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(seq.frames[0], manual)
    assert np.isnan(seq.timestamps).all() and seq.frame_status.all()
    rgb = read_sequence(path, color="rgb")
    assert rgb.frames.shape == (1, 648, 1152, 3)
    np.testing.assert_array_equal(rgb.frames[0], rgb_ref)


def test_rf_data_is_refused(plus_dir: Path) -> None:
    path = plus_dir / "UltrasonixLinearRfData.igs.mha"
    with pytest.raises(UnsupportedImageTypeError) as info:
        read_sequence(path)
    assert isinstance(info.value, ValueError)
    assert "RF_I_LINE_Q_LINE" in str(info.value) and str(path) in str(info.value)


def test_every_plus_file_is_handled(plus_dir: Path) -> None:
    files = sorted(p for p in plus_dir.iterdir() if p.name.endswith((".mha", ".nrrd")))
    assert len(files) >= 5
    for path in files:
        try:
            seq = read_sequence(path)
        except UnsupportedImageTypeError as exc:
            assert "RF" in str(exc)
            continue
        assert seq.frames.dtype == np.uint8 and seq.frames.ndim == 3 and seq.path == path


def test_sample_data_descriptor_matches_checksums(plus_dir: Path) -> None:
    info = json.loads((REPO / "Resources" / "SampleData" / "plus_recordings.json").read_text())
    sums = dict(
        line.split()[::-1] for line in (plus_dir / "SHA256SUMS").read_text().splitlines() if line.strip()
    )
    assert {f["name"] for f in info["files"]} == set(sums)
    for entry in info["files"]:
        path = plus_dir / entry["name"]
        assert entry["sha256"] == sums[entry["name"]] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size


# ------------------------------------------------------------------ compression and file variants


def test_compressed_mha_equals_uncompressed_copy_and_mhd(plus_dir: Path, tmp_path: Path) -> None:
    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    fields, payload = split_metaimage(src)
    raw = zlib.decompress(payload)
    plain = [(k, "False" if k == "CompressedData" else v) for k, v in fields if k != "CompressedDataSize"]
    (tmp_path / "plain.igs.mha").write_bytes(join_metaimage(plain, raw))
    detached = [(k, "spine.raw" if k == "ElementDataFile" else v) for k, v in plain]
    (tmp_path / "spine.mhd").write_bytes(join_metaimage(detached, b""))
    (tmp_path / "spine.raw").write_bytes(raw)

    compressed = read_sequence(src)
    for other in (read_sequence(tmp_path / "plain.igs.mha"), read_sequence(tmp_path / "spine.mhd")):
        np.testing.assert_array_equal(other.frames, compressed.frames)
        np.testing.assert_array_equal(other.timestamps, compressed.timestamps)
        for name in compressed.transforms:
            np.testing.assert_array_equal(other.transforms[name], compressed.transforms[name])
    np.testing.assert_array_equal(compressed.frames, np.frombuffer(raw, np.uint8).reshape(21, 616, 820))


def test_big_endian_and_float_metaimage(tmp_path: Path) -> None:
    values = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) / 10.0 - 1.0
    fields = [
        ("ObjectType", "Image"),
        ("NDims", "3"),
        ("BinaryData", "True"),
        ("BinaryDataByteOrderMSB", "True"),
        ("CompressedData", "False"),
        ("DimSize", "4 3 2"),
        ("ElementType", "MET_FLOAT"),
        ("Kinds", "domain domain list"),
        ("ElementDataFile", "LOCAL"),
    ]
    path = tmp_path / "float_be.mha"
    path.write_bytes(join_metaimage(fields, values.astype(">f4").tobytes()))
    kept = read_sequence(path, intensity="keep")
    assert kept.frames.dtype == np.float32
    np.testing.assert_allclose(kept.frames, values, rtol=1e-6)
    as_u8 = read_sequence(path)  # default: the one mapping, window = the first frame's [min, max]
    lo, hi = np.float32(values[0].min()), np.float32(values[0].max())
    scale = np.float32(255.0 / (float(hi) - float(lo)))
    expected = np.clip(np.rint((values.astype(np.float32) - lo) * scale), 0, 255).astype(np.uint8)
    assert as_u8.frames.dtype == np.uint8 and as_u8.frames[0].min() == 0 and as_u8.frames[0].max() == 255
    np.testing.assert_array_equal(as_u8.frames, expected)
    assert as_u8.frames[1].min() == 255  # the second frame lies above the window: no per-frame rescaling
    assert as_u8.metadata["intensity"]["rule"] == "first frame range"


# ------------------------------------------------------------------ broken files


def _expect_input_error(path: Path, *words: str) -> str:
    with pytest.raises(InputFileError) as info:
        read_sequence(path)
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word in message.lower(), message
    return message


def test_broken_metaimage_files(plus_dir: Path, tmp_path: Path) -> None:
    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    blob = src.read_bytes()
    fields, payload = split_metaimage(src)
    header_len = len(blob) - len(payload)

    (tmp_path / "half.igs.mha").write_bytes(blob[: len(blob) // 2])
    _expect_input_error(tmp_path / "half.igs.mha", "truncated")

    (tmp_path / "header_only.igs.mha").write_bytes(blob[:header_len])
    _expect_input_error(tmp_path / "header_only.igs.mha", "truncated")

    damaged = bytearray(blob)
    damaged[header_len + 1000 : header_len + 1400] = bytes(400)
    (tmp_path / "damaged.igs.mha").write_bytes(bytes(damaged))
    _expect_input_error(tmp_path / "damaged.igs.mha", "corrupt")

    for frames in ("22", "20"):  # header lying about the size, in both directions
        lying = [(k, f"820 616 {frames}" if k == "DimSize" else v) for k, v in fields]
        (tmp_path / f"lying{frames}.igs.mha").write_bytes(join_metaimage(lying, payload))
        _expect_input_error(tmp_path / f"lying{frames}.igs.mha")

    raw = zlib.decompress(payload)
    plain = [(k, "False" if k == "CompressedData" else v) for k, v in fields if k != "CompressedDataSize"]
    (tmp_path / "cut_raw.mha").write_bytes(join_metaimage(plain, raw[:-1]))
    _expect_input_error(tmp_path / "cut_raw.mha", "truncated")

    (tmp_path / "cut_header.mha").write_bytes(blob[:500])  # cut inside the header
    _expect_input_error(tmp_path / "cut_header.mha")

    (tmp_path / "notes.mha").write_text("these are my notes\nnothing to see\n")
    _expect_input_error(tmp_path / "notes.mha", "metaimage")

    (tmp_path / "empty.igs.mha").write_bytes(b"")
    _expect_input_error(tmp_path / "empty.igs.mha", "empty")

    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "junk.mha").write_bytes(junk)
    _expect_input_error(tmp_path / "junk.mha")

    (tmp_path / "lost.mhd").write_bytes(
        join_metaimage([(k, "lost.raw" if k == "ElementDataFile" else v) for k, v in plain], b"")
    )
    _expect_input_error(tmp_path / "lost.mhd", "does not exist")


def test_broken_nrrd_files(plus_dir: Path, tmp_path: Path) -> None:
    src = plus_dir / "NwirePhantomFreehand.igs.nrrd"
    blob = src.read_bytes()
    header_len = blob.index(b"\n\n") + 2

    (tmp_path / "half.igs.nrrd").write_bytes(blob[: len(blob) // 2])
    _expect_input_error(tmp_path / "half.igs.nrrd")

    damaged = bytearray(blob)
    damaged[header_len + 5000 : header_len + 5200] = bytes(
        b ^ 0xFF for b in damaged[header_len + 5000 : header_len + 5200]
    )
    (tmp_path / "damaged.igs.nrrd").write_bytes(bytes(damaged))
    _expect_input_error(tmp_path / "damaged.igs.nrrd", "corrupt")

    lying = blob[:header_len].replace(b"sizes: 820 616", b"sizes: 820 617") + blob[header_len:]
    (tmp_path / "lying.igs.nrrd").write_bytes(lying)
    _expect_input_error(tmp_path / "lying.igs.nrrd")

    (tmp_path / "notes.nrrd").write_text("not an image\n")
    _expect_input_error(tmp_path / "notes.nrrd", "nrrd")

    (tmp_path / "empty.seq.nrrd").write_bytes(b"")
    _expect_input_error(tmp_path / "empty.seq.nrrd", "empty")


def test_missing_directory_and_unknown_ending(tmp_path: Path) -> None:
    _expect_input_error(tmp_path / "nowhere.igs.mha", "does not exist")
    folder = tmp_path / "folder.nrrd"
    folder.mkdir()
    _expect_input_error(folder, "directory")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n")
    message = _expect_input_error(tmp_path / "picture.png", "unknown file type")
    assert ".igs.mha" in message and ".nrrd" in message
    with pytest.raises(InputFileError):
        reader_for("recording.txt")
    assert reader_for("x.IGS.MHA") is FORMAT_READERS[".igs.mha"]


# ------------------------------------------------------------------ arrays and tensors


def test_numpy_and_torch_inputs() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    one = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    seq = read_sequence(one)
    assert seq.frames.shape == (1, 5, 7) and seq.path is None
    np.testing.assert_array_equal(seq.frames[0], one)
    np.testing.assert_array_equal(seq.ijk_to_ras(), np.diag([-1.0, -1.0, 1.0, 1.0]))

    stack = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(read_sequence(stack).frames, stack)
    np.testing.assert_array_equal(read_sequence(torch.from_numpy(stack)).frames, stack)

    rgb = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    weights = np.array([0.299, 0.587, 0.114])
    manual = np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_sequence(rgb).frames, manual)
    np.testing.assert_array_equal(read_sequence(torch.from_numpy(rgb[0])).frames[0], manual[0])
    np.testing.assert_array_equal(read_sequence(rgb, color="rgb").frames, rgb)

    unit = torch.rand(2, 5, 7, dtype=torch.float32)
    expected = np.rint(unit.numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_sequence(unit).frames, expected)
    assert read_sequence(unit, intensity="keep").frames.dtype == np.float32

    wide = (stack.astype(np.uint16) * 200).astype(np.uint16)  # up to 51000: a 16-bit stream
    out = read_sequence(wide)
    expected = np.rint(wide.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
    np.testing.assert_array_equal(out.frames, expected)
    assert out.metadata["intensity"] == {"rule": "bit depth", "window": [0.0, 65535.0], "dtype": "uint16"}

    with pytest.raises(UnsupportedImageTypeError):
        read_sequence(np.zeros((2, 3, 4, 5, 6), np.uint8))
    with pytest.raises(TypeError):
        read_sequence(42)


def test_npy_file(tmp_path: Path) -> None:
    stack = np.random.default_rng(2).integers(0, 256, (2, 4, 6), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", stack)
    np.testing.assert_array_equal(read_sequence(tmp_path / "frames.npy").frames, stack)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    _expect_input_error(tmp_path / "broken.npy")


def test_subset() -> None:
    ref = oblique_reference(n=5)
    sub = ref.subset([4, 1])
    np.testing.assert_array_equal(sub.frames, ref.frames[[4, 1]])
    np.testing.assert_array_equal(sub.timestamps, ref.timestamps[[4, 1]])
    np.testing.assert_array_equal(sub.transforms["ProbeToTracker"], ref.transforms["ProbeToTracker"][[4, 1]])
    np.testing.assert_array_equal(sub.transform_status["ProbeToTracker"], [True, False])
    np.testing.assert_array_equal(sub.ijk_to_ras(), ref.ijk_to_ras())
    assert ref.subset(range(2)).n_frames == 2 and ref.subset(slice(1, None, 2)).n_frames == 2
    with pytest.raises(IndexError):
        ref.subset([5])


# ------------------------------------------------------------------ geometry


def test_ijk_to_ras_definition() -> None:
    ref = oblique_reference()
    ijk = np.array([3.0, 2.0, 1.0])
    lps = np.asarray(ref.origin) + ref.direction @ (np.asarray(ref.spacing) * ijk)
    np.testing.assert_allclose(ref.ijk_to_lps() @ np.append(ijk, 1.0), np.append(lps, 1.0))
    np.testing.assert_allclose(ref.ijk_to_ras() @ np.append(ijk, 1.0), [-lps[0], -lps[1], lps[2], 1.0])


def test_ras_space_nrrd_is_converted_to_lps(tmp_path: Path) -> None:
    ijk_to_ras = np.array([[0.0, -0.5, 0.0, 10.0], [0.3, 0.0, 0.0, -7.0], [0.0, 0.0, 2.0, 4.0], [0, 0, 0, 1]])
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)  # N x H x W
    cols = [f"({','.join(repr(float(v)) for v in ijk_to_ras[:3, a])})" for a in range(3)]
    header = (
        "NRRD0004\ntype: uint8\ndimension: 4\nspace: right-anterior-superior\nsizes: 4 3 1 2\n"
        f"space directions: {' '.join(cols)} none\nkinds: domain domain domain list\nencoding: gzip\n"
        f"space origin: ({','.join(repr(float(v)) for v in ijk_to_ras[:3, 3])})\n\n"
    )
    path = tmp_path / "ras.seq.nrrd"
    path.write_bytes(header.encode() + gzip.compress(data.tobytes()))
    seq = read_sequence(path)
    np.testing.assert_array_equal(seq.frames, data)
    np.testing.assert_allclose(seq.ijk_to_ras(), ijk_to_ras, atol=1e-12)
    assert seq.spacing == pytest.approx((0.3, 0.5, 2.0))


@pytest.mark.parametrize("ending", [".igs.mha", ".seq.nrrd"])
@pytest.mark.parametrize("compress", [True, False])
def test_write_image_round_trip(tmp_path: Path, ending: str, compress: bool) -> None:
    ref = oblique_reference()
    path = write_image(tmp_path / f"frames{ending}", ref.frames, ref, compress=compress)
    back = read_sequence(path)
    np.testing.assert_array_equal(back.frames, ref.frames)
    np.testing.assert_allclose(back.ijk_to_ras(), ref.ijk_to_ras(), atol=1e-12)
    np.testing.assert_array_equal(back.timestamps, ref.timestamps)
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"], ref.transforms["ProbeToTracker"])
    np.testing.assert_array_equal(
        back.transform_status["ProbeToTracker"], ref.transform_status["ProbeToTracker"]
    )
    assert back.image_orientation == "MF" and back.image_type == "BRIGHTNESS"


# ------------------------------------------------------------------ segmentation sequence


def test_segmentation_sequence_round_trip_and_header(tmp_path: Path) -> None:
    ref = oblique_reference()
    labels = np.random.default_rng(4).integers(0, 3, (ref.n_frames, *ref.frame_shape), dtype=np.uint8)
    segments = [(1, "vessel-0", (0.9, 0.25, 0.25)), (2, "needle-1", (242, 217, 38))]
    path = write_segmentation_sequence(tmp_path / "segmentation.seq.nrrd", labels, ref, segments=segments)

    back = read_segmentation_sequence(path)
    np.testing.assert_array_equal(back.labelmaps, labels)
    assert back.labelmaps.dtype == np.uint8
    np.testing.assert_allclose(back.ijk_to_ras(), ref.ijk_to_ras(), atol=1e-12)
    np.testing.assert_array_equal(back.timestamps, ref.timestamps)
    assert (back.index_name, back.index_unit) == ("time", "s")
    assert [(s.value, s.name) for s in back.segments] == [(1, "vessel-0"), (2, "needle-1")]
    np.testing.assert_allclose(back.segments[1].color, np.array([242, 217, 38]) / 255)

    data, header = nrrd.read(str(path), index_order="F")  # independent reader
    h, w = ref.frame_shape
    assert data.shape == (w, h, 1, ref.n_frames)
    np.testing.assert_array_equal(data[:, :, 0, :].transpose(2, 1, 0), labels)
    assert header["kinds"] == ["domain", "domain", "domain", "list"]
    # pynrrd's writer spells the type "uint8", the NRRD synonym of Slicer's "unsigned char"
    assert header["space"] == "left-posterior-superior" and header["type"] == "uint8"
    assert data.dtype == np.uint8
    np.testing.assert_allclose(header["space directions"][:3], ref.ijk_to_lps()[:3, :3].T, atol=1e-12)
    assert np.isnan(header["space directions"][3]).all()
    np.testing.assert_allclose(header["space origin"], ref.origin)
    assert header["DataNodeClassName"] == "vtkMRMLLabelMapVolumeNode"
    assert header["axis 3 index type"] == "numeric"
    assert [float(v) for v in header["axis 3 index values"].split()] == list(ref.timestamps)
    assert header["Segment0_Name"] == "vessel-0" and header["Segment1_LabelValue"] == "2"
    assert header["Segment0_Layer"] == "0" and header["Segment0_Color"].split() == ["0.9", "0.25", "0.25"]

    # the frame sequence reader reads it too (a Slicer volume sequence is also an input)
    as_frames = read_sequence(path, intensity="keep")
    np.testing.assert_array_equal(as_frames.frames, labels)
    np.testing.assert_array_equal(as_frames.timestamps, ref.timestamps)


def test_segmentation_defaults_and_validation(plus_dir: Path, tmp_path: Path) -> None:
    colour = read_sequence(plus_dir / "ColorNrrdSample.igs.nrrd")  # no timestamps -> frame numbers
    labels = np.zeros((1, *colour.frame_shape), np.uint8)
    labels[0, 10:20, 30:50] = 2
    back = read_segmentation_sequence(write_segmentation_sequence(tmp_path / "c.seq.nrrd", labels, colour))
    assert back.index_values == ["0"] and back.index_name == "frame"
    assert [(s.value, s.name) for s in back.segments] == [(1, "vessel"), (2, "needle"), (3, "bone")]
    np.testing.assert_array_equal(back.labelmaps, labels)

    ref = oblique_reference()
    good = np.zeros((ref.n_frames, *ref.frame_shape), np.uint8)
    with pytest.raises(ValueError, match="reference frames"):
        write_segmentation_sequence(tmp_path / "x.seq.nrrd", good[:, :-1], ref)
    with pytest.raises(ValueError, match="label values must be 0"):
        write_segmentation_sequence(tmp_path / "x.seq.nrrd", good.astype(np.int32) - 1, ref)
    with pytest.raises(ValueError, match="unique"):
        write_segmentation_sequence(tmp_path / "x.seq.nrrd", good, ref, segments=[(1, "a", (1, 0, 0))] * 2)
    with pytest.raises(ValueError, match="timestamps"):
        write_segmentation_sequence(tmp_path / "x.seq.nrrd", good, ref, timestamps=[0.0, 1.0])
    with pytest.raises(ValueError, match="ASCII"):  # NRRD header lines are ASCII
        write_segmentation_sequence(
            tmp_path / "x.seq.nrrd", good, ref, segments=[(1, "vaisseaué", (1, 0, 0))]
        )
    assert not (tmp_path / "x.seq.nrrd").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "c.seq.nrrd"]  # no partial file left behind


def test_written_files_get_the_usual_mode_and_are_replaced_whole(tmp_path: Path) -> None:
    ref = oblique_reference()
    rng = np.random.default_rng(7)
    first, second = (rng.integers(0, 3, (ref.n_frames, *ref.frame_shape), dtype=np.uint8) for _ in range(2))
    previous = os.umask(0o027)  # restored below; the mode is 0644 less the umask
    try:
        written = [
            write_segmentation_sequence(tmp_path / "segmentation.seq.nrrd", first, ref),
            write_image(tmp_path / "frames.igs.mha", ref.frames, ref),
            write_image(tmp_path / "frames.seq.nrrd", ref.frames, ref),
        ]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    write_segmentation_sequence(tmp_path / "segmentation.seq.nrrd", second, ref)
    assert stat.S_IMODE((tmp_path / "segmentation.seq.nrrd").stat().st_mode) == 0o644 & ~previous
    np.testing.assert_array_equal(
        read_segmentation_sequence(tmp_path / "segmentation.seq.nrrd").labelmaps, second
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "frames.igs.mha",
        "frames.seq.nrrd",
        "segmentation.seq.nrrd",
    ]


def test_nrrd_reading_does_not_depend_on_pynrrd_space_directions_setting(tmp_path: Path) -> None:
    ref = oblique_reference()
    path = write_image(tmp_path / "frames.seq.nrrd", ref.frames, ref)
    before = nrrd.SPACE_DIRECTIONS_TYPE
    nrrd.SPACE_DIRECTIONS_TYPE = "double vector list"  # pynrrd's process-wide switch: None for "none"
    try:
        back = read_sequence(path)
    finally:
        nrrd.SPACE_DIRECTIONS_TYPE = before
    np.testing.assert_allclose(back.ijk_to_ras(), ref.ijk_to_ras(), atol=1e-12)
    np.testing.assert_array_equal(back.frames, ref.frames)


# ------------------------------------------------------------------ what 3D Slicer reads (slicer-core)


@needs_slicer
def test_slicer_reads_segmentation_sequence(tmp_path: Path) -> None:
    from vtk.util import numpy_support

    ref = oblique_reference()
    labels = np.random.default_rng(5).integers(0, 3, (ref.n_frames, *ref.frame_shape), dtype=np.uint8)
    path = write_segmentation_sequence(tmp_path / "segmentation.seq.nrrd", labels, ref)
    matrix, sequence = ijk_to_ras_in_slicer(path, sequence=True)
    np.testing.assert_allclose(matrix, ref.ijk_to_ras(), atol=1e-9)
    assert sequence.GetNumberOfDataNodes() == ref.n_frames
    assert (sequence.GetIndexName(), sequence.GetIndexUnit()) == ("time", "s")
    assert sequence.GetAttribute("Segment1_Name") == "needle"
    for n in range(ref.n_frames):
        volume = sequence.GetNthDataNode(n)
        assert volume.GetClassName() == "vtkMRMLLabelMapVolumeNode"
        assert float(sequence.GetNthIndexValue(n)) == ref.timestamps[n]
        image = volume.GetImageData()
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            image.GetDimensions()[::-1]
        )
        np.testing.assert_array_equal(voxels[0], labels[n])


@needs_slicer
def test_slicer_reads_plus_geometry_like_us(plus_dir: Path, tmp_path: Path) -> None:
    for name in ("SpinePhantomFreehand.igs.mha", "BkCurvilinearScanConvertedData.igs.mha"):
        matrix, _ = ijk_to_ras_in_slicer(plus_dir / name, sequence=False)
        np.testing.assert_allclose(matrix, read_sequence(plus_dir / name).ijk_to_ras())
    ref = oblique_reference()
    path = write_image(tmp_path / "oblique.igs.mha", ref.frames, ref)
    matrix, _ = ijk_to_ras_in_slicer(path, sequence=False)
    np.testing.assert_allclose(matrix, ref.ijk_to_ras(), atol=1e-9)
    path = write_image(tmp_path / "oblique.seq.nrrd", ref.frames, ref)
    matrix, _ = ijk_to_ras_in_slicer(path, sequence=True)
    np.testing.assert_allclose(matrix, ref.ijk_to_ras(), atol=1e-9)


@pytest.mark.parametrize("ending", [".igs.mha", ".seq.nrrd"])
def test_write_image_colour_round_trip(tmp_path: Path, ending: str) -> None:
    rgb = np.random.default_rng(6).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    path = write_image(tmp_path / f"colour{ending}", rgb)
    np.testing.assert_array_equal(read_sequence(path, color="rgb").frames, rgb)
    weights = np.array([0.299, 0.587, 0.114])
    manual = np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_sequence(path).frames, manual)
