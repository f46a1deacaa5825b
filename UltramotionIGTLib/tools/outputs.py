"""The result folder of a run (``run``, ``demo``, ``serve --record``): nothing lost, nothing mixed up.

`OutputFolder.open` checks ``--out`` before any heavy work (models, reading a recording), so a bad
folder costs seconds, not a model load:

- it must be a folder we can create and write (not a file, not under ``/dev/null``, not read-only);
- one writer at a time: a lock (``.ultramotion-igt.lock``, an OS file lock held while the run
  lasts, released by the OS if the process dies) refuses a second run into the same folder;
- a folder holding an earlier run's results is refused unless ``overwrite``; with it, the earlier
  outputs are removed when the new run starts writing (not before: a run that fails to start keeps
  them), so no stale file is ever listed in (or mistaken for part of) the new result;
- an input (recording, model file) inside the folder under an output's name is refused: it would
  be overwritten.

`RunRecorder` writes the outputs as frames are processed, so memory stays flat however long the
recording (one labelmap and a bounded sample of frames for the overlays):

- ``summary.json`` first, marked ``"complete": false`` (``"state": "running"``), replaced at the end
  by the final summary; a run that is interrupted (Ctrl-C), stopped by an error or killed therefore
  always leaves a summary saying it is partial, and why when it could say it;
- ``kpi.jsonl``: a ``start`` record, one record per frame (``frame``, or ``skipped`` with the
  reason), a ``summary`` record; line-buffered;
- ``segmentation.seq.nrrd`` through `UltramotionIGTLib.io.SegmentationSequenceWriter` (readable
  ``.nhdr`` + ``.raw`` pair while running; an interrupted run still gets its ``.nrrd`` with the
  frames done);
- ``overlay.png`` from up to ``overlay_tiles`` frames spread over the run (a sample of at most twice
  that many frames is kept), ``overlay.gif`` (the first ``gif_frames`` frames) when asked.

The summary's ``outputs`` lists the files this run wrote, nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UltramotionError, UsageError

LOG = logging.getLogger(__name__)

SEGMENTATION = "segmentation.seq.nrrd"
#: What a run writes (and what marks a folder as holding a run's results).
OUTPUT_FILES: tuple[str, ...] = (
    SEGMENTATION,
    "kpi.jsonl",
    "summary.json",
    "overlay.png",
    "overlay.gif",
    "segmentation.seq.nhdr",
    "segmentation.seq.raw",
)
LOCK_NAME = ".ultramotion-igt.lock"


class OutputFolderError(UltramotionError):
    """``--out`` cannot take this run's results (a file, not writable, in use, holds earlier results)."""


def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking OS lock on ``fd``; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class OutputFolder:
    """A checked, locked result folder (module docstring). Use `open`; `release` when done."""

    def __init__(self, path: Path, overwrite: bool, created: bool, lock_fd: int) -> None:
        self.path = path
        self.overwrite = overwrite
        self._created = created
        self._lock_fd: int | None = lock_fd
        self.previous = sorted(name for name in OUTPUT_FILES if (path / name).exists())

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        overwrite: bool = False,
        inputs: Iterable[Any] = (),
        option: str = "--out",
    ) -> OutputFolder:
        """Check, create and lock ``path`` for a run's results. ``inputs``: the files the run reads
        (recording, model files, None entries ignored). Raises `OutputFolderError` (one line naming
        the folder) for a path that is a file or cannot be created or written, a folder another run
        is writing into, a folder with an earlier run's results (unless ``overwrite``), and
        `UsageError` for an input that the run would overwrite. ``option``: how messages name the
        folder's command-line option (``serve`` records with ``--record``)."""
        out = Path(path).expanduser()
        option = f"{option} {out}"
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"{option} is a file, not a folder: choose a folder for the results")
        created = False
        if not out.exists():
            try:
                out.mkdir(parents=True)
            except OSError as exc:
                raise OutputFolderError(
                    f"{option}: cannot create the folder ({exc.strerror or exc})"
                ) from None
            created = True
        try:
            resolved = out.resolve()
        except (OSError, RuntimeError) as exc:
            cls._undo(out, created)
            raise OutputFolderError(f"{option}: cannot be used ({exc})") from None
        for item in inputs:
            if item is None:
                continue
            source = Path(item).expanduser()
            try:
                source = source.resolve()
            except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
                continue
            if source.parent == resolved and (source.name in OUTPUT_FILES or source.name == LOCK_NAME):
                cls._undo(out, created)
                raise UsageError(
                    f"the input {item} is inside {option} under the name of an output: the run would "
                    f"overwrite it; choose another {option.split()[0]}"
                )
        try:
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            cls._undo(out, created)
            raise OutputFolderError(f"{option}: the folder is not writable ({exc.strerror or exc})") from None
        if not _lock(fd):
            try:
                holder = (
                    os.pread(fd, 64, 0).decode("ascii", "replace").strip() if hasattr(os, "pread") else ""
                )
            except OSError:
                holder = ""
            os.close(fd)
            raise OutputFolderError(
                f"{option}: another run is writing into this folder"
                + (f" (process {holder})" if holder else "")
                + ": wait for it to finish, or choose another folder"
            )
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode("ascii"))
        except OSError as exc:
            os.close(fd)
            cls._undo(out, created)
            raise OutputFolderError(f"{option}: the folder is not writable ({exc.strerror or exc})") from None
        folder = cls(out, overwrite, created, fd)
        if folder.previous and not overwrite:
            folder.release()
            raise OutputFolderError(
                f"{option} holds the results of an earlier run ({', '.join(folder.previous)}): choose "
                "another folder, or pass --overwrite to replace them"
            )
        return folder

    @staticmethod
    def _undo(out: Path, created: bool) -> None:
        if created:
            try:
                out.rmdir()
            except OSError:
                pass

    def clear_previous(self) -> None:
        """Remove the earlier run's outputs (only names in `OUTPUT_FILES`; with ``overwrite``), all or
        none: each is first moved aside, and when one cannot be, the others are put back and
        `InputFileError` names it -- the earlier results stay whole."""
        aside = self.path / f".previous-{os.getpid()}"
        moved: list[str] = []
        try:
            aside.mkdir(exist_ok=True)
            for name in self.previous:
                if (self.path / name).exists():
                    os.replace(self.path / name, aside / name)
                    moved.append(name)
        except OSError as exc:
            for name in moved:
                os.replace(aside / name, self.path / name)
            shutil.rmtree(aside, ignore_errors=True)
            raise InputFileError(
                f"--out {self.path}: cannot replace the earlier results ({exc.strerror or exc} on "
                f"{Path(exc.filename or self.path).name}); nothing was removed"
            ) from exc
        shutil.rmtree(aside, ignore_errors=True)
        self.previous = []

    def release(self, keep_empty: bool = False) -> None:
        """Drop the lock; a folder this call's `open` created and nothing was written into is removed
        (unless ``keep_empty``). Idempotent."""
        if self._lock_fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink()
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None
        if self._created and not keep_empty:
            self._undo(self.path, True)

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release(keep_empty=True)


def display_image(frame: Any, intensity: dict[str, Any] | None) -> np.ndarray:
    """A copy of ``frame`` as the pipeline saw it, HxW uint8 (for the overlays): the stream's intensity
    window (``intensity``: `IntensityWindow.to_dict`, as a `HostResult` carries it) applied, colour
    as luminance."""
    from UltramotionIGTLib.core.intensity import IntensityWindow
    from UltramotionIGTLib.io import luminance
    from UltramotionIGTLib.io.arrays import host_array

    image = np.array(host_array(frame), copy=True)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or (intensity is not None and intensity.get("rule") != "uint8"):
        window = IntensityWindow.from_dict(intensity) if intensity else None
        if window is None:
            from UltramotionIGTLib.core.intensity import window_for_frame

            window = window_for_frame(image)
        image = window.map_numpy(image)
    if image.ndim == 3:
        image = luminance(image)
    return image


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from UltramotionIGTLib.io.common import atomic_write

    text = (json.dumps(data, indent=2, default=str, allow_nan=False) + "\n").encode("utf-8")
    atomic_write(path, lambda fh: fh.write(text))


def _jsonable(data: Any) -> Any:
    from UltramotionIGTLib.core.kpi import _jsonable as kpi_jsonable

    return kpi_jsonable(data)


class RunRecorder:
    """Writes one run's outputs into an `OutputFolder` as frames come (module docstring).

    folder: the locked folder (`OutputFolder.open`). source: what the run reads (text). describe: the
    pipeline's `Pipeline.describe()` (start record). geometry: the input's geometry for the
    segmentation (an `UltrasoundSequence`/`Geometry`, a 4x4 IJK-to-RAS matrix, or None: the first
    item's ``ijk_to_ras``). frames: the frames expected (None: unknown, a live stream).

    Per frame: `log` its KPI record, `add_item` its labelmap (every input frame gets one, empty for a
    skipped frame, so the sequence stays aligned with the input), `sample` its image and result for
    the overlays. Once: `close` (complete, or partial with the reason).
    """

    def __init__(
        self,
        folder: OutputFolder,
        source: str,
        describe: dict[str, Any],
        geometry: Any = None,
        frames: int | None = None,
        overlay_tiles: int = 6,
        gif: bool = False,
        gif_frames: int = 40,
    ) -> None:
        from UltramotionIGTLib.core.kpi import JsonlKpiSink, safe_log_kpi

        self.folder = folder
        self.out = folder.path
        self.source = source
        self.geometry = geometry
        self.frames_expected = frames
        self.overlay_tiles = overlay_tiles
        self.gif_frames = gif_frames if gif else 0
        self.started = time.time()
        self.written: set[str] = set()
        folder.clear_previous()
        self._running_summary(describe)
        self.sink = JsonlKpiSink(self.out / "kpi.jsonl")
        self.written.add("kpi.jsonl")
        safe_log_kpi({"event": "start", "source": source, "frames": frames, **describe}, self.sink)
        self._segmentation: Any = None
        self._samples: list[tuple[np.ndarray, Any]] = []
        self._gif: list[tuple[np.ndarray, Any]] = []
        self._stride = 1
        self._seen = 0
        self.skipped: list[dict[str, Any]] = []
        self.closed = False

    def _running_summary(self, describe: dict[str, Any]) -> None:
        _write_json(
            self.out / "summary.json",
            {
                "complete": False,
                "state": "running",
                "reason": "the run was still writing (or was killed) when this summary was written",
                "source": self.source,
                "frames_in": self.frames_expected,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "device": describe.get("device"),
                "path": describe.get("path"),
            },
        )
        self.written.add("summary.json")

    # -- per frame -----------------------------------------------------------------------------------
    def log(self, record: Any) -> None:
        """One KPI record (a `FrameRecord` or an event mapping) into ``kpi.jsonl``."""
        from UltramotionIGTLib.core.kpi import safe_log_kpi

        safe_log_kpi(record, self.sink)

    def add_item(
        self,
        labelmap: np.ndarray,
        timestamp: float | None,
        segments: Sequence[tuple[int, str, Sequence[float]]],
        ijk_to_ras: np.ndarray | None = None,
    ) -> None:
        """Append one frame's HxW labelmap (stable label values; widened past 255 / 65535 labels) to the
        segmentation, with its timestamp and the segments so far. ``ijk_to_ras``: the frame's geometry
        when the recorder has none yet (a live stream: the first frame's becomes the sequence's)."""
        from UltramotionIGTLib.io import SegmentationSequenceWriter

        if self._segmentation is None:
            geometry = self.geometry if self.geometry is not None else ijk_to_ras
            if geometry is None:
                raise ValueError("RunRecorder needs the input's geometry (or the first frame's ijk_to_ras)")
            self._segmentation = SegmentationSequenceWriter(self.out / SEGMENTATION, geometry, live=True)
            self.written.add(SEGMENTATION)
        self._segmentation.append(labelmap, timestamp, segments)

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """(H, W) of the segmentation's items (None before the first)."""
        return None if self._segmentation is None else self._segmentation.frame_shape

    @property
    def items(self) -> int:
        return 0 if self._segmentation is None else self._segmentation.n_frames

    def skip(self, index: int, timestamp: float | None, reason: str) -> None:
        """Record a frame that was not processed (its reason in ``kpi.jsonl`` and the summary)."""
        entry = {"frame": int(index), "reason": reason}
        if timestamp is not None and np.isfinite(timestamp):
            entry["timestamp"] = float(timestamp)
        self.skipped.append(entry)
        self.log({"event": "skipped", **entry})

    def sample(self, frame: Any, result: Any) -> None:
        """Offer one input frame and its `HostResult` for the overlays; a bounded sample is kept
        (stride doubling: at most 2 x ``overlay_tiles`` frames spread over the run, plus the first
        ``gif_frames`` for the GIF). Kept frames are stored as the pipeline saw them (`display_image`)."""
        keep_gif = len(self._gif) < self.gif_frames
        keep = self._seen % self._stride == 0
        self._seen += 1
        if not (keep or keep_gif):
            return
        image = display_image(frame, getattr(result, "intensity", None))
        if keep_gif:
            self._gif.append((image, result))
        if keep:
            self._samples.append((image, result))
            if len(self._samples) > 2 * self.overlay_tiles:
                self._samples = self._samples[::2]
                self._stride *= 2

    # -- end -----------------------------------------------------------------------------------------
    def close(
        self, summary: dict[str, Any], complete: bool = True, reason: str | None = None
    ) -> dict[str, Any]:
        """Finish every output and write the final ``summary.json``: ``summary`` plus ``complete``
        (and ``reason`` when not), ``skipped``, the segmentation's ``segmentation`` report (frames,
        label type, index kind and ``index_fixups``) and ``outputs`` (the files this run wrote). A
        partial run's files are consistent: the segmentation holds the frames done. Idempotent;
        returns the summary written."""
        if self.closed:
            return summary
        self.closed = True
        errors: list[str] = []
        summary = dict(summary)
        try:
            if self._segmentation is not None:
                try:
                    summary["segmentation"] = self._segmentation.finish()
                    summary["segmentation"].pop("path", None)
                    fixups = summary["segmentation"]["index_fixups"]
                    if fixups:
                        LOG.warning(
                            "%d frame(s) share a timestamp with an earlier one (within 1 ms, which Slicer "
                            "merges): their index values were moved by 2 ms steps (summary.json lists them)",
                            len(fixups),
                        )
                except Exception as exc:  # noqa: BLE001 - the other outputs must still be written
                    errors.append(f"segmentation: {type(exc).__name__}: {exc}")
                    self._segmentation.abort()
                    self.written.discard(SEGMENTATION)
            if self._samples:
                try:
                    from UltramotionIGTLib.tools.overlay import save_overlay_grid

                    save_overlay_grid(
                        self.out / "overlay.png",
                        [s[0] for s in self._samples],
                        [s[1] for s in self._samples],
                        max_tiles=self.overlay_tiles,
                    )
                    self.written.add("overlay.png")
                    if self._gif:
                        from UltramotionIGTLib.tools.overlay import save_overlay_gif

                        save_overlay_gif(
                            self.out / "overlay.gif", [s[0] for s in self._gif], [s[1] for s in self._gif]
                        )
                        self.written.add("overlay.gif")
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"overlay: {type(exc).__name__}: {exc}")
            if errors:
                complete = False
                reason = "; ".join(([reason] if reason else []) + [f"could not write {e}" for e in errors])
            summary["complete"] = bool(complete)
            if not complete:
                summary["reason"] = reason or "stopped before the end"
            summary["skipped"] = self.skipped
            summary["outputs"] = sorted(self.written)
            summary = _jsonable(summary)
            self.log({"event": "summary", **summary})
        finally:
            self.sink.close()
            _write_json(self.out / "summary.json", summary)
            self.folder.release(keep_empty=True)
        return summary

    def close_partial(self, summary: dict[str, Any], exc: BaseException) -> dict[str, Any]:
        """Close as a partial run stopped by ``exc`` (Ctrl-C, an error); never raises (the caller
        re-raises ``exc``). Returns the summary written."""
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted (Ctrl-C)"
        else:
            reason = f"stopped by an error: {type(exc).__name__}: {exc}"
        try:
            return self.close(summary, complete=False, reason=reason)
        except Exception as inner:  # noqa: BLE001
            LOG.error("could not finish the partial result in %s: %s", self.out, inner)
            return summary
