"""Issue 13, kind 2: every bad input gets one line and exit 2, before models load; no wrong acceptance.

One table: each row builds its input (files, folders, models) in ``tmp_path``, runs the real command
line in-process (`cli.main`), and checks the exit code, the ONE line on stderr (no traceback) and,
for ``run``, that nothing was left behind. Rows marked ``before_models`` pass a SAM checkpoint that is
garbage: if the row's own error is reported, not the checkpoint's, the check ran before any model
was loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from UltramotionIGTLib.io import read_sequence, write_image
from UltramotionIGTLib.tools import cli

HAS_SLICER = __import__("importlib").util.find_spec("slicer") is not None


def _mha(path: Path, fields: list[tuple[str, str]], payload: bytes) -> Path:
    path.write_bytes("".join(f"{k} = {v}\n" for k, v in fields).encode("latin-1") + payload)
    return path


def _fields(w: int, h: int, n: int, **over: str) -> list[tuple[str, str]]:
    fields = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        "DimSize": f"{w} {h} {n}",
        "ElementType": "MET_UCHAR",
        "Kinds": "domain domain list",
    }
    fields.update(over)
    return [*fields.items(), ("ElementDataFile", over.get("ElementDataFile", "LOCAL"))]


def _frames(n: int = 2, h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


@dataclass
class Ctx:
    tmp: Path
    models: tuple[Path, Path]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recording(self) -> Path:
        return write_image(self.tmp / "rec.igs.mha", _frames())

    def garbage_sam(self) -> Path:
        path = self.tmp / "garbage.safetensors"
        path.write_bytes(b"\x00" * 64)
        return path

    def run(self, inp: Path, *extra: str, out: Path | None = None, sam: Path | None = None) -> list[str]:
        return [
            "run", "--input", str(inp), "--out", str(out or self.out), "--detector", str(self.models[0]),
            "--sam", str(sam or self.garbage_sam()), "--device", "cpu", "--quiet", *extra,
        ]  # fmt: skip


# -- the rows: each returns argv; the row says what must come out ----------------------------------


def channels_abc(c: Ctx) -> list[str]:
    f = _frames(1)
    return c.run(_mha(c.tmp / "c.mha", _fields(40, 32, 1, ElementNumberOfChannels="abc"), f.tobytes()))


def header_size_abc(c: Ctx) -> list[str]:
    (c.tmp / "d.raw").write_bytes(_frames(1).tobytes())
    return c.run(_mha(c.tmp / "d.mhd", _fields(40, 32, 1, HeaderSize="abc", ElementDataFile="d.raw"), b""))


def zlib_dimsize_too_large(c: Ctx) -> list[str]:
    payload = zlib.compress(_frames(1).tobytes())
    fields = _fields(100000, 100000, 50, CompressedData="True", CompressedDataSize=str(len(payload)))
    return c.run(_mha(c.tmp / "z.mha", fields, payload))


def frames_1x2100(c: Ctx) -> list[str]:
    np.save(c.tmp / "thin.npy", np.zeros((3, 1, 2100), np.uint8))
    return c.run(c.tmp / "thin.npy")


def bool_frames(c: Ctx) -> list[str]:
    np.save(c.tmp / "mask.npy", np.zeros((2, 64, 64), bool))
    return c.run(c.tmp / "mask.npy")


def frames_4000x2(c: Ctx) -> list[str]:
    np.save(c.tmp / "tall.npy", np.zeros((3, 4000, 2), np.uint8))
    return c.run(c.tmp / "tall.npy")


def out_is_a_file(c: Ctx) -> list[str]:
    (c.tmp / "file").write_text("not a folder")
    return c.run(c.recording(), out=c.tmp / "file")


def out_under_dev_null(c: Ctx) -> list[str]:
    return c.run(c.recording(), out=Path("/dev/null/results"))


def out_read_only(c: Ctx) -> list[str]:
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: a read-only file system then
        return c.run(c.recording(), out=Path("/sys/kernel"))
    folder = c.tmp / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return c.run(c.recording(), out=folder)


def detector_size_zero(c: Ctx) -> list[str]:
    det = c.tmp / "det0"
    shutil.copytree(c.models[0], det)
    proc = json.loads((det / "preprocessor_config.json").read_text())
    proc["size"] = {"height": 0, "width": 0}
    (det / "preprocessor_config.json").write_text(json.dumps(proc))
    return ["run", "--input", str(c.recording()), "--out", str(c.out), "--detector", str(det),
            "--sam", str(c.models[1]), "--device", "cpu", "--quiet"]  # fmt: skip


def max_targets_100000(c: Ctx) -> list[str]:
    return c.run(c.recording(), "--max-targets", "100000")


def volume_3d_nrrd(c: Ctx) -> list[str]:
    import nrrd

    path = c.tmp / "volume.nrrd"
    header = {"space": "left-posterior-superior", "kinds": ["domain", "domain", "domain"],
              "space directions": np.eye(3) * 0.5, "space origin": np.zeros(3)}  # fmt: skip
    nrrd.write(str(path), np.zeros((40, 32, 5), np.uint8), header)
    return c.run(path)


def volume_3d_mha(c: Ctx) -> list[str]:
    fields = [(k, v) for k, v in _fields(40, 32, 2) if k != "Kinds"]
    return c.run(_mha(c.tmp / "volume.mha", fields, _frames(2).tobytes()))


def parallel_axes(c: Ctx) -> list[str]:
    fields = _fields(40, 32, 2, TransformMatrix="1 0 0 1 0 0 0 0 1")
    return c.run(_mha(c.tmp / "parallel.igs.mha", fields, _frames(2).tobytes()))


def symlink_loop(c: Ctx) -> list[str]:
    (c.tmp / "a.igs.mha").symlink_to(c.tmp / "b.igs.mha")
    (c.tmp / "b.igs.mha").symlink_to(c.tmp / "a.igs.mha")
    return c.run(c.tmp / "a.igs.mha")


def broken_symlink(c: Ctx) -> list[str]:
    (c.tmp / "gone.igs.mha").symlink_to(c.tmp / "moved-away.igs.mha")
    return c.run(c.tmp / "gone.igs.mha")


def lowercase_keys(c: Ctx) -> list[str]:
    fields = [(k.lower(), v) for k, v in _fields(40, 32, 2)]
    return c.run(_mha(c.tmp / "lower.mha", fields, _frames(2).tobytes()))


def _nan_sam(c: Ctx) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(c.models[1]), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(c.models[1]))
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name][...] = float("nan")
    path = c.tmp / "nan" / "sam_vit_t_demo.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata=meta)
    return path


def sam_nan_weights(c: Ctx) -> list[str]:
    return c.run(c.recording(), sam=_nan_sam(c))


def sam_folder_with_two_checkpoints(c: Ctx) -> list[str]:
    folder = c.tmp / "sams"
    folder.mkdir()
    for name in ("a.safetensors", "b.pth"):
        (folder / name).write_bytes(c.models[1].read_bytes())
    return c.run(c.recording(), sam=folder)


def doctor_sam_nan_weights(c: Ctx) -> list[str]:
    return [
        "doctor",
        "--no-warmup",
        "--detector",
        str(c.models[0]),
        "--sam",
        str(_nan_sam(c)),
        "--device",
        "cpu",
    ]


def zip_pth_named_safetensors(c: Ctx) -> list[str]:
    import torch
    from safetensors.torch import load_file

    path = c.tmp / "renamed.safetensors"
    torch.save(load_file(str(c.models[1])), path)
    return c.run(c.recording(), sam=path)


def pack_zip_names_the_zip(c: Ctx) -> list[str]:
    import shutil

    from UltramotionIGTLib.models.packs import make_pack, write_manifest, zip_pack

    # make_pack refuses models that do not load: the damaged file goes in afterwards, with a manifest
    # whose hashes match it (a pack made by hand or by an older version), so only loading can tell
    folder = make_pack(c.tmp / "pack", detector_dir=c.models[0], sam_checkpoint=c.models[1], name="nan-pack")
    shutil.copyfile(_nan_sam(c), folder / "sam" / "sam_vit_t_demo.safetensors")
    write_manifest(folder, "nan-pack")
    pack = zip_pack(folder, c.tmp / "pack.zip")
    return ["run", "--input", str(c.recording()), "--out", str(c.out), "--pack", str(pack), "--device", "cpu",
            "--quiet"]  # fmt: skip


def audit_no_entry_point(c: Ctx) -> list[str]:
    src = c.tmp / "elsewhere"
    src.mkdir()
    (src / "pipeline.py").write_text("def process_frame(frame:\n    return frame.cpu(\n")  # unparsable
    return ["audit", str(src), "--root", str(src), "--fail-on", "critical"]


def _args(*argv: str) -> Callable[[Ctx], list[str]]:
    return lambda c: list(argv)


@dataclass
class Row:
    name: str
    argv: Callable[[Ctx], list[str]]
    code: int
    words: tuple[str, ...]
    before_models: bool = False


ROWS = [
    # tracebacks today
    Row("MetaImage ElementNumberOfChannels = abc", channels_abc, 2, ("c.mha", "ElementNumberOfChannels", "'abc'"), True),
    Row("MetaImage HeaderSize = abc", header_size_abc, 2, ("d.mhd", "HeaderSize", "'abc'"), True),
    Row("compressed data, DimSize too large for zlib", zlib_dimsize_too_large, 2, ("z.mha", "declares"), True),
    Row("frames of 1 x 2100 pixels", frames_1x2100, 2, ("thin.npy", "1 x 2100", "too small"), True),
    Row("a bool array (a mask, not an image)", bool_frames, 2, ("mask.npy", "bool", "mask"), True),
    Row("frames of 4000 x 2 pixels", frames_4000x2, 2, ("4000 x 2", "too small"), True),
    Row("--out is a file", out_is_a_file, 2, ("--out", "is a file"), True),
    Row("--out under /dev/null", out_under_dev_null, 2, ("/dev/null/results", "cannot create"), True),
    Row("--out read-only", out_read_only, 2, ("--out",), True),
    Row("detector preprocessor size 0 x 0", detector_size_zero, 2, ("(0, 0)", "preprocessor_config.json")),
    Row("train --steps 0", _args("train", "detector", "--out", "x", "--steps", "0"), 2, ("--steps", ">= 1")),
    Row("bench pipeline --frames 0", _args("bench", "pipeline", "--frames", "0"), 2, ("--frames", ">= 1")),
    Row("bench mrml --segments 0", _args("bench", "mrml", "--segments", "0"), 2, ("--segments", ">= 1")),
    Row("bench pipeline --warmup -1", _args("bench", "pipeline", "--warmup", "-1"), 2, ("--warmup", ">= 0")),
    Row("run --score-threshold 2", lambda c: c.run(c.recording(), "--score-threshold", "2"), 2, ("within 0..1",)),
    # wrong acceptances
    Row("--max-targets 100000", max_targets_100000, 2, ("--max-targets 100000", "query count", "50"), True),
    Row("3-D volume (NRRD)", volume_3d_nrrd, 2, ("volume.nrrd", "3-D volume"), True),
    Row("3-D volume (MetaImage, no Kinds)", volume_3d_mha, 2, ("volume.mha", "3-D volume", "Kinds"), True),
    Row("direction matrix with parallel axes", parallel_axes, 2, ("parallel.igs.mha", "parallel"), True),
    Row("SAM checkpoint with NaN weights", sam_nan_weights, 2, ("sam_vit_t_demo.safetensors", "NaN")),
    Row("--sam a folder of two checkpoints", sam_folder_with_two_checkpoints, 2, ("2 checkpoints", "name the file"), True),
    Row("doctor: SAM checkpoint with NaN weights", doctor_sam_nan_weights, 1, ()),
    Row("train sam --steps -1", _args("train", "sam", "--out", "x", "--steps", "-1"), 2, ("--steps", ">= 1")),
    Row("bench mrml --height 0", _args("bench", "mrml", "--height", "0"), 2, ("--height", ">= 1")),
    Row("audit gate without a per-frame entry point", audit_no_entry_point, 2, ("per-frame entry point",)),
    # misleading messages
    Row("symbolic link loop", symlink_loop, 2, ("a.igs.mha", "symbolic links"), True),
    Row("broken symbolic link", broken_symlink, 2, ("gone.igs.mha", "symbolic link", "does not exist"), True),
    Row("zip .pth renamed .safetensors", zip_pth_named_safetensors, 2, ("renamed.safetensors", "rename it to .pth")),
    Row("lowercase MetaImage keys", lowercase_keys, 2, ("lower.mha", "case-sensitive", "'ObjectType'"), True),
    Row("damaged file in a --pack zip", pack_zip_names_the_zip, 2, ("pack.zip:", "NaN")),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_one_line_exit_2_before_models(row: Row, random_models, tmp_path, capsys) -> None:
    ctx = Ctx(tmp_path, random_models)
    argv = row.argv(ctx)
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == row.code, (code, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    if row.code == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith(f"ultramotion-igt {argv[0]}"), err
        line = lines[-1]
        if argv[0] != "audit":  # the audit writes its report's path before the verdict
            assert len(lines) == 1, err
        for word in row.words:
            assert word in line, (word, line)
        assert "ultramotion-pack-" not in line  # never a temporary folder that is gone when read
        if row.before_models:
            assert "garbage.safetensors" not in line  # the row's error came before the SAM load
    if argv[0] == "run":
        assert not (ctx.out / "summary.json").exists() and not (ctx.out / "kpi.jsonl").exists()
    if row.name.startswith("doctor"):
        assert "NOT READY" in out and "NaN" in out


def test_negative_element_spacing_is_read_as_itk_and_slicer_read_it(random_models, tmp_path, capsys) -> None:
    """Too strict before: a PLUS file with a negative ElementSpacing component (a flipped axis)."""
    fields = _fields(40, 32, 2, ElementSpacing="0.2 -0.3 1", Offset="10 20 0")
    path = _mha(tmp_path / "flipped.igs.mha", fields, _frames(2).tobytes())
    seq = read_sequence(path)
    m = seq.ijk_to_lps()
    np.testing.assert_allclose(m[:3, 1], [0.0, -0.3, 0.0])  # the j axis points the other way
    assert seq.spacing == (0.2, 0.3, 1.0)
    if HAS_SLICER:
        import slicer
        import vtk

        # one 2-D frame: Slicer's own reader (ITK) places its pixels where we do
        one = [(k, v) for k, v in _fields(40, 32, 1, NDims="2", DimSize="40 32", ElementSpacing="0.2 -0.3",
                                           Offset="10 20") if k != "Kinds"]  # fmt: skip
        single = _mha(tmp_path / "flipped.mha", one, _frames(1).tobytes())
        scene = slicer.vtkMRMLScene()
        storage, node = slicer.vtkMRMLVolumeArchetypeStorageNode(), slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(storage)
        scene.AddNode(node)
        storage.SetFileName(str(single))
        assert storage.ReadData(node) == 1
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        got = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
        ours = read_sequence(single).ijk_to_ras()
        # the in-plane axes and the origin; Slicer may flip the (1-voxel) third axis to keep the
        # IJK-to-RAS matrix right-handed, which moves no pixel of a single slice
        np.testing.assert_allclose(got[:3, [0, 1, 3]], ours[:3, [0, 1, 3]], atol=1e-9)
    out = tmp_path / "out"
    argv = ["run", "--input", str(path), "--out", str(out), "--detector", str(random_models[0]),
            "--sam", str(random_models[1]), "--device", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    from UltramotionIGTLib.io import read_segmentation_sequence

    np.testing.assert_allclose(read_segmentation_sequence(out / "segmentation.seq.nrrd").ijk_to_lps(), m)


def test_a_reader_that_goes_away_is_not_a_traceback(monkeypatch, capsys) -> None:
    """``ultramotion-igt audit | head -1``: stdout's reader closes the pipe."""
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        code = cli.main(["audit", str(Path(cli.__file__).parents[1] / "core")])
    finally:
        monkeypatch.undo()
        try:
            closed.close()
        except BrokenPipeError:
            pass
    assert code == cli.EXIT_BROKEN_PIPE
    assert "Traceback" not in capsys.readouterr().err


def test_anything_else_is_a_bug_and_says_so(monkeypatch, capsys) -> None:
    """The one case a test must provoke by hand: a real bug is not on hand, so the command's run is
    replaced by one that fails the way a bug does."""
    import UltramotionIGTLib.tools.benchmarks.matcher as matcher

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(matcher, "run", broken)
    assert cli.main(["bench", "matcher", "--device", "cpu"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("ultramotion-igt bench matcher: internal error (ZeroDivisionError)")
    )
    assert "this is a bug" in err.strip().splitlines()[-1]
