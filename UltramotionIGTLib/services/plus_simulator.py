"""A PLUS server stand-in: streams a recording as OpenIGTLink TRANSFORM + IMAGE messages.

So that anyone can try the gateway without a scanner (``ultramotion-igt serve --replay FILE``),
and the tests have a real OpenIGTLink peer. Per frame of an `UltrasoundSequence` (any recording
`read_sequence` reads), in one payload, as PlusServer would send a tracked frame:

- one TRANSFORM per tracking transform whose status is OK in that frame (device name = the
  transform's name, e.g. ``ProbeToTracker``), then
- one IMAGE (device name ``image_name``, default ``Image``): the frame as uint8, 1 x H x W, with
  the recording's IJK-to-RAS matrix (``UltrasoundSequence.ijk_to_ras()``) and the ``ras`` flag;
  metadata (OpenIGTLink v3): ``Timestamp`` (the recording's own timestamp, as PlusServer sends its
  frame fields), ``FrameNumber`` (index in the recording), ``UltrasoundImageOrientation`` and
  ``UltrasoundImageType`` when the recording has them.

All messages of a frame carry one header timestamp: the wall-clock time (Unix seconds) at which
the frame is "acquired", i.e. scheduled. The IMAGE goes last, so a frame whose IMAGE arrived was
sent whole (`frames_sent` counts those).

Pacing: ``rate_hz`` frames per second, or with ``rate_hz=None`` the recording's own timing (its
timestamps; 30 Hz where they are missing). ``passes``: times through the recording (0 = until
stopped). ``wait_for_client``: hold the first frame until a client is connected (so that a
consumer started after the simulator still sees frame 0).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np

from UltramotionIGTLib.services.igtl import IgtlServer, pyigtl_module

LOG = logging.getLogger("UltramotionIGTLib.services.plus_simulator")

DEFAULT_RATE_HZ = 30.0


class PlusSimulator:
    """Streams ``sequence`` over OpenIGTLink on ``host:port`` (0: a free port; `start` returns it).

    ``sequence``: an `UltrasoundSequence` with uint8 frames (N x H x W, or N x H x W x 3 sent as RGB).
    ``queue_limit``: frames queued per client before the oldest is dropped (as a server that
    streams live would). Counters: ``frames_scheduled`` (frames due), ``frames_sent`` (frames fully
    written to a client socket), ``passes_done``. ``done`` is set after the last pass has been
    scheduled; `drained` says when the clients' queues have been written out too.
    """

    def __init__(
        self,
        sequence: Any,
        rate_hz: float | None = DEFAULT_RATE_HZ,
        port: int = 0,
        host: str = "127.0.0.1",
        image_name: str = "Image",
        passes: int = 1,
        wait_for_client: bool = True,
        queue_limit: int = 4,
    ) -> None:
        frames = np.asarray(sequence.frames)
        if frames.dtype != np.uint8:
            raise ValueError(
                f"the simulator streams uint8 frames, got {frames.dtype} (read with intensity='uint8')"
            )
        if rate_hz is not None and not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if int(passes) < 0:
            raise ValueError(f"passes must be >= 0 (0 = until stopped), got {passes}")
        self.sequence = sequence
        self.rate_hz = rate_hz
        self.image_name = image_name
        self.passes = int(passes)
        self.wait_for_client = wait_for_client
        self.server = IgtlServer(port, host, name="PLUS simulator", queue_limit=queue_limit)
        self.frames_scheduled = 0
        self.passes_done = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plus-simulator", daemon=True)
        self._payloads = [self._frame_payload(i) for i in range(sequence.n_frames)]
        self._sent_before: dict[Any, int] = {}

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def frames_sent(self) -> int:
        """Frames whose messages were fully written to a client socket (summed over clients)."""
        return sum(c.payloads_sent for c in self.server.connections) + sum(self._sent_before.values())

    def drained(self) -> bool:
        """True when every connected client has been sent everything queued for it."""
        return all(c.idle for c in self.server.connections)

    def start(self) -> int:
        """Listen and start streaming; returns the port. Raises OSError when the port is taken."""
        self.server.on_disconnect = self._client_gone
        port = self.server.start()
        self._thread.start()
        return port

    def stop(self, timeout: float = 2.0) -> None:
        """Stop streaming and close every connection (clients see the server go away)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.server.stop(timeout)

    def _client_gone(self, connection: Any, reason: str) -> None:
        self._sent_before[id(connection)] = connection.payloads_sent

    def intervals(self) -> np.ndarray:
        """Seconds between consecutive frames (N entries; entry 0 is the wrap-around gap)."""
        n = self.sequence.n_frames
        if self.rate_hz is not None:
            return np.full(n, 1.0 / self.rate_hz)
        ts = np.asarray(self.sequence.timestamps, dtype=np.float64)
        gaps = np.diff(ts, prepend=np.nan)
        ok = np.isfinite(gaps) & (gaps > 0)
        typical = float(np.median(gaps[ok])) if ok.any() else 1.0 / DEFAULT_RATE_HZ
        return np.where(ok, gaps, typical)

    def _frame_payload(self, i: int) -> tuple[list[Any], Any]:
        """(TRANSFORM messages, IMAGE message) for frame ``i``, timestamps filled in at send time."""
        pyigtl = pyigtl_module()

        seq = self.sequence
        transforms = []
        for name, mats in seq.transforms.items():
            status = seq.transform_status.get(name)
            if (status is not None and not bool(status[i])) or not np.all(np.isfinite(mats[i])):
                continue
            msg = pyigtl.TransformMessage(mats[i], device_name=name)
            msg.header_version = 2
            transforms.append(msg)
        frame = np.asarray(seq.frames[i])
        msg = pyigtl.ImageMessage(
            frame[np.newaxis],  # 1 x H x W (x 3): one slice
            ijk_to_world_matrix=seq.ijk_to_ras(),
            world_coordinate_system="ras",
            device_name=self.image_name,
        )
        msg.header_version = 2
        metadata = {"FrameNumber": str(i)}
        stamp = float(seq.timestamps[i])
        if math.isfinite(stamp):
            metadata["Timestamp"] = repr(stamp)
        if seq.image_orientation:
            metadata["UltrasoundImageOrientation"] = seq.image_orientation
        if seq.image_type:
            metadata["UltrasoundImageType"] = seq.image_type
        msg.metadata = metadata
        return transforms, msg

    def _run(self) -> None:
        gaps = self.intervals()
        if self.wait_for_client:
            while not self._stop.is_set() and not self.server.connections:
                self._stop.wait(0.02)
        next_due = time.monotonic()
        n = len(self._payloads)
        try:
            while not self._stop.is_set() and (self.passes == 0 or self.passes_done < self.passes):
                for i in range(n):
                    if i or self.passes_done:
                        next_due += float(gaps[i])
                    wait = next_due - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        return
                    if wait < -1.0:  # far behind (a busy machine): do not burst to catch up
                        next_due = time.monotonic()
                    stamp = time.time()
                    transforms, image = self._payloads[i]
                    for msg in (*transforms, image):
                        msg.timestamp = stamp
                    self.server.broadcast(b"".join(m.pack() for m in (*transforms, image)))
                    self.frames_scheduled += 1
                self.passes_done += 1
        finally:
            self.done.set()
