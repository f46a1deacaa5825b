"""The OpenIGTLink gateway (``ultramotion-igt serve``): frames from a PLUS server in, label maps out.

::

    PLUS server ----> IgtlClient -----> mailbox -----> worker -----------> IgtlServer -----> Slicer
      (18944)      receive thread     (1 slot,      Pipeline, one      per-client queues    (18945)
                   decode, validate   newest wins)  frame at a time    (newest wins)

Threads and what never waits for what:

- The receive thread (`IgtlClient`) decodes, validates and puts each frame into a one-slot
  mailbox; a frame still waiting there is replaced and counted as dropped (``superseded``). It
  never waits for inference. TRANSFORMs go into a short per-name history.
- The worker runs one frame at a time through `Pipeline.process_frame` and
  `ResultPacket.to_host`, builds the frame's messages (see `UltramotionIGTLib.services.protocol`)
  and hands them to the server, which only queues them: a slow or stalled client loses its oldest
  queued frames (counted), and is disconnected when it accepts nothing for ``send_timeout_s``. It
  never blocks inference. With ``record_dir`` the worker also writes the frame (`recorder`).
- PLUS going away is logged and retried with backoff; clients come and go at any time.

Every IMAGE message received is accounted for: ``frames_in`` (valid frames of the segmented
device) = ``processed`` + ``dropped`` (by cause: ``superseded``, ``pipeline_error``,
``shutdown``), and other IMAGEs are ``rejected`` by reason (``rf_data``, ``volume_3d``,
``pixel_type``, ``zero_size``, ``components``, ``other_device``). Bytes that are not usable
messages are counted by `BadMessage` reason; messages of types the gateway does not use (STRING,
POINT, STATUS ...) are counted as ``ignored``. `Gateway.stats` returns all counters.

Geometry: the label map is sent with the input IMAGE's own matrix (as received, float32 on the
wire as in every OpenIGTLink IMAGE) and size, so it lies voxel for voxel on its frame. Like
Slicer's OpenIGTLink converter, the gateway reads that matrix as IJK-to-RAS whatever the message's
coordinate-system flag says (the flag is echoed); target points are computed in the same space.

Latency: ``latency_ms`` in the KPI record runs from the sender's timestamp (the input IMAGE's header
timestamp) to the moment the frame's messages are queued for the clients. A sender on another clock
(farther than `SAME_CLOCK_TOLERANCE_S` from arrival time) is aligned by the smallest offset seen,
as `LiveSession` does; ``latency_reference`` says which rule applied.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter, deque
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from UltramotionIGTLib.core.intensity import NonFiniteFrameError
from UltramotionIGTLib.core.kpi import (
    FrameRecord,
    KpiAggregator,
    SenderClock,
    format_kpi,
)
from UltramotionIGTLib.core.mailbox import LatestFrameMailbox
from UltramotionIGTLib.errors import InputFileError, UltramotionError
from UltramotionIGTLib.services import protocol
from UltramotionIGTLib.services.igtl import BadMessage, IgtlClient, IgtlServer, crc_is_native, pyigtl_module

LOG = logging.getLogger("UltramotionIGTLib.services.gateway")

#: Metadata keys that carry the ultrasound image type (PLUS frame field ``UltrasoundImageType``).
IMAGE_TYPE_KEYS = ("UltrasoundImageType", "ImageType", "US_IMG_TYPE")


@dataclass
class GatewayConfig:
    """Gateway settings (the ``serve`` options).

    ``plus_host``/``plus_port``: the PLUS server to connect to. ``listen_host``/``listen_port``:
    where clients connect (port 0: a free port, see `Gateway.listen_port`). ``input_name``: the
    IMAGE device to segment (None: the first one received). ``output_name``: device name of the
    label map (None: ``<input>_Segmentation``). ``pose_transform``: the TRANSFORM echoed as the
    frame's pose (None: the first TRANSFORM name received). ``record_dir``: write ``run``'s outputs
    there as frames arrive (a folder, or a `tools.outputs.OutputFolder` already checked and locked;
    a folder with an earlier run's results is refused unless ``record_overwrite``). ``sync_audit``: count host syncs per frame into the KPI record
    (`RuntimeTransferAudit` without profiler). ``client_queue``: frames queued per client before
    the oldest is dropped. ``send_timeout_s``: a client that accepts no data this long is
    disconnected. ``plus_idle_timeout_s``: reconnect to PLUS after this long without data (None:
    never). ``plus_retry_max_s``: longest wait between connection attempts (backoff from 0.1 s).
    ``check_crc``: verify incoming CRC-64. ``max_frames``: process this many frames, then take no
    more (`Gateway.finished` is set; later frames count as dropped when the gateway stops).
    """

    plus_host: str = "localhost"
    plus_port: int = protocol.DEFAULT_PLUS_PORT
    listen_host: str = "127.0.0.1"
    listen_port: int = protocol.DEFAULT_LISTEN_PORT
    input_name: str | None = None
    output_name: str | None = None
    pose_transform: str | None = None
    record_dir: Any = None
    record_overwrite: bool = False
    sync_audit: bool = False
    client_queue: int = 2
    send_timeout_s: float = 5.0
    plus_idle_timeout_s: float | None = None
    plus_retry_max_s: float = 2.0
    check_crc: bool = True
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.output_name is not None:
            raw = self.output_name.encode("utf-8")
            if not raw or len(raw) > protocol.MAX_DEVICE_NAME_BYTES:
                raise InputFileError(
                    f"output name {self.output_name!r} must be 1..{protocol.MAX_DEVICE_NAME_BYTES} bytes "
                    "(the OpenIGTLink device name field)"
                )
        for name, port in (("PLUS", self.plus_port), ("listen", self.listen_port)):
            if not 0 <= int(port) <= 65535:
                raise InputFileError(f"{name} port {port} is not a TCP port (0..65535)")


@dataclass
class InputFrame:
    """A validated frame from the input stream.

    ``index``: arrival number among valid frames (0-based). ``image``: HxW or HxWx3 uint8 (host).
    ``ijk_to_ras``: 4x4 float64, the IMAGE's matrix as received. ``timestamp``: the sender's header
    timestamp (s). ``arrival``: Unix time at decode; ``arrival_perf``: `time.perf_counter` then.
    """

    index: int
    device_name: str
    image: np.ndarray
    ijk_to_ras: np.ndarray
    coordinate_system: str
    timestamp: float
    metadata: dict[str, str]
    arrival: float
    arrival_perf: float


class PoseHistory:
    """The last ``depth`` matrices of each TRANSFORM device name, with their sender timestamps."""

    def __init__(self, depth: int = 64) -> None:
        self.depth = depth
        self._lock = threading.Lock()
        self._history: dict[str, deque[tuple[float, np.ndarray]]] = {}

    def add(self, name: str, timestamp: float, matrix: np.ndarray) -> None:
        with self._lock:
            self._history.setdefault(name, deque(maxlen=self.depth)).append(
                (float(timestamp), np.asarray(matrix, dtype=np.float64))
            )

    def names(self) -> list[str]:
        with self._lock:
            return list(self._history)

    def nearest(self, name: str, timestamp: float) -> tuple[np.ndarray, float] | None:
        """(matrix, its timestamp) of the entry of ``name`` nearest in time to ``timestamp``, or None."""
        with self._lock:
            entries = list(self._history.get(name, ()))
        if not entries:
            return None
        stamp, matrix = min(entries, key=lambda e: abs(e[0] - timestamp))
        return matrix, stamp


class RateMeter:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self, t: float | None = None) -> None:
        t = time.perf_counter() if t is None else t
        with self._lock:
            self._times.append(t)
            self._trim(t)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()

    def rate(self, now: float | None = None) -> float | None:
        """Events per second between the first and last event of the window; 0.0 when the window is
        empty, None with a single event (no interval yet)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            self._trim(now)
            n = len(self._times)
            if n == 0:
                return 0.0
            span = self._times[-1] - self._times[0]
        return (n - 1) / span if n > 1 and span > 0 else None


@dataclass
class GatewayStats:
    """Counters (thread-safe through `Gateway`'s lock). See the module docstring for their meaning."""

    messages: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    frames_in: int = 0
    processed: int = 0
    sent: int = 0
    unsent: int = 0
    client_drops: int = 0
    pose: Counter = field(default_factory=Counter)
    host_syncs: int = 0
    record_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages_received": dict(self.messages),
            "bad_messages": dict(self.bad),
            "ignored": dict(self.ignored),
            "rejected": dict(self.rejected),
            "frames_in": self.frames_in,
            "processed": self.processed,
            "dropped": sum(self.dropped.values()),
            "dropped_by_cause": dict(self.dropped),
            "sent": self.sent,
            "processed_without_client": self.unsent,
            "client_drops": self.client_drops,
            "pose": dict(self.pose),
            "host_syncs": self.host_syncs,
            "record_errors": self.record_errors,
        }


class _Throttle:
    """Logs the first occurrence of each key, then at most one line per ``interval_s`` with a count."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._seen: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: Any, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, count = self._seen.get(key, (None, 0))
            count += 1
            if last is not None and now - last < self.interval_s:
                self._seen[key] = (last, count)
                return
            self._seen[key] = (now, 0)
        suffix = f" ({count - 1} more since the last report)" if last is not None and count > 1 else ""
        LOG.log(level, msg + suffix, *args)


def frame_from_image_message(
    message: Any, index: int, arrival: float, arrival_perf: float
) -> tuple[InputFrame | None, str, str]:
    """Validate a decoded IMAGE message as a frame to segment: (frame, "", "") or (None, reason, detail).

    Accepted: a 2-D image (one slice), uint8, 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped)
    components, not RF data (metadata `IMAGE_TYPE_KEYS` starting with ``RF``). Reasons: ``rf_data``,
    ``volume_3d``, ``zero_size``, ``components``, ``pixel_type``.
    """
    metadata = {str(k): str(v) for k, v in (getattr(message, "metadata", None) or {}).items()}
    for key in IMAGE_TYPE_KEYS:
        value = metadata.get(key, "")
        if value.strip().upper().startswith("RF"):
            return None, "rf_data", f"{key} = {value}: RF data is not an image to segment"
    image = np.asarray(message.image)
    if image.ndim == 3:
        image = image[..., np.newaxis]
    if image.ndim != 4:
        return None, "malformed", f"image array of shape {image.shape}"
    k, h, w, c = image.shape
    if min(k, h, w, c) == 0:
        return None, "zero_size", f"image of size {w} x {h} x {k} with {c} components"
    if k != 1:
        return None, "volume_3d", f"3-D volume of {k} slices ({w} x {h}): the gateway segments 2-D frames"
    if c not in (1, 3, 4):
        return None, "components", f"{c} components per pixel; 1 (grey), 3 (RGB) or 4 (RGBA) are segmented"
    if image.dtype != np.uint8:
        return (
            None,
            "pixel_type",
            f"{image.dtype} pixels: the gateway segments 8-bit brightness (B-mode) images",
        )
    frame = image[0, :, :, 0] if c == 1 else image[0, :, :, :3]
    matrix = np.asarray(message.ijk_to_world_matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        return None, "malformed", "IMAGE matrix is not a finite 4x4 matrix"
    return (
        InputFrame(
            index=index,
            device_name=str(message.device_name),
            image=np.array(frame, copy=True),  # pyigtl's array is a read-only view of the message body
            ijk_to_ras=matrix,
            coordinate_system=str(getattr(message, "world_coordinate_system", "ras")),
            timestamp=float(message.timestamp),
            metadata=metadata,
            arrival=arrival,
            arrival_perf=arrival_perf,
        ),
        "",
        "",
    )


def frame_kpi_record(
    result: Any,
    frame: InputFrame,
    *,
    gateway_ms: dict[str, float],
    latency_ms: float,
    latency_reference: str,
    fps_in: float | None,
    fps_out: float | None,
    stats: dict[str, Any],
    sync_kpi: dict[str, Any],
    pose: dict[str, Any] | None,
) -> FrameRecord:
    """The frame's `FrameRecord`: sent as the ``<output>_KPI`` STRING and written to ``kpi.jsonl``.

    The pipeline's part comes from the result (``frame``, ``device``, ``path``, ``targets``,
    ``stage_ms``, tensor devices); the gateway adds ``timestamp`` (sender's, s), ``latency_ms`` +
    ``latency_reference`` (end to end, see the module docstring), ``queue_ms``, the stream counters
    (``frames_received``/``frames_processed``/``frames_dropped``), ``host_syncs``/``declared_hops``
    when counted, and in ``extra``: ``source`` (input device), ``gateway_ms`` (``queue``: arrival to
    start of processing, ``pipeline``: process + host copy, ``encode``: label map and messages,
    ``total``: arrival to queued for the clients), ``fps_in``/``fps_out`` (over the last 2 s),
    ``dropped_by_cause``, ``rejected``, ``client_drops`` and ``pose`` (transform name and time offset
    to the frame, ms).
    """
    return FrameRecord.from_result(
        result,
        frame=frame.index,
        timestamp=frame.timestamp,
        wall_ms=gateway_ms["pipeline"] + gateway_ms["encode"],
        latency_ms=latency_ms,
        latency_reference=latency_reference,
        queue_ms=gateway_ms["queue"],
        frames_received=stats["frames_in"],
        frames_processed=stats["processed"],
        frames_dropped=stats["dropped"],
        host_syncs=sync_kpi.get("host_syncs"),
        declared_hops=sync_kpi.get("declared_hops"),
        extra={
            "source": frame.device_name,
            "gateway_ms": gateway_ms,
            "fps_in": fps_in,
            "fps_out": fps_out,
            "dropped_by_cause": stats["dropped_by_cause"],
            "rejected": stats["rejected"],
            "client_drops": stats["client_drops"],
            "pose": pose,
        },
    )


_POINT_MESSAGE_CLASS: type | None = None


def _point_message_class() -> type:
    """pyigtl's POINT, allowed to carry zero points (a frame without targets clears the list)."""
    global _POINT_MESSAGE_CLASS
    if _POINT_MESSAGE_CLASS is None:
        base = pyigtl_module().PointMessage

        class TargetPointMessage(base):
            def _pack_content(self) -> bytes:
                if self.positions is None or len(self.positions) == 0:
                    return b""
                return super()._pack_content()

        _POINT_MESSAGE_CLASS = TargetPointMessage
    return _POINT_MESSAGE_CLASS


class Gateway:
    """PLUS in, pipeline, label maps out; start and stop it in-process.

    >>> with Gateway(pipeline, GatewayConfig(plus_port=18944, listen_port=18945)) as gw:
    ...     time.sleep(10); print(gw.status_line())

    ``pipeline``: a `UltramotionIGTLib.core.pipeline.Pipeline` (its tracker is reset at start).
    ``source``: text for the record's ``source`` field. `start` binds the listening port (raises
    `UltramotionError` when it is taken) and returns at once; `stop` returns the summary.
    """

    def __init__(self, pipeline: Any, config: GatewayConfig | None = None, source: str = "") -> None:
        self.pipeline = pipeline
        self.config = config or GatewayConfig()
        self.source = source or f"OpenIGTLink {self.config.plus_host}:{self.config.plus_port}"
        self._lock = threading.Lock()
        self._stats = GatewayStats()
        self._mailbox = LatestFrameMailbox()
        self._poses = PoseHistory()
        self._clock = SenderClock()
        self._rate_in = RateMeter()
        self._rate_out = RateMeter()
        self._kpi = KpiAggregator(window=300)
        self._throttle = _Throttle()
        self._stopping = threading.Event()
        #: set once ``config.max_frames`` frames were processed
        self.finished = threading.Event()
        self._input_name = self.config.input_name
        self._pose_name = self.config.pose_transform
        self._names: protocol.OutputNames | None = None
        self._frame_counter = 0
        self._table: Any = None
        self._recorder: Any = None
        self._worker: threading.Thread | None = None
        self._started_at: float | None = None
        self._summary: dict[str, Any] | None = None
        self.server = IgtlServer(
            self.config.listen_port,
            self.config.listen_host,
            name="gateway",
            on_message=self._on_client_message,
            queue_limit=self.config.client_queue,
            send_timeout_s=self.config.send_timeout_s,
        )
        self.plus = IgtlClient(
            self.config.plus_host,
            self.config.plus_port,
            name="PLUS",
            on_message=self._on_plus_message,
            idle_timeout_s=self.config.plus_idle_timeout_s,
            backoff_max_s=self.config.plus_retry_max_s,
            check_crc=self.config.check_crc,
        )

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> Gateway:
        from UltramotionIGTLib.core.packet import SegmentTable

        if self._worker is not None:
            raise RuntimeError("the gateway was already started")
        if self.config.check_crc and not crc_is_native():
            LOG.warning("crcmod has no C extension here: checking CRC-64 costs ~1 s per MB of image")
        try:
            self.server.start()
        except OSError as exc:
            raise UltramotionError(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port} ({exc.strerror or exc}): "
                "is another gateway running? choose another --listen port"
            ) from exc
        self.pipeline.reset()
        self._table = SegmentTable()
        if self.config.record_dir is not None:
            from UltramotionIGTLib.services.recorder import StreamRecorder

            try:
                self._recorder = StreamRecorder(
                    self.config.record_dir,
                    self.source,
                    self.pipeline.describe(),
                    overwrite=self.config.record_overwrite,
                )
            except UltramotionError:
                self.server.stop()
                raise
            except OSError as exc:
                self.server.stop()
                raise UltramotionError(f"cannot record into {self.config.record_dir}: {exc}") from exc
        self._started_at = time.perf_counter()
        self._worker = threading.Thread(target=self._work, name="gateway-worker", daemon=True)
        self._worker.start()
        self.plus.start()
        LOG.info(
            "gateway: PLUS %s -> pipeline on %s -> clients on %s:%d",
            self.plus.address,
            self.pipeline.device,
            self.config.listen_host,
            self.listen_port,
        )
        return self

    @property
    def started(self) -> bool:
        return self._worker is not None

    @property
    def listen_port(self) -> int:
        """The port clients connect to (the bound one when the config asked for port 0)."""
        return int(self.server.port if self.server.port is not None else self.config.listen_port)

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop receiving, finish the frame in progress, close clients and ``record_dir``; the summary."""
        if self._summary is not None:
            return self._summary
        if not self.started:
            raise RuntimeError("the gateway was not started")
        self._stopping.set()
        self.plus.stop()
        if self._worker is not None:
            self._worker.join(timeout)
        leftover = self._mailbox.take(timeout=0)
        if leftover is not None:
            with self._lock:
                self._stats.dropped["shutdown"] += 1
        self.server.stop()
        summary = self.summary()
        if self._recorder is not None:
            try:
                self._recorder.close(summary)
            except Exception as exc:  # noqa: BLE001 - report, but the stop itself must complete
                LOG.error("could not finish the recording in %s: %s", self.config.record_dir, exc)
                summary["record_error"] = str(exc)
        self._summary = summary
        LOG.info("gateway stopped: %s", self.status_line())
        return summary

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- input ---------------------------------------------------------------------------------------
    def _on_plus_message(self, item: Any) -> None:
        if isinstance(item, BadMessage):
            with self._lock:
                self._stats.bad[item.reason] += 1
            self._throttle(
                ("bad", item.reason), logging.WARNING, "bad data from PLUS (%s): %s", item.reason, item.detail
            )
            return
        mtype, name = item.message_type, item.device_name
        with self._lock:
            self._stats.messages[mtype] += 1
        if mtype == "TRANSFORM":
            self._poses.add(name, item.timestamp, item.matrix)
            if self._pose_name is None:
                self._pose_name = name
                LOG.info(
                    "pose transform: %s (the first TRANSFORM received; choose with --pose-transform)", name
                )
            return
        if mtype != "IMAGE":
            with self._lock:
                self._stats.ignored[mtype] += 1
            self._throttle(
                ("ignored", mtype),
                logging.INFO,
                "ignoring %s messages (the gateway uses IMAGE and TRANSFORM)",
                mtype,
            )
            return
        if self._input_name is None:
            self._input_name = name
            LOG.info("segmenting IMAGE device %r (the first one received; choose with --input-name)", name)
        if name != self._input_name:
            self._reject("other_device", name, f"not the segmented device {self._input_name!r}")
            return
        now, now_perf = time.time(), time.perf_counter()
        with self._lock:
            index = self._frame_counter
        frame, reason, detail = frame_from_image_message(item, index, now, now_perf)
        if frame is None:
            self._reject(reason, name, detail)
            return
        with self._lock:
            self._frame_counter += 1
            self._stats.frames_in += 1
        self._rate_in.add(now_perf)
        if self._mailbox.put(frame) is not None:
            with self._lock:
                self._stats.dropped["superseded"] += 1

    def _reject(self, reason: str, device: str, detail: str) -> None:
        with self._lock:
            self._stats.rejected[reason] += 1
        self._throttle(
            ("rejected", reason, device),
            logging.WARNING,
            "IMAGE %r rejected (%s): %s",
            device,
            reason,
            detail,
        )

    def _on_client_message(self, connection: Any, item: Any) -> None:
        key = item.reason if isinstance(item, BadMessage) else item.message_type
        self._throttle(("client", key), logging.DEBUG, "ignoring %s from client %s", key, connection.peer)

    # -- processing ----------------------------------------------------------------------------------
    def _work(self) -> None:
        with ExitStack() as stack:
            audit = None
            if self.config.sync_audit:
                from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

                try:
                    audit = stack.enter_context(
                        RuntimeTransferAudit(self.pipeline.device, cuda_profiler=False)
                    )
                except RuntimeError as exc:  # one audit per process: another one is active, go on without
                    LOG.warning("host syncs are not counted: %s", exc)
            limit = self.config.max_frames
            while not self._stopping.is_set():
                if limit is not None and self._stats.processed >= limit:
                    self.finished.set()
                    break
                frame = self._mailbox.take(timeout=0.1)
                if frame is None:
                    continue
                try:
                    self._process(frame, audit)
                except NonFiniteFrameError as exc:  # reported and skipped: nothing to segment
                    with self._lock:
                        self._stats.dropped["non_finite"] += 1
                    self._throttle(("non_finite",), logging.WARNING, "frame %d skipped: %s", frame.index, exc)
                except Exception as exc:  # noqa: BLE001 - one failed frame is counted, the stream goes on
                    with self._lock:
                        self._stats.dropped["pipeline_error"] += 1
                    self._throttle(
                        ("pipeline", type(exc).__name__),
                        logging.ERROR,
                        "frame %d failed: %s: %s",
                        frame.index,
                        type(exc).__name__,
                        exc,
                    )

    def _process(self, frame: InputFrame, audit: Any) -> None:
        """One frame: pipeline, messages, queued for the clients, recorded. Raises on failure."""
        t_start = time.perf_counter()
        with audit.frame(frame.index) if audit is not None else nullcontext():
            # mm per pixel from the IMAGE's matrix: the visibility stage's widths are in mm
            spacing = np.linalg.norm(np.asarray(frame.ijk_to_ras, dtype=np.float64)[:3, :2], axis=0)
            packet = self.pipeline.process_frame(
                frame.image,
                frame.index,
                frame.timestamp,
                spacing=tuple(spacing) if np.all(spacing > 0) else None,
            )
            result = packet.to_host()
        t_host = time.perf_counter()
        sync_kpi: dict[str, Any] = {}
        if audit is not None and audit.last_frame is not None:
            sync_kpi = audit.last_frame.kpi()
            audit.keep_last_frame_only()  # a long-running service keeps counts, not every record
        labelmap = self._table.labelmap(result)
        names = self._output_names(frame.device_name)
        segments = self._segments(result)
        pose = self._pose_for(frame)
        transform_msg, image_msg, points_msg = self._result_messages(
            frame, result, labelmap, segments, names, pose
        )
        payload = [
            transform_msg.pack() if transform_msg is not None else b"",
            image_msg.pack(),
            points_msg.pack(),
        ]
        t_encoded = time.perf_counter()

        now_perf = time.perf_counter()
        reference, reference_name = self._clock.reference(frame.timestamp, frame.arrival)
        latency_ms = (time.time() - reference) * 1000.0
        gateway_ms = {
            "queue": (t_start - frame.arrival_perf) * 1000.0,
            "pipeline": (t_host - t_start) * 1000.0,
            "encode": (t_encoded - t_host) * 1000.0,
            "total": (now_perf - frame.arrival_perf) * 1000.0,
        }
        with self._lock:
            self._stats.processed += 1
            self._stats.host_syncs += int(sync_kpi.get("host_syncs", 0))
            if pose is not None:
                self._stats.pose["echoed"] += 1
            else:
                self._stats.pose["missing"] += 1
            stats = self._stats.to_dict()
        self._rate_out.add(now_perf)
        record = frame_kpi_record(
            result,
            frame,
            gateway_ms=gateway_ms,
            latency_ms=latency_ms,
            latency_reference=reference_name,
            fps_in=self._rate_in.rate(now_perf),
            fps_out=self._rate_out.rate(now_perf),
            stats=stats,
            sync_kpi=sync_kpi,
            pose=None if pose is None else {"name": pose[0], "dt_ms": (pose[2] - frame.timestamp) * 1000.0},
        )
        kpi_msg = pyigtl_module().StringMessage(
            format_kpi(record), timestamp=frame.timestamp, device_name=names.kpi
        )
        kpi_msg.header_version = 2
        payload.append(kpi_msg.pack())
        queued, dropped = self.server.broadcast(b"".join(payload))
        with self._lock:
            if queued:
                self._stats.sent += 1
            else:
                self._stats.unsent += 1
            self._stats.client_drops += dropped
        self._kpi.add(record)
        if self._recorder is not None:
            try:
                self._recorder.write_frame(
                    frame, result, labelmap, self._table.segments(), record, None if pose is None else pose[1]
                )
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the live stream
                with self._lock:
                    self._stats.record_errors += 1
                self._throttle(
                    ("record",), logging.ERROR, "recording failed: %s: %s", type(exc).__name__, exc
                )

    def _output_names(self, input_name: str) -> protocol.OutputNames:
        if self._names is None:
            wanted = self.config.output_name or protocol.default_output_name(input_name)
            names = protocol.output_names(wanted)
            if (names.image, names.targets, names.kpi) != (
                wanted,
                wanted + protocol.TARGETS_SUFFIX,
                wanted + protocol.KPI_SUFFIX,
            ):
                LOG.warning(
                    "OpenIGTLink device names are at most %d bytes: sending IMAGE/TRANSFORM %r, POINT %r, "
                    "STRING %r (choose a shorter --output-name to change them)",
                    protocol.MAX_DEVICE_NAME_BYTES,
                    names.image,
                    names.targets,
                    names.kpi,
                )
            self._names = names
        return self._names

    def _segments(self, result: Any) -> list[protocol.LabelSegment]:
        """The segments present in ``result`` with their stable label values (highest score wins a value)."""
        by_value: dict[int, protocol.LabelSegment] = {}
        colors = result.segment_colors()
        for i, name in enumerate(result.segment_names()):
            value = self._table.value_for(name, colors[i])
            seg = protocol.LabelSegment(
                value=value,
                name=name,
                color=tuple(float(c) for c in colors[i]),
                class_name=result.class_name(i),
                track_id=int(result.track_ids[i]),
                score=float(result.scores[i]),
            )
            if value not in by_value or seg.score > by_value[value].score:
                by_value[value] = seg
        return [by_value[v] for v in sorted(by_value)]

    def _pose_for(self, frame: InputFrame) -> tuple[str, np.ndarray, float] | None:
        name = self._pose_name
        if name is None:
            return None
        found = self._poses.nearest(name, frame.timestamp)
        if found is None:
            return None
        return name, found[0], found[1]

    def _result_messages(
        self,
        frame: InputFrame,
        result: Any,
        labelmap: np.ndarray,
        segments: list[protocol.LabelSegment],
        names: protocol.OutputNames,
        pose: tuple[str, np.ndarray, float] | None,
    ) -> tuple[Any, Any, Any]:
        """The frame's TRANSFORM (None without a pose), IMAGE and POINT messages (pyigtl)."""
        pyigtl = pyigtl_module()

        transform = None
        if pose is not None:
            transform = pyigtl.TransformMessage(pose[1], timestamp=pose[2], device_name=names.transform)
            transform.header_version = 2
            transform.metadata = {
                "SourceTransform": pose[0],
                protocol.META_SOURCE_TIMESTAMP: repr(frame.timestamp),
            }
        metadata = protocol.segments_to_metadata(segments)
        metadata.update(
            {
                protocol.META_CLASS_NAMES: json.dumps(list(result.class_names)),
                protocol.META_FRAME_NUMBER: str(frame.index),
                protocol.META_SOURCE_DEVICE: frame.device_name,
                protocol.META_SOURCE_TIMESTAMP: repr(frame.timestamp),
                protocol.META_POSE_TRANSFORM: pose[0] if pose is not None else "",
                protocol.META_TARGETS_DEVICE: names.targets,
                protocol.META_KPI_DEVICE: names.kpi,
            }
        )
        if "Timestamp" in frame.metadata:  # PLUS's own frame timestamp travels on unchanged
            metadata["Timestamp"] = frame.metadata["Timestamp"]
        image = pyigtl.ImageMessage(
            labelmap[np.newaxis],
            ijk_to_world_matrix=frame.ijk_to_ras,
            world_coordinate_system=frame.coordinate_system,
            timestamp=frame.timestamp,
            device_name=names.image,
        )
        image.header_version = 2
        image.metadata = metadata

        centroids = np.asarray(result.centroids, dtype=np.float64).reshape(-1, 2)
        finite = np.isfinite(centroids).all(axis=1)
        ijk = np.zeros((int(finite.sum()), 4))
        ijk[:, :2] = centroids[finite]
        ijk[:, 3] = 1.0
        ras = (ijk @ frame.ijk_to_ras.T)[:, :3]
        seg_names = [n for n, ok in zip(result.segment_names(), finite, strict=True) if ok]
        colors = [c for c, ok in zip(result.segment_colors(), finite, strict=True) if ok]
        points = _point_message_class()(
            positions=ras if len(ras) else None,
            names=seg_names or None,
            rgba_colors=[[int(round(v * 255)) for v in c] + [255] for c in colors] or None,
            owners=names.image,
            timestamp=frame.timestamp,
            device_name=names.targets,
        )
        points.header_version = 2
        return transform, image, points

    # -- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """All counters, connection state and rates now (a snapshot, plain values)."""
        with self._lock:
            out = self._stats.to_dict()
        now = time.perf_counter()
        out.update(
            {
                "fps_in": self._rate_in.rate(now),
                "fps_out": self._rate_out.rate(now),
                "latency_ms": {**self._kpi.stage_ms(), "end_to_end": self._kpi.end_to_end_ms()},
                "plus": {
                    "address": self.plus.address,
                    "connected": self.plus.connected,
                    "connects": self.plus.connects,
                    "disconnects": self.plus.disconnects,
                    "failed_attempts": self.plus.failed_attempts,
                },
                "clients": {
                    "connected": len(self.server.connections),
                    "connects": self.server.connects,
                    "disconnects": dict(self.server.disconnects),
                    "dropped_payloads": self.server.payloads_dropped,
                },
                "input_name": self._input_name,
                "output_names": None if self._names is None else vars(self._names),
                "pose_transform": self._pose_name,
            }
        )
        return out

    def status_line(self) -> str:
        """One line: fps in/out, end-to-end latency p50/p95, drops, rejects, bad data, connections."""
        s = self.stats()
        e2e = s["latency_ms"].get("end_to_end", {})

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped_by_cause"].items()))
        parts = [
            f"in {s['fps_in'] or 0.0:.1f} fps",
            f"out {s['fps_out'] or 0.0:.1f} fps",
            f"latency p50 {ms(e2e.get('p50'))} ms p95 {ms(e2e.get('p95'))} ms",
            f"frames {s['processed']}/{s['frames_in']}",
            f"dropped {s['dropped']}" + (f" ({drops})" if drops else ""),
        ]
        if s["rejected"]:
            parts.append("rejected " + ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items())))
        if s["bad_messages"]:
            parts.append("bad " + ", ".join(f"{k} {v}" for k, v in sorted(s["bad_messages"].items())))
        if s["client_drops"]:
            parts.append(f"client drops {s['client_drops']}")
        parts.append("PLUS " + ("connected" if s["plus"]["connected"] else "waiting"))
        parts.append(f"clients {s['clients']['connected']}")
        return " | ".join(parts)

    def summary(self) -> dict[str, Any]:
        """``run``'s summary fields (frames, fps, latency, host syncs, segments) plus the gateway's counters."""
        s = self.stats()
        wall_s = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        processed = s["processed"]
        segments = self._table.segments() if self._table is not None else []
        return {
            "source": self.source,
            "device": str(self.pipeline.device),
            "path": self.pipeline.path,
            "frames_in": s["frames_in"],
            "frames_out": processed,
            "dropped": s["dropped"],
            "wall_s": wall_s,
            "fps": processed / wall_s if wall_s > 0 else None,
            "latency_ms": s["latency_ms"],
            "host_syncs_per_frame": (s["host_syncs"] / processed)
            if (processed and self.config.sync_audit)
            else None,
            "segments": [{"value": v, "name": n, "color": list(c)} for v, n, c in segments],
            "gateway": s,
        }


# -- command line ------------------------------------------------------------------------------------


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        value = int(port)
    except ValueError:
        raise InputFileError(f"--plus {text!r}: expected HOST:PORT, e.g. localhost:18944") from None
    if not host or not 0 < value <= 65535:
        raise InputFileError(f"--plus {text!r}: expected HOST:PORT with a port 1..65535")
    return host, value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser``."""
    from UltramotionIGTLib.tools.options import (
        add_model_arguments,
        add_pipeline_arguments,
        add_sync_audit_argument,
        positive_float,
        positive_int,
    )

    parser.description = (
        "OpenIGTLink gateway: receive IMAGE (+ TRANSFORM) from a PLUS server (or replay a recording with the "
        "built-in simulator), segment each frame, serve label maps, target points and KPIs to Slicer or any "
        "OpenIGTLink client. Models: default the shipped demo pack."
    )

    src = parser.add_argument_group("input (one of)")
    one = src.add_mutually_exclusive_group()  # argparse refuses --plus with --replay in one line
    one.add_argument(
        "--plus",
        default=f"localhost:{protocol.DEFAULT_PLUS_PORT}",
        metavar="HOST:PORT",
        help=f"PLUS server to receive IMAGE/TRANSFORM from (default localhost:{protocol.DEFAULT_PLUS_PORT})",
    )
    one.add_argument(
        "--replay",
        metavar="FILE",
        help="built-in PLUS simulator: stream this recording (.igs.mha/.igs.nrrd ...) instead of --plus",
    )
    src.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="HZ",
        help="replay rate (default: the recording's own timing)",
    )
    src.add_argument("--replay-passes", type=int, default=0, help="times through the recording (0 = forever)")
    src.add_argument(
        "--replay-port", type=int, default=0, help="simulator port on 127.0.0.1 (0: any free port)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--listen",
        type=int,
        default=protocol.DEFAULT_LISTEN_PORT,
        metavar="PORT",
        help=f"port Slicer / OpenIGTLink clients connect to (default {protocol.DEFAULT_LISTEN_PORT})",
    )
    out.add_argument(
        "--listen-host",
        default="127.0.0.1",
        help="interface to listen on (127.0.0.1; 0.0.0.0 for Slicer on another machine)",
    )
    out.add_argument(
        "--input-name", default=None, help="IMAGE device to segment (default: the first received)"
    )
    out.add_argument(
        "--output-name",
        default=None,
        help="label map device name (default: <input device name>_Segmentation)",
    )
    out.add_argument(
        "--pose-transform",
        default=None,
        help="TRANSFORM echoed as each frame's pose (default: the first received)",
    )
    out.add_argument(
        "--record", metavar="DIR", default=None, help="also write run's outputs into DIR as frames arrive"
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="with --record: replace the results of an earlier run in DIR (refused otherwise)",
    )
    out.add_argument(
        "--send-timeout", type=float, default=5.0, help="disconnect a client stalled this long (5 s)"
    )
    ctl = parser.add_argument_group("control")
    ctl.add_argument(
        "--duration", type=positive_float, default=None, help="stop after this many seconds (> 0)"
    )
    ctl.add_argument(
        "--max-frames", type=positive_int, default=None, help="stop after this many processed frames"
    )
    ctl.add_argument("--quiet", action="store_true", help="no status line every second")
    add_sync_audit_argument(ctl, "the KPI records")
    add_model_arguments(parser)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``ultramotion-igt serve``: run the gateway until SIGINT/SIGTERM, --duration or --max-frames."""
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.tools.options import pipeline_config_from_args, resolve_model_source

    if not logging.getLogger().handlers:  # connection events are log lines: show them
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = resolve_model_source(args)
    config = pipeline_config_from_args(args, source=models)
    device = resolve_device(config.device)
    record: Any = None
    if args.record is not None:  # checked and locked before anything heavy (models, the recording)
        from UltramotionIGTLib.tools.outputs import OutputFolder

        record = OutputFolder.open(
            args.record, args.overwrite, inputs=(args.replay, models.sam), option="--record"
        )
    try:
        return _serve(args, models, config, device, record)
    finally:
        if record is not None:
            record.release(keep_empty=True)


def _serve(args: argparse.Namespace, models: Any, config: Any, device: Any, record: Any) -> int:
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline

    simulator = None
    if args.replay:
        from UltramotionIGTLib.io import read_sequence
        from UltramotionIGTLib.services.plus_simulator import PlusSimulator

        if args.rate is not None and not args.rate > 0:
            raise InputFileError(f"--rate must be > 0 Hz, got {args.rate}")
        if args.replay_passes < 0:
            raise InputFileError(f"--replay-passes must be >= 0 (0 = forever), got {args.replay_passes}")
        sequence = read_sequence(args.replay)
        simulator = PlusSimulator(
            sequence, rate_hz=args.rate, port=args.replay_port, passes=args.replay_passes
        )
        plus_host, plus_port = "127.0.0.1", 0
        source = f"replay of {args.replay}"
    else:
        plus_host, plus_port = _host_port(args.plus, protocol.DEFAULT_PLUS_PORT)
        source = f"PLUS {plus_host}:{plus_port}"
    gateway_config = GatewayConfig(
        plus_host=plus_host,
        plus_port=plus_port,
        listen_host=args.listen_host,
        listen_port=args.listen,
        input_name=args.input_name,
        output_name=args.output_name,
        pose_transform=args.pose_transform,
        record_dir=record,
        record_overwrite=args.overwrite,
        sync_audit=args.sync_audit,
        send_timeout_s=args.send_timeout,
        max_frames=args.max_frames,
    )
    pipeline = build_pipeline(*models.load(device), config, legacy=args.legacy)
    if simulator is not None:
        try:
            gateway_config.plus_port = simulator.start()
        except OSError as exc:
            raise UltramotionError(
                f"cannot start the PLUS simulator on port {args.replay_port}: {exc}"
            ) from exc
    gateway = Gateway(pipeline, gateway_config, source=source)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    try:
        try:
            gateway.start()
        except BaseException:
            if simulator is not None:
                simulator.stop()
            raise
        print(
            f"serving label maps on {args.listen_host}:{gateway.listen_port} "
            f"(input: {source}; pipeline on {pipeline.device}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        while not stop.is_set() and not gateway.finished.wait(1.0):  # --max-frames: exactly that many
            if not args.quiet:
                print(gateway.status_line(), file=sys.stderr, flush=True)
            if args.duration is not None and time.monotonic() - t0 >= args.duration:
                break
    finally:
        summary = gateway.stop() if gateway.started else None
        if simulator is not None:
            simulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if summary is not None:
        g = summary["gateway"]
        causes = ", ".join(f"{k} {v}" for k, v in sorted(g["dropped_by_cause"].items()))
        print(
            f"{g['processed']}/{g['frames_in']} frames processed, {g['dropped']} dropped"
            + (f" ({causes})" if causes else "")
            + f", {sum(g['rejected'].values())} rejected, {sum(g['bad_messages'].values())} bad messages"
            + (f" -> {args.record}" if args.record else ""),
            file=sys.stderr,
        )
    return 0
