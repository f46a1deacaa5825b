"""Issue 13, kind 1: results are never lost or mixed up.

One table of cases, each with its inputs generated here (PLUS MetaImage recordings written by
`write_image`, real-format random-weight models), the real command line (in-process `cli.main`, or a
subprocess where a signal or a second process is the point), and the outcome checked on disk: exit
code, the one line, and every output file and its content.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from UltramotionIGTLib.io import UltrasoundSequence, read_segmentation_sequence, write_image
from UltramotionIGTLib.tools import cli

REPO = Path(__file__).resolve().parents[1]
HAS_SLICER = __import__("importlib").util.find_spec("slicer") is not None


def recording(path: Path, n: int, timestamps=None, h: int = 32, w: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ref = UltrasoundSequence(
        frames=rng.integers(0, 256, (n, h, w), dtype=np.uint8),
        spacing=(0.2, 0.25, 1.0),
        origin=(5.0, -3.0, 0.0),
        timestamps=100.0 + np.arange(n) / 20.0 if timestamps is None else timestamps,
    )
    return write_image(path, ref.frames, ref)


def run_argv(models, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(inp), "--out", str(out), "--detector", str(models[0]), "--sam",
            str(models[1]), "--device", "cpu", "--quiet", "--score-threshold", "0", *extra]  # fmt: skip


def spawn(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "UltramotionIGTLib", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def wait_for_frames(path: Path, count: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if path.is_file() and path.read_text().count('"event":"frame"') >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {count} frame records in {path} after {timeout} s")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line is valid JSON


def check_consistent(out: Path, complete: bool) -> dict:
    """The folder holds one run's outputs and they agree with each other; returns the summary."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is complete, summary.get("reason")
    records = lines(out / "kpi.jsonl")
    assert records[0]["event"] == "start" and records[-1]["event"] == "summary"
    assert [r["event"] for r in records].count("start") == 1
    frames = [r for r in records if r["event"] == "frame"]
    seg = read_segmentation_sequence(out / "segmentation.seq.nrrd")
    assert seg.n_frames == summary["frames_out"] == len(frames) + len(summary["skipped"])
    assert sorted(p.name for p in out.iterdir()) == summary["outputs"]  # nothing stale, nothing left over
    assert records[-1]["complete"] is complete
    return summary


# -- the cases ------------------------------------------------------------------------------------


def more_than_255_targets(models, tmp: Path, capsys) -> None:
    """Labels past 255: the writer widens to uint16 as it goes, nothing is refused at the end.
    The real writer chain of ``run`` (`SegmentTable` -> `RunRecorder`) with 100 new tracked targets
    per frame, as a long run with many targets produces them."""
    from UltramotionIGTLib.core.kpi import FrameRecord
    from UltramotionIGTLib.core.packet import HostResult, SegmentTable
    from UltramotionIGTLib.tools.outputs import OutputFolder, RunRecorder

    h, w, per_frame = 32, 40, 100
    ref = UltrasoundSequence(frames=np.zeros((3, h, w), np.uint8), spacing=(0.2, 0.25, 1.0))
    table, expected = SegmentTable(), []
    recorder = RunRecorder(OutputFolder.open(tmp / "out"), "test", {"device": "cpu"}, geometry=ref, frames=3)
    for f in range(3):
        masks = np.zeros((per_frame, h, w), bool)
        for m in range(per_frame):
            masks[m].flat[m * 7 + f] = True  # one pixel each, all distinct
        ids = np.arange(per_frame) + f * per_frame
        result = HostResult(
            f, (h, w), np.tile([[0, 0, 4, 4]], (per_frame, 1)).astype(np.float32), np.linspace(0.9, 0.5, per_frame,
            dtype=np.float32), np.zeros(per_frame, np.int64), np.zeros((per_frame, 2), np.float32),
            np.ones(per_frame, np.float32), ids, masks,
        )  # fmt: skip
        labelmap = table.labelmap(result)
        expected.append(labelmap)
        recorder.log(FrameRecord.from_result(result))
        recorder.add_item(labelmap, 10.0 + f, table.segments())
        recorder.sample(ref.frames[f], result)
    summary = recorder.close({"frames_out": 3, "skipped": []})
    assert summary["complete"] and summary["segmentation"]["dtype"] == "uint16"
    seg = read_segmentation_sequence(tmp / "out" / "segmentation.seq.nrrd")
    assert seg.labelmaps.dtype == np.uint16 and seg.labelmaps.max() == 300
    np.testing.assert_array_equal(seg.labelmaps, np.stack(expected))
    assert [s.name for s in seg.segments] == [f"vessel-{i}" for i in range(300)]
    assert expected[0].dtype == np.uint8 and expected[2].dtype == np.uint16  # widened mid-run


def same_timestamps(models, tmp: Path, capsys) -> None:
    """Three frames at 5.0 s: index values made distinct (Slicer merges values within 1 ms), reported."""
    src = recording(tmp / "same.igs.mha", 3, timestamps=[5.0, 5.0, 5.0])
    out = tmp / "out"
    assert cli.main(run_argv(models, src, out)) == 0
    line = capsys.readouterr().out.strip()
    assert "2 repeated timestamp(s) moved in the index" in line
    summary = check_consistent(out, complete=True)
    fixups = summary["segmentation"]["index_fixups"]
    assert [(f["item"], f["timestamp"]) for f in fixups] == [(1, 5.0), (2, 5.0)]
    seg = read_segmentation_sequence(out / "segmentation.seq.nrrd")
    np.testing.assert_allclose(seg.timestamps, [5.0, 5.002, 5.004])
    if HAS_SLICER:
        import slicer

        scene = slicer.vtkMRMLScene()
        storage, node = slicer.vtkMRMLVolumeSequenceStorageNode(), slicer.vtkMRMLSequenceNode()
        scene.AddNode(storage)
        scene.AddNode(node)
        storage.SetFileName(str(out / "segmentation.seq.nrrd"))
        assert storage.ReadData(node) == 1
        assert node.GetNumberOfDataNodes() == 3  # was 1 before: two frames silently lost


def ctrl_c(models, tmp: Path, capsys) -> None:
    """Ctrl-C mid-run over an earlier result (--overwrite): a consistent partial result, clearly marked."""
    out = tmp / "out"
    assert cli.main(run_argv(models, recording(tmp / "short.igs.mha", 2), out, "--gif")) == 0
    proc = spawn(run_argv(models, recording(tmp / "long.igs.mha", 400), out, "--overwrite"))
    wait_for_frames(out / "kpi.jsonl", 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ultramotion-igt run: interrupted"
    summary = check_consistent(out, complete=False)
    assert summary["reason"].startswith("interrupted") and 3 <= summary["frames_out"] < 400
    assert summary["source"].endswith("long.igs.mha")  # not the earlier run's summary
    assert not (out / "overlay.gif").exists()  # the earlier run's files are gone, not mixed in


def existing_out_refused(models, tmp: Path, capsys) -> None:
    out = tmp / "out"
    assert cli.main(run_argv(models, recording(tmp / "a.igs.mha", 2), out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(run_argv(models, recording(tmp / "b.igs.mha", 3, seed=1), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the results of an earlier run" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched


def overwrite_lists_only_new_outputs(models, tmp: Path, capsys) -> None:
    out = tmp / "out"
    assert cli.main(run_argv(models, recording(tmp / "a.igs.mha", 2), out, "--gif")) == 0
    (out / "notes.txt").write_text("mine")  # not an output: left alone, not listed
    assert cli.main(run_argv(models, recording(tmp / "b.igs.mha", 3, seed=1), out, "--overwrite")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == ["kpi.jsonl", "overlay.png", "segmentation.seq.nrrd", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["outputs"] + ["notes.txt"])
    assert summary["frames_out"] == 3 and summary["complete"] is True


def concurrent_writers(models, tmp: Path, capsys) -> None:
    out = tmp / "out"
    first = spawn(run_argv(models, recording(tmp / "long.igs.mha", 400), out))
    wait_for_frames(out / "kpi.jsonl", 1, first)
    code = cli.main(run_argv(models, recording(tmp / "b.igs.mha", 2, seed=1), out, "--overwrite"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another run is writing into this folder" in err[0]
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    summary = check_consistent(out, complete=False)  # one run's lines only, all valid JSON
    assert summary["source"].endswith("long.igs.mha")


def input_inside_out(models, tmp: Path, capsys) -> None:
    out = tmp / "out"
    assert cli.main(run_argv(models, recording(tmp / "a.igs.mha", 2), out)) == 0
    inp = out / "segmentation.seq.nrrd"  # a readable sequence, named like an output
    before = inp.read_bytes()
    capsys.readouterr()
    assert cli.main(run_argv(models, inp, out, "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would overwrite it" in err[0] and "segmentation.seq.nrrd" in err[0]
    assert inp.read_bytes() == before


def file_modes(models, tmp: Path, capsys) -> None:
    out = tmp / "out"
    previous = os.umask(0o027)
    try:
        assert cli.main(run_argv(models, recording(tmp / "a.igs.mha", 2), out)) == 0
    finally:
        os.umask(previous)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path  # 0644 less the umask, never 0600


def overwrite_that_cannot_remove_keeps_everything(models, tmp: Path, capsys) -> None:
    """--overwrite over an earlier result one of whose files cannot be removed (immutable): one line,
    exit 2, and every earlier file still there with its bytes."""
    import shutil

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available to make a file immutable")
    out = tmp / "out"
    assert cli.main(run_argv(models, recording(tmp / "a.igs.mha", 2), out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    locked = out / "summary.json"
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support immutable files")
    try:
        capsys.readouterr()
        assert cli.main(run_argv(models, recording(tmp / "b.igs.mha", 2, seed=1), out, "--overwrite")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nothing was removed" in err[0], err
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


CASES: dict[str, Callable] = {
    "more than 255 tracked targets": more_than_255_targets,
    "frames with the same timestamp": same_timestamps,
    "Ctrl-C in run over an earlier result": ctrl_c,
    "existing --out refused": existing_out_refused,
    "--overwrite lists only the new outputs": overwrite_lists_only_new_outputs,
    "two runs into one --out": concurrent_writers,
    "input inside --out named like an output": input_inside_out,
    "files get the usual mode": file_modes,
    "--overwrite that cannot remove a file keeps everything": overwrite_that_cannot_remove_keeps_everything,
}


@pytest.mark.parametrize("case", list(CASES))
def test_results_are_never_lost_or_mixed_up(case, random_models, tmp_path, capsys) -> None:
    CASES[case](random_models, tmp_path, capsys)


def test_a_skipped_frame_keeps_the_sequence_aligned(random_models, tmp_path, capsys) -> None:
    """A frame without a finite pixel: reported, skipped, an empty labelmap in its place."""
    frames = np.random.default_rng(2).random((3, 32, 40)).astype(np.float32) * 1000.0
    frames[1] = np.nan
    np.save(tmp_path / "nan.npy", frames)
    out = tmp_path / "out"
    assert cli.main(run_argv(random_models, tmp_path / "nan.npy", out)) == 0
    assert "1 frame(s) skipped" in capsys.readouterr().out
    summary = check_consistent(out, complete=True)
    assert [s["frame"] for s in summary["skipped"]] == [1] and "no finite pixel" in summary["skipped"][0][
        "reason"
    ]
    assert summary["frames_processed"] == 2 and summary["frames_out"] == 3
    events = [(r["event"], r.get("frame")) for r in lines(out / "kpi.jsonl")[1:-1]]
    assert events == [("frame", 0), ("skipped", 1), ("frame", 2)]
    seg = read_segmentation_sequence(out / "segmentation.seq.nrrd")
    assert not seg.labelmaps[1].any()
