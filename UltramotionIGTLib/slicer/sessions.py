"""Live and replay sessions: frames from MRML in, segmentation nodes out. Qt-free.

The Slicer module's logic drives these through `UltramotionIGTLib.slicer.controller` (a QTimer calls
``step()``); the tests drive the same objects on slicer-core in a loop. MRML is touched only through
`UltramotionIGTLib.slicer.mrml` / `.pose` and only on the calling (main) thread.

Live mode (`LiveSession`): the input volume's ``ImageDataModifiedEvent`` (fired by OpenIGTLink and
by the sequence browser for every new frame) only marks the frame as pending in a single slot, with
its arrival time, acquisition time and pose (`pose.transform_to_world`); a newer frame replaces a
pending one and the replaced one is counted as dropped, so memory stays flat however fast the
producer is. ``step()`` then, on the main thread:

- threaded (the module's live mode): writes the finished result, if any, into the output
  segmentation, with rendering paused (``render_pause``) and the output placed with its frame's
  arrival pose; and, when the session's one worker thread (`FrameWorker`) is free, copies the
  pending frame out of the volume node into a reused buffer and hands it over through a one-slot
  mailbox. So one frame is in flight at a time, a frame is copied only to be processed, and it is
  the newest when the worker can take it; frames that arrive meanwhile replace the pending one
  (dropped, counted). Only the copy and the write run on the main thread (``ultramotion-igt bench
  slicer`` measures them); the pipeline runs on the worker, at a lower scheduling priority
  (`WORKER_NICE`) so that the GUI thread gets the CPU first;
- synchronous (``threaded=False``, and ``process_once``): runs the pipeline on the frame in place
  and writes the result, in the same call.

The session stops itself, with a status message and without raising, when the input or output node
is removed, the scene is closed, the frame geometry changes (dimensions, spacing or direction) or
processing fails.

Replay mode (`ReplaySession`, `replay_sequence`): every frame of a volume sequence, in order,
nothing dropped, into a segmentation sequence with the same index values as the input.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from UltramotionIGTLib.core.kpi import FrameRecord, KpiAggregator, KpiSink, SenderClock, safe_log_kpi
from UltramotionIGTLib.core.mailbox import LatestFrameMailbox
from UltramotionIGTLib.slicer import mrml
from UltramotionIGTLib.slicer.pose import OutputPose, transform_to_world

if TYPE_CHECKING:
    from UltramotionIGTLib.core.packet import HostResult

LOG = logging.getLogger("UltramotionIGTLib.slicer.sessions")

#: ``process_frame(frame, frame_index, timestamp) -> HostResult``. ``frame``: HxW (grayscale) or
#: HxWx3 (RGB) numpy array on the host, valid during the call only (synchronous mode: a zero-copy
#: view of the volume's voxels; threaded: a buffer reused for later frames). ``timestamp``:
#: acquisition time (sender's clock) when the sender provides one, else arrival time (Unix s).
#: Threaded sessions call it on their worker thread, one frame at a time.
ProcessFrame = Callable[[Any, int, "float | None"], "HostResult"]

#: ``render_pause() -> context manager`` wrapped around each result's MRML write (the module passes
#: ``slicer.util.RenderBlocker``: views render once per frame, not once per changed node).
RenderPause = Callable[[], AbstractContextManager[Any]]

#: How long stopping a threaded session waits for the frame in flight to finish (seconds).
WORKER_JOIN_TIMEOUT_S = 60.0

#: Scheduling niceness of the worker thread (Linux, where niceness is per thread; the pipeline's CPU
#: threads, created by the worker, inherit it): the GUI thread wins the CPU whenever it has work (a
#: frame copy, a result write, rendering), the pipeline takes the rest. 0 leaves it unchanged.
WORKER_NICE = 5


class SessionState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"
    ERROR = "error"

    @property
    def running(self) -> bool:
        return self is SessionState.RUNNING

    @property
    def done(self) -> bool:
        """Stopped, failed or finished: a session in this state cannot be restarted."""
        return self not in (SessionState.IDLE, SessionState.RUNNING)


class Session(Protocol):
    """What `LiveSession`, `ReplaySession` and the remote gateway session share, and the controller drives.

    ``start()`` begins; ``step(wait)`` does the pending work on the calling (main) thread (live: hand
    the newest frame to the worker and write the newest finished result; replay: the next item;
    remote: the newest received label map) and returns True when a result was written; ``wait``
    (seconds) lets it block until a frame in flight is finished (tests, `process_once`). It never
    raises (a failure ends the session with ``state`` ERROR and ``status_message`` saying why);
    ``stop(reason)`` ends it. ``kpi`` aggregates the session's `FrameRecord`s; the counters satisfy
    ``frames_received == frames_processed + frames_dropped + frames_in_flight`` (in flight: pending,
    or handed to the worker and not written yet).
    """

    state: SessionState
    status_message: str
    frames_processed: int
    frames_dropped: int
    kpi: KpiAggregator
    last_result: HostResult | None

    @property
    def frames_received(self) -> int: ...

    @property
    def frames_in_flight(self) -> int: ...

    @property
    def running(self) -> bool: ...

    @property
    def done(self) -> bool: ...

    def start(self) -> None: ...

    def step(self, wait: float | None = None) -> bool: ...

    def stop(self, reason: str = "stopped by user") -> None: ...


class DropPolicy(str, enum.Enum):
    NEWEST = "newest"
    EVERY_NTH = "every_nth"


@dataclass
class _Pending:
    """A frame that arrived: what is known about it at arrival (its voxels stay in the node)."""

    index: int  # arrival number of the frame (0-based)
    arrival: float  # Unix seconds
    acquisition: float | None  # sender's timestamp, if any
    pose: np.ndarray | None  # input's transform to world at arrival (None: not linear)
    parent_id: str | None  # input's parent transform node at arrival
    snapshot: np.ndarray | None = None  # copy of the frame taken at arrival (every-Nth policy)


@dataclass
class _Job:
    """A frame on its way through the pipeline, and what came back."""

    pending: _Pending
    frame: np.ndarray
    geometry: mrml.FrameGeometry
    copy_ms: float = 0.0  # main-thread time to take the frame out of the node
    pooled: bool = False  # ``frame`` is a `FramePool` buffer, returned after processing
    result: HostResult | None = None
    error: BaseException | None = None
    started: float = 0.0  # Unix seconds, processing start
    pipeline_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class FramePool:
    """Reused frame buffers, so that copying a frame out of the node allocates nothing per frame.

    At most three are in use at a time (one being processed, one waiting in the mailbox, one being
    filled). Thread-safe: the worker gives buffers back.
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def copy(self, frame: np.ndarray) -> np.ndarray:
        """A pooled copy of ``frame`` (same shape and dtype)."""
        with self._lock:
            for k, buffer in enumerate(self._free):
                if buffer.shape == frame.shape and buffer.dtype == frame.dtype:
                    del self._free[k]
                    break
            else:
                buffer = np.empty(frame.shape, frame.dtype)
        np.copyto(buffer, frame)
        return buffer

    def release(self, buffer: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < 4:
                self._free.append(buffer)


def copy_frame(volume_node: Any, pool: FramePool) -> np.ndarray:
    """The frame of ``volume_node`` (HxW or HxWx3, `mrml.frame_from_volume`) copied into a pooled
    buffer: the one place a live session reads voxels it keeps beyond the current call."""
    return pool.copy(mrml.frame_from_volume(volume_node))


class FrameWorker:
    """One daemon thread that runs ``process`` on the frames handed to it; nothing ever queues.

    ``submit(job)`` (main thread) puts a job in the one-slot inbox; a job still waiting there would
    be replaced and counted in ``collect_dropped`` (the live session submits only when nothing is in
    flight, so that a frame is copied only to be processed). The thread runs ``process(job)`` (which
    fills ``job.result`` or ``job.error``), gives the frame buffer back to the pool and puts the job
    in the one-slot outbox (an unwritten older one likewise replaced). ``take_done(timeout)`` (main
    thread) returns the finished job. ``in_flight``: jobs submitted and neither taken back nor dropped.
    """

    def __init__(self, process: Callable[[_Job], None], pool: FramePool, name: str = "UltramotionIGT worker"):
        self._process = process
        self._pool = pool
        self._inbox = LatestFrameMailbox()
        self._outbox = LatestFrameMailbox()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._dropped = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._in_flight += 1
        replaced = self._inbox.put(job)
        if replaced is not None:
            self._discard(replaced)

    def take_done(self, timeout: float | None = None) -> _Job | None:
        """The newest finished job, waiting up to ``timeout`` s when one is in flight (0/None: no wait)."""
        job = self._outbox.take(timeout if timeout and self.in_flight else 0)
        if job is not None:
            with self._lock:
                self._in_flight -= 1
        return job

    def collect_dropped(self) -> int:
        """Jobs replaced (in the inbox or outbox) since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def close(self, timeout: float = WORKER_JOIN_TIMEOUT_S) -> int:
        """Stop the thread (after the frame it is processing) and return the jobs never to be written:
        dropped since the last `collect_dropped` and left in flight (the caller counts them as dropped)."""
        self._stopping.set()
        waiting = self._inbox.take(0)
        if waiting is not None:
            self._discard(waiting)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("the processing thread did not finish its frame within %.0f s", timeout)
        leftover = self._outbox.take(0)
        if leftover is not None:
            self._discard(leftover)
        with self._lock:
            left = self._in_flight + self._dropped
            self._in_flight = self._dropped = 0
        return left

    def _discard(self, job: _Job) -> None:
        if job.pooled and job.frame is not None:
            self._pool.release(job.frame)
            job.frame = None
        with self._lock:
            self._in_flight -= 1
            self._dropped += 1

    def _loop(self) -> None:
        if WORKER_NICE and sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
            except OSError as exc:  # not allowed here: the pipeline shares the CPU evenly, as before
                LOG.debug("worker priority unchanged: %s", exc)
        while not self._stopping.is_set():
            job = self._inbox.take(timeout=0.1)
            if job is None:
                continue
            self._process(job)  # never raises: errors are kept in the job
            if job.pooled and job.frame is not None:
                self._pool.release(job.frame)
                job.frame = None
            replaced = self._outbox.put(job)
            if replaced is not None:
                self._discard(replaced)


def _observer(session: Any, method_name: str, with_calldata: bool = False) -> Callable[..., None]:
    """A VTK observer callback that calls ``session.<method_name>`` through a weak reference (the
    observed node does not keep the session alive) and never lets an exception reach VTK."""
    ref = weakref.ref(session)

    def callback(caller: Any, event: Any, calldata: Any = None) -> None:
        target = ref()
        if target is None:
            return
        try:
            if with_calldata:
                getattr(target, method_name)(calldata)
            else:
                getattr(target, method_name)()
        except Exception:  # noqa: BLE001 - an observer must not raise into VTK/Qt
            LOG.exception("UltramotionIGT observer %s failed", method_name)

    if with_calldata:
        import vtk

        callback.CallDataType = vtk.VTK_OBJECT
    return callback


class _ObserverSet:
    """Our own observer tags, removed one by one (never ``RemoveObservers(event)``, which would
    also remove other modules' observers of that event)."""

    def __init__(self) -> None:
        self._tags: list[tuple[Any, int]] = []

    def add(self, obj: Any, event: int, callback: Callable[..., None]) -> None:
        self._tags.append((obj, obj.AddObserver(event, callback)))

    def remove_all(self) -> None:
        for obj, tag in self._tags:
            try:
                obj.RemoveObserver(tag)
            except Exception:  # noqa: BLE001 - object already gone: nothing left to remove
                LOG.debug("observer %s already removed", tag)
        self._tags.clear()


class LiveSession:
    """Segment a live volume node frame by frame into a segmentation node.

    Args:
        input_volume_node: vtkMRMLScalarVolumeNode / vtkMRMLVectorVolumeNode with one slice (the
            OpenIGTLink image node, or a sequence browser's proxy volume).
        output_segmentation_node: vtkMRMLSegmentationNode; one segment per tracked target
            (``vessel-3``), written in place each frame. It is placed with each frame's arrival
            pose (`UltramotionIGTLib.slicer.pose`), as is ``markups_node``.
        process_frame: ``(frame, frame_index, timestamp) -> HostResult``; frame HxW or HxWx3 numpy
            (see `ProcessFrame`). With the pipeline:
            ``lambda f, i, t: pipeline.process_frame(f, i, t).to_host()``.
        drop_policy: ``"newest"`` (default: process the newest frame, drop the ones that arrived
            while busy) or ``"every_nth"`` (take every ``every_nth``-th arriving frame, skip the
            others; a taken frame is copied at arrival, so it is processed even if newer frames
            arrive before ``step``; if a taken frame is still pending when the next taken one
            arrives, the older one is dropped).
        every_nth: N for ``"every_nth"`` (>= 1).
        status_callback: called with one str, the new status message, when the session starts,
            stops or fails (not per frame).
        kpi_sink: a `UltramotionIGTLib.core.kpi.KpiSink`; receives one ``"frame"`` record per processed
            frame and a ``"live_stop"`` summary.
        markups_node: optional vtkMRMLMarkupsFiducialNode for the targets' weighted centroids.
        threaded: run ``process_frame`` on a worker thread (`FrameWorker`), one frame at a time;
            ``step`` then only copies the frame and writes results. False: ``step`` runs the
            pipeline itself.
        render_pause: see `RenderPause` (default: no pause).

    Counters: ``frames_received`` (arrivals), ``frames_processed`` (results written),
    ``frames_dropped`` (received, never written: replaced while pending, skipped by the policy, in
    flight at stop, or failed); ``frames_skipped`` is the policy's share of
    the drops. Always ``frames_received == frames_processed + frames_dropped + frames_in_flight``.

    KPIs: one `FrameRecord` per processed frame goes to ``kpi`` (a `KpiAggregator` over the last 300
    frames: FPS, percentiles) and to ``kpi_sink``. Its latency runs from the frame's acquisition
    time (OpenIGTLink metadata, see `mrml.TIMESTAMP_ATTRIBUTES`) when the sender provides one, else
    from its arrival, to the end of the segmentation update. A sender clock that is not Unix time
    (PLUS) is aligned by the smallest arrival-minus-acquisition difference seen so far. Stage
    ``mrml`` is the write; ``copy_ms`` and ``main_thread_ms`` (copy + write: the GUI thread's share)
    and ``pipeline_ms`` are extra fields of the record.
    """

    def __init__(
        self,
        input_volume_node: Any,
        output_segmentation_node: Any,
        process_frame: ProcessFrame,
        drop_policy: str = "newest",
        every_nth: int = 1,
        status_callback: Callable[[str], None] | None = None,
        kpi_sink: KpiSink | None = None,
        markups_node: Any = None,
        threaded: bool = False,
        render_pause: RenderPause | None = None,
    ) -> None:
        try:
            self.drop_policy = DropPolicy(drop_policy)
        except ValueError:
            raise ValueError(f"drop_policy must be 'newest' or 'every_nth', got {drop_policy!r}") from None
        if int(every_nth) < 1:
            raise ValueError(f"every_nth must be >= 1, got {every_nth}")
        if input_volume_node is None or not input_volume_node.IsA("vtkMRMLVolumeNode"):
            raise ValueError("input_volume_node must be a volume node (vtkMRMLScalarVolumeNode or vector)")
        if output_segmentation_node is None or not output_segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("output_segmentation_node must be a vtkMRMLSegmentationNode")
        if input_volume_node.GetScene() is None:
            raise ValueError(f"input volume {mrml._node_label(input_volume_node)} is not in a scene")
        self.input_volume_node = input_volume_node
        self.output_segmentation_node = output_segmentation_node
        self.markups_node = markups_node
        self.process_frame = process_frame
        self.every_nth = int(every_nth)
        self.status_callback = status_callback
        self.kpi_sink = kpi_sink
        self.threaded = bool(threaded)
        self.render_pause: RenderPause = render_pause or contextlib.nullcontext
        self.scene = input_volume_node.GetScene()

        self.state = SessionState.IDLE
        self.status_message = "idle"
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self.frames_skipped = 0
        self.kpi = KpiAggregator(window=300)
        self.last_result: HostResult | None = None
        self.last_frame_index: int | None = None
        self.last_update_time: float | None = None  # Unix seconds of the last segmentation update
        self.geometry: mrml.FrameGeometry | None = None  # of the last frame taken from the node
        self.writer: mrml.SegmentationWriter | None = None
        self.points_writer: mrml.TargetPointsWriter | None = None
        self.pose = OutputPose(output_segmentation_node)
        self._pending: _Pending | None = None
        self._pool = FramePool()
        self._worker: FrameWorker | None = None
        self._observers = _ObserverSet()
        self._clock = SenderClock()

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state.running

    @property
    def done(self) -> bool:
        """True once the session stopped, failed or finished (it cannot be restarted)."""
        return self.state.done

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    @property
    def frames_in_flight(self) -> int:
        """Frames received and not yet written or dropped: pending, or with the worker."""
        worker = self._worker.in_flight if self._worker is not None else 0
        return (1 if self._pending is not None else 0) + worker

    def start(self, process_current: bool = True) -> None:
        """Observe the input and the scene. With ``process_current`` the frame already in the input
        (if any) is marked pending, so that ``step`` shows a result at once."""
        if self.state == SessionState.RUNNING:
            return
        if self.input_volume_node.GetScene() is None or self.output_segmentation_node.GetScene() is None:
            self._set_state(SessionState.ERROR, "cannot start: the input or output node is not in the scene")
            return
        import slicer

        self._observers.add(
            self.input_volume_node,
            slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent,
            _observer(self, "_on_frame_arrived"),
        )
        self._observers.add(
            self.scene,
            slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent,
            _observer(self, "_on_node_removed", True),
        )
        self._observers.add(
            self.scene, slicer.vtkMRMLScene.NodeRemovedEvent, _observer(self, "_on_node_removed", True)
        )
        self._observers.add(
            self.scene, slicer.vtkMRMLScene.StartCloseEvent, _observer(self, "_on_scene_closing")
        )
        self.geometry = None
        self.writer = None
        self.points_writer = None
        if self.threaded:
            self._worker = FrameWorker(self._run_job, self._pool)
        self._set_state(
            SessionState.RUNNING,
            f"running on {mrml._node_label(self.input_volume_node)} "
            f"({self.drop_policy.value}{'' if self.every_nth == 1 else f', N={self.every_nth}'})",
        )
        if process_current and self.input_volume_node.GetImageData() is not None:
            self._on_frame_arrived()

    def stop(self, reason: str = "stopped by user") -> None:
        """Stop observing and processing (idempotent; never raises). A pending frame is dropped; a
        frame being processed is finished (waited for) and dropped."""
        self._finish(SessionState.STOPPED, reason)

    def _finish(self, state: SessionState, reason: str) -> None:
        if self.state not in (SessionState.RUNNING, SessionState.IDLE):
            return
        self.state = state  # first: observers and the worker see a stopped session from here on
        self._observers.remove_all()
        if self._pending is not None:
            self._pending = None
            self.frames_dropped += 1
        if self._worker is not None:
            self.frames_dropped += self._worker.close()
            self._worker = None
        self._set_state(state, reason)
        if self.kpi_sink is not None:
            safe_log_kpi(
                {"event": "live_stop", "reason": reason, **self.counters(), **self.kpi.summary()},
                self.kpi_sink,
            )

    def _set_state(self, state: SessionState, message: str) -> None:
        self.state = state
        self.status_message = message
        if state == SessionState.ERROR:
            LOG.error("live session: %s", message)
        else:
            LOG.info("live session: %s", message)
        if self.status_callback is not None:
            try:
                self.status_callback(message)
            except Exception:  # noqa: BLE001 - a display callback must not break the session
                LOG.exception("status callback failed")

    # -- events ---------------------------------------------------------------------------------------
    def _on_frame_arrived(self) -> None:
        if self.state != SessionState.RUNNING:
            return
        index = self.frames_received
        self.frames_received += 1
        arrival = mrml.now()
        if self.drop_policy == DropPolicy.EVERY_NTH and index % self.every_nth != 0:
            self.frames_dropped += 1
            self.frames_skipped += 1
            return
        node = self.input_volume_node
        parent = node.GetParentTransformNode()
        pending = _Pending(
            index,
            arrival,
            mrml.acquisition_timestamp(node),
            transform_to_world(node),
            parent.GetID() if parent is not None else None,
        )
        if self.drop_policy == DropPolicy.EVERY_NTH and self.every_nth > 1:
            try:
                pending.snapshot = copy_frame(node, self._pool)
            except Exception as exc:  # noqa: BLE001 - reported when the frame is processed
                LOG.debug("frame %d not readable at arrival: %s", index, exc)
        if self._pending is not None:
            self.frames_dropped += 1
            if self._pending.snapshot is not None:
                self._pool.release(self._pending.snapshot)
        self._pending = pending

    def _on_node_removed(self, node: Any) -> None:
        if self.state != SessionState.RUNNING or node is None:
            return
        if node is self.input_volume_node or node.GetID() == self.input_volume_node.GetID():
            self._finish(SessionState.STOPPED, "stopped: the input volume was removed from the scene")
        elif node is self.output_segmentation_node or node.GetID() == self.output_segmentation_node.GetID():
            self._finish(SessionState.STOPPED, "stopped: the output segmentation was removed from the scene")
        elif self.markups_node is not None and node.GetID() == self.markups_node.GetID():
            self.markups_node = None
            self.points_writer = None
            LOG.info("live session: the target points node was removed; continuing without it")

    def _on_scene_closing(self) -> None:
        self._finish(SessionState.STOPPED, "stopped: the scene is being closed")

    # -- per frame ------------------------------------------------------------------------------------
    def step(self, wait: float | None = None) -> bool:
        """`Session` protocol: the frame work of one timer tick (see the module docstring).

        Threaded: write the finished result, if any; then, when the worker is free, copy the newest
        pending frame and hand it over (one frame in flight: a frame is copied only to be processed,
        and it is the newest one when the worker can start); with ``wait`` (seconds) and nothing
        written yet, wait for the frame in flight, write it and hand the next one over. Synchronous: `process_pending`.
        Returns True when a result was written. Never raises: a failure stops the session with a
        status message (``state`` becomes ``"error"``) and returns False.
        """
        if not self.threaded:
            return self.process_pending()
        if self.state != SessionState.RUNNING:
            return False
        written = self._write_finished(None)
        self._hand_over()
        if wait and not written and self.running:
            written = self._write_finished(wait)
            self._hand_over()
        return written

    def _write_finished(self, wait: float | None) -> bool:
        job = self._worker.take_done(wait)
        self.frames_dropped += self._worker.collect_dropped()
        return self._write(job) if job is not None else False

    def _hand_over(self) -> None:
        """The newest pending frame, copied, to the worker when it is free."""
        if self.running and self._pending is not None and self._worker.in_flight == 0:
            pending, self._pending = self._pending, None
            job = self._take_frame(pending, copy=True)
            if job is not None:
                self._worker.submit(job)

    def drain(self, timeout: float) -> int:
        """Threaded: write results until no frame is pending or in flight, or ``timeout`` s have
        passed (tests, end of a benchmark). Returns the number of results written."""
        deadline = time.monotonic() + timeout
        written = 0
        while self.running and self.frames_in_flight and time.monotonic() < deadline:
            written += self.step(wait=max(0.0, deadline - time.monotonic()))
        return written

    def process_pending(self) -> bool:
        """Synchronously process the newest pending frame, if any: pipeline and write in this call.

        Returns True when a frame was processed. Never raises (see `step`).
        """
        if self.state != SessionState.RUNNING or self._pending is None:
            return False
        pending, self._pending = self._pending, None
        job = self._take_frame(pending, copy=False)
        if job is None:
            return False
        self._run_job(job)
        if job.pooled:
            self._pool.release(job.frame)
        return self._write(job)

    def _take_frame(self, pending: _Pending, copy: bool) -> _Job | None:
        """Main thread: check the nodes and the geometry, and take the frame out of the input (a
        pooled copy when ``copy``, else a view valid until the node changes). None: the session ended."""
        try:
            node = self.input_volume_node
            if node.GetScene() is None:
                return self._drop_and_stop(pending, "stopped: the input volume was removed from the scene")
            if self.output_segmentation_node.GetScene() is None:
                return self._drop_and_stop(
                    pending, "stopped: the output segmentation was removed from the scene"
                )
            t0 = time.perf_counter()
            geometry = mrml.geometry_from_volume(node)
            if self.geometry is not None and not geometry.same_grid(self.geometry):
                return self._drop_and_stop(
                    pending,
                    "stopped: the input frame geometry changed ("
                    f"{geometry.describe_difference(self.geometry)}); start again to continue",
                )
            self.geometry = geometry  # a moved origin is followed, not an error
            if pending.snapshot is not None:
                frame, pooled = pending.snapshot, True
            elif copy:
                frame, pooled = copy_frame(node, self._pool), True
            else:
                frame, pooled = mrml.frame_from_volume(node), False
            return _Job(pending, frame, geometry, (time.perf_counter() - t0) * 1000.0, pooled)
        except Exception as exc:  # noqa: BLE001 - by contract: report, stop, never raise to the timer
            LOG.exception("live session: frame %d could not be read", pending.index)
            return self._drop_and_stop(
                pending, f"stopped: reading frame {pending.index} failed: {type(exc).__name__}: {exc}", True
            )

    def _drop_and_stop(self, pending: _Pending, message: str, error: bool = False) -> None:
        if pending.snapshot is not None:
            self._pool.release(pending.snapshot)
        self.frames_dropped += 1
        self._finish(SessionState.ERROR if error else SessionState.STOPPED, message)
        return None

    def _run_job(self, job: _Job) -> None:
        """The pipeline on one frame (the worker thread, or the caller in synchronous mode). Touches
        no MRML and no session state; never raises (the error is kept in the job)."""
        pending = job.pending
        timestamp = pending.acquisition if pending.acquisition is not None else pending.arrival
        job.started = mrml.now()
        t0 = time.perf_counter()
        try:
            job.result = self.process_frame(job.frame, pending.index, timestamp)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread at write time
            LOG.debug("frame %d failed in the pipeline", pending.index, exc_info=True)
            job.error = exc
        job.pipeline_ms = (time.perf_counter() - t0) * 1000.0

    def _write(self, job: _Job) -> bool:
        """Main thread: the job's result into the output nodes, placed with its frame's arrival pose."""
        pending = job.pending
        try:
            if job.error is not None:
                raise job.error
            if self.output_segmentation_node.GetScene() is None:
                self.frames_dropped += 1
                self._finish(
                    SessionState.STOPPED, "stopped: the output segmentation was removed from the scene"
                )
                return False
            result = job.result
            t0 = time.perf_counter()
            with self.render_pause():
                if self.writer is None:
                    self.writer = mrml.SegmentationWriter(self.output_segmentation_node, job.geometry)
                elif not job.geometry.is_same(self.writer.geometry):
                    self.writer.set_geometry(job.geometry)
                if self.markups_node is not None:
                    if self.points_writer is None:
                        self.points_writer = mrml.TargetPointsWriter(self.markups_node, job.geometry)
                    self.points_writer.geometry = job.geometry
                self.pose.place(
                    pending.pose, pending.parent_id, (self.output_segmentation_node, self.markups_node)
                )
                self.writer.write(result)
                if self.points_writer is not None:
                    self.points_writer.write(result)
            write_ms = (time.perf_counter() - t0) * 1000.0
        except Exception as exc:  # noqa: BLE001 - by contract: report, stop, never raise to the timer
            LOG.error("live session: frame %d failed", pending.index, exc_info=exc)
            self.frames_dropped += 1
            self._finish(
                SessionState.ERROR,
                f"stopped: processing frame {pending.index} failed: {type(exc).__name__}: {exc}",
            )
            return False

        t_done = mrml.now()
        self.frames_processed += 1
        self.last_result = result
        self.last_frame_index = pending.index
        self.last_update_time = t_done
        reference_time, reference = self._latency_reference(pending)
        record = FrameRecord.from_result(
            result,
            frame=pending.index,
            timestamp=pending.acquisition,
            wall_ms=(t_done - job.started) * 1000.0,
            latency_ms=(t_done - reference_time) * 1000.0,
            latency_reference=reference,
            queue_ms=(job.started - pending.arrival) * 1000.0,
            frames_received=self.frames_received,
            frames_processed=self.frames_processed,
            frames_dropped=self.frames_dropped,
        )
        record.stage_ms["mrml"] = write_ms
        record.extra.update(
            copy_ms=job.copy_ms, main_thread_ms=job.copy_ms + write_ms, pipeline_ms=job.pipeline_ms
        )
        self.kpi.add(record)
        if self.kpi_sink is not None:
            safe_log_kpi(record, self.kpi_sink)
        return True

    def _latency_reference(self, pending: _Pending) -> tuple[float, str]:
        """Start of the latency interval (Unix seconds) and its name (`SenderClock`)."""
        return self._clock.reference(pending.acquisition, pending.arrival)

    # -- reporting ------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {
            "received": self.frames_received,
            "processed": self.frames_processed,
            "dropped": self.frames_dropped,
            "skipped": self.frames_skipped,
        }

    def fps(self) -> float | None:
        """Processed frames per second over the KPI window."""
        return self.kpi.fps()


# -- replay -------------------------------------------------------------------------------------------

#: Node reference role from a working segmentation node to the sequence a replay fills.
REPLAY_SEQUENCE_REFERENCE_ROLE = "UltramotionIGT.replaySequence"


def _index_timestamp(value: str) -> float | None:
    try:
        stamp = float(value)
    except (TypeError, ValueError):
        return None
    return stamp if math.isfinite(stamp) else None


class ReplaySession:
    """Segment every frame of a volume sequence into a segmentation sequence; nothing is dropped.

    Args:
        sequence_node: vtkMRMLSequenceNode whose data nodes are one-slice volume nodes (a PLUS
            recording or any Sequences recording), or a vtkMRMLSequenceBrowserNode (its master
            sequence is used).
        output: vtkMRMLSegmentationNode (the working node, written frame by frame; the result
            sequence is created beside it, or reused when an earlier replay made it, and after the
            run the node becomes that sequence's proxy in the input's browser, if there is one), or
            a vtkMRMLSequenceNode to fill (a working segmentation node outside the scene is used).
        process_frame: as for `LiveSession` (frame index = item number, timestamp = the item's
            index value when numeric).
        progress_callback: ``(frames_done, frames_total)`` after each frame.
        kpi_sink: receives one ``"frame"`` record per frame and a ``"replay_done"`` summary.
        status_callback: called with the status message when the session finishes or stops.

    The output sequence has one segmentation per input item, at the same index value, with the
    input's index name, unit and type. Drive it with ``run()`` (all frames) or ``step()`` (one frame,
    e.g. from a QTimer so the GUI stays responsive).
    """

    def __init__(
        self,
        sequence_node: Any,
        output: Any,
        process_frame: ProcessFrame,
        progress_callback: Callable[[int, int], None] | None = None,
        kpi_sink: KpiSink | None = None,
        status_callback: Callable[[str], None] | None = None,
    ) -> None:
        if sequence_node is not None and sequence_node.IsA("vtkMRMLSequenceBrowserNode"):
            sequence_node = sequence_node.GetMasterSequenceNode()
        if sequence_node is None or not sequence_node.IsA("vtkMRMLSequenceNode"):
            raise ValueError("sequence_node must be a vtkMRMLSequenceNode (or a browser node playing one)")
        count = sequence_node.GetNumberOfDataNodes()
        if count == 0:
            raise ValueError(f"sequence {mrml._node_label(sequence_node)} is empty")
        first = sequence_node.GetNthDataNode(0)
        if first is None or not first.IsA("vtkMRMLVolumeNode"):
            kind = first.GetClassName() if first is not None else "nothing"
            raise ValueError(f"sequence {mrml._node_label(sequence_node)} holds {kind}, not volume frames")
        self.sequence_node = sequence_node
        self.scene = sequence_node.GetScene()
        self.process_frame = process_frame
        self.progress_callback = progress_callback
        self.kpi_sink = kpi_sink
        self.status_callback = status_callback
        self.frames_total = count
        self.frames_processed = 0
        self.frames_dropped = 0  # replay never drops; here for the `Session` protocol
        self.kpi = KpiAggregator(window=300)
        self.last_result: HostResult | None = None
        self.state = SessionState.IDLE
        self.status_message = "idle"

        import slicer

        if output is not None and output.IsA("vtkMRMLSequenceNode"):
            self.output_sequence = output
            self.output_segmentation_node = slicer.vtkMRMLSegmentationNode()
            self._proxy_in_scene = False
        elif output is not None and output.IsA("vtkMRMLSegmentationNode"):
            self.output_segmentation_node = output
            self._proxy_in_scene = output.GetScene() is not None
            self.output_sequence = output.GetNodeReference(REPLAY_SEQUENCE_REFERENCE_ROLE)
            if self.output_sequence is None:
                if self.scene is None:
                    raise ValueError("the input sequence is not in a scene: pass an output sequence node")
                self.output_sequence = self.scene.AddNewNodeByClass(
                    "vtkMRMLSequenceNode", f"{output.GetName() or 'Segmentation'} sequence"
                )
                output.SetNodeReferenceID(REPLAY_SEQUENCE_REFERENCE_ROLE, self.output_sequence.GetID())
        else:
            raise ValueError("output must be a vtkMRMLSegmentationNode or a vtkMRMLSequenceNode")
        self.output_sequence.RemoveAllDataNodes()
        self.output_sequence.SetIndexName(sequence_node.GetIndexName())
        self.output_sequence.SetIndexUnit(sequence_node.GetIndexUnit())
        self.output_sequence.SetIndexType(sequence_node.GetIndexType())
        self.writer: mrml.SegmentationWriter | None = None

    @property
    def progress(self) -> float:
        return self.frames_processed / self.frames_total

    @property
    def frames_received(self) -> int:
        """Items taken from the sequence so far (= processed: a replay drops nothing)."""
        return self.frames_processed

    @property
    def running(self) -> bool:
        return self.state.running

    def start(self) -> None:
        """`Session` protocol: mark the replay running; `step` processes the items one by one."""
        if self.state == SessionState.IDLE:
            self.state = SessionState.RUNNING
            self.status_message = f"replaying {self.frames_total} frames"

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def frames_in_flight(self) -> int:
        """Always 0: a replay processes each item within `step`."""
        return 0

    def step(self, wait: float | None = None) -> bool:
        """Process the next frame. Returns True when a frame was processed; False when finished,
        stopped or failed (never raises; see ``state`` and ``status_message``). ``wait``: unused
        (the `Session` protocol's; a replay step is synchronous)."""
        if self.done:
            return False
        self.start()
        index = self.frames_processed
        try:
            if self.sequence_node.GetScene() is None and self.scene is not None:
                self._finish(SessionState.STOPPED, "stopped: the input sequence was removed from the scene")
                return False
            if self._proxy_in_scene and self.output_segmentation_node.GetScene() is None:
                self._finish(
                    SessionState.STOPPED, "stopped: the output segmentation was removed from the scene"
                )
                return False
            volume = self.sequence_node.GetNthDataNode(index)
            value = self.sequence_node.GetNthIndexValue(index)
            geometry = mrml.geometry_from_volume(volume)
            if self.writer is None:
                self.writer = mrml.SegmentationWriter(
                    self.output_segmentation_node, geometry, create_display_node=self._proxy_in_scene
                )
            elif not geometry.is_same(self.writer.geometry):
                self.writer.set_geometry(geometry)
            t0 = time.perf_counter()
            result = self.process_frame(mrml.frame_from_volume(volume), index, _index_timestamp(value))
            t1 = time.perf_counter()
            self.writer.write(result)
            self.output_sequence.SetDataNodeAtValue(self.output_segmentation_node, value)
            t2 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - by contract: report and stop, never raise to the timer
            LOG.exception("replay: frame %d failed", index)
            self._finish(SessionState.ERROR, f"stopped: frame {index} failed: {type(exc).__name__}: {exc}")
            return False
        self.frames_processed += 1
        self.last_result = result
        record = FrameRecord.from_result(
            result, frame=index, index_value=str(value), wall_ms=(t2 - t0) * 1000.0
        )
        record.stage_ms["mrml"] = (t2 - t1) * 1000.0
        self.kpi.add(record)
        if self.kpi_sink is not None:
            safe_log_kpi(record, self.kpi_sink)
        if self.progress_callback is not None:
            try:
                self.progress_callback(self.frames_processed, self.frames_total)
            except Exception:  # noqa: BLE001 - a display callback must not break the replay
                LOG.exception("progress callback failed")
        if self.frames_processed == self.frames_total:
            self._attach_to_browser()
            self._finish(
                SessionState.FINISHED,
                f"done: {self.frames_total} frames segmented into {mrml._node_label(self.output_sequence)}",
            )
        return True

    def run(self) -> Any:
        """Process all remaining frames; returns the output vtkMRMLSequenceNode."""
        while self.step():
            pass
        return self.output_sequence

    def stop(self, reason: str = "stopped by user") -> None:
        if not self.done:
            self._finish(SessionState.STOPPED, reason)

    def _finish(self, state: SessionState, message: str) -> None:
        self.state = state
        self.status_message = message
        (LOG.error if state == SessionState.ERROR else LOG.info)("replay: %s", message)
        if self.kpi_sink is not None:
            safe_log_kpi(
                {
                    "event": "replay_done",
                    "state": state.value,
                    "message": message,
                    "frames": self.frames_processed,
                    "total": self.frames_total,
                    **self.kpi.summary(),
                },
                self.kpi_sink,
            )
        if self.status_callback is not None:
            try:
                self.status_callback(message)
            except Exception:  # noqa: BLE001
                LOG.exception("status callback failed")

    def _attach_to_browser(self) -> None:
        """Let the input's sequence browser play the result with the working node as its proxy."""
        if self.scene is None or not self._proxy_in_scene:
            return
        for browser in mrml.browser_nodes_for_sequence(self.scene, self.sequence_node):
            if not browser.IsSynchronizedSequenceNode(self.output_sequence, True):
                browser.AddSynchronizedSequenceNodeID(self.output_sequence.GetID())
            if browser.GetProxyNode(self.output_sequence) is not self.output_segmentation_node:
                browser.AddProxyNode(self.output_segmentation_node, self.output_sequence, False)
            # the transform of the proxy volume (e.g. ImageToReference from PLUS) applies to the masks
            proxy_volume = browser.GetProxyNode(self.sequence_node)
            if proxy_volume is not None:
                self.output_segmentation_node.SetAndObserveTransformNodeID(proxy_volume.GetTransformNodeID())


def replay_sequence(
    sequence_node: Any,
    output: Any,
    process_frame: ProcessFrame,
    progress_callback: Callable[[int, int], None] | None = None,
    kpi_sink: KpiSink | None = None,
) -> Any:
    """Run a `ReplaySession` to the end and return the output vtkMRMLSequenceNode.

    Raises `RuntimeError` with the session's status message when it did not finish.
    """
    session = ReplaySession(sequence_node, output, process_frame, progress_callback, kpi_sink)
    out = session.run()
    if session.state != SessionState.FINISHED:
        raise RuntimeError(f"replay did not finish: {session.status_message}")
    return out
