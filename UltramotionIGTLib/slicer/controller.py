"""The Qt-free controller behind the Slicer module: models, sessions and indicators in one object.

The module's logic maps its parameter node to `SessionController` calls and copies what comes back
into the parameter node and widgets; everything that decides anything is here, so pytest drives the
same code on slicer-core that runs in Slicer::

    controller = SessionController(render_pause=slicer.util.RenderBlocker)
    controller.start(volume_node, None, ModelSource.demo(), PipelineConfig(device="cpu"), mode="live")
    while controller.running:          # the module: a QTimer tick
        controller.step()               # hand the newest frame to the worker, write finished results
        snapshot = controller.snapshot()
    controller.stop("stopped by the user")

The pipeline is loaded once per (models, device) and reused: thresholds and tracking settings of a
new `start` apply to the cached pipeline. `start` picks the session: a threaded `LiveSession` on the
input volume (the pipeline runs on the session's worker thread; ``step`` only copies frames and
writes results), or `ReplaySession` over the sequence whose browser plays the input (mode
``"replay"``). `start_remote` (mode ``"remote"``) needs no pipeline and imports no torch: a
`RemoteSession` shows the label maps an ``ultramotion-igt serve`` gateway sends over OpenIGTLink.
torch is imported only when a pipeline is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from typing import TYPE_CHECKING, Any

from UltramotionIGTLib.slicer import mrml
from UltramotionIGTLib.slicer.indicators import (
    KpiSnapshot,
    build_snapshot,
    format_corner_annotation,
    format_kpi_panel,
    gpu_memory_mb,
    status_light,
)
from UltramotionIGTLib.slicer.sessions import LiveSession, RenderPause, ReplaySession, Session, SessionState

if TYPE_CHECKING:
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.models.source import ModelSource

LOG = logging.getLogger(__name__)

#: Name of the markups node that receives the targets' weighted centroids (created when asked for).
TARGET_POINTS_NODE_NAME = "UltramotionIGT targets"


class Mode(str, enum.Enum):
    """``live``: the newest frame of a changing volume; ``replay``: every item of a sequence;
    ``remote``: label maps from an OpenIGTLink gateway (`start_remote`)."""

    LIVE = "live"
    REPLAY = "replay"
    REMOTE = "remote"


class SessionController:
    """Start, step, stop and observe one processing session (see the module docstring).

    ``kpi_sink``: an optional extra `KpiSink` for every record (e.g. a JSON-lines file); the
    indicators read the session's own aggregator. ``render_pause``: a context manager factory
    wrapped around each result's MRML write (the module: ``slicer.util.RenderBlocker``; default
    none). ``threaded``: live sessions run the pipeline on a worker thread (default; False runs it
    inside ``step``).
    """

    def __init__(
        self, kpi_sink: Any | None = None, render_pause: RenderPause | None = None, threaded: bool = True
    ) -> None:
        self.kpi_sink = kpi_sink
        self.render_pause: RenderPause = render_pause or contextlib.nullcontext
        self.threaded = threaded
        self.pipeline: Pipeline | None = None
        self.session: Session | None = None
        self.output_node: Any = None
        self._pipeline_key: tuple[str, ...] | None = None
        #: (sx, sy) mm per pixel of the session's input (the visibility stage's widths are in mm)
        self._spacing: tuple[float, float] | None = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.session is not None and self.session.running

    @property
    def state(self) -> SessionState:
        """The session's state (``idle`` before any start)."""
        return self.session.state if self.session is not None else SessionState.IDLE

    @property
    def status_message(self) -> str:
        return self.session.status_message if self.session is not None else ""

    @property
    def last_result(self) -> Any:
        """The `HostResult` of the last processed frame (None before one)."""
        return self.session.last_result if self.session is not None else None

    # -- models -----------------------------------------------------------------------------------
    def load_pipeline(self, models: ModelSource, config: PipelineConfig) -> Pipeline:
        """The pipeline for ``models`` as ``config`` builds them (`PipelineConfig.build_settings`):
        loaded on first use, then reused with ``config`` applied (a new sequence starts: tracks are
        forgotten). Raises `CheckpointError` naming the file at fault, `DeviceUnavailableError` for an
        unusable device."""
        from UltramotionIGTLib.core.pipeline import Pipeline

        key = (*models.key(), *config.build_settings())  # device, precision, attention, compilation
        if self.pipeline is None or self._pipeline_key != key:
            self.pipeline = None  # free the old models before loading new ones
            self.pipeline = Pipeline(*models.load(config.device), config)
            self._pipeline_key = key
        else:
            self.pipeline.config = dataclasses.replace(config)
            self.pipeline.reset()
        return self.pipeline

    @staticmethod
    def _frame_processor(pipeline: Pipeline, spacing: tuple[float, float] | None = None) -> Any:
        """The sessions' ``process_frame``: one frame through ``pipeline`` and its one host copy (bound
        to this pipeline object: a live session's worker never sees a later replacement), with the
        input's pixel spacing (mm, for the visibility stage's widths)."""

        def process_frame(frame: Any, frame_index: int, timestamp: float | None) -> Any:
            packet = pipeline.process_frame(
                frame, frame_index=frame_index, timestamp=timestamp, spacing=spacing
            )
            return packet.to_host()

        return process_frame

    # -- sessions ---------------------------------------------------------------------------------
    def start(
        self,
        input_node: Any,
        output_node: Any,
        models: ModelSource,
        config: PipelineConfig,
        mode: Mode | str = Mode.LIVE,
        *,
        drop_policy: str = "newest",
        every_nth: int = 1,
        target_points: bool = False,
        status_callback: Any = None,
        threaded: bool | None = None,
    ) -> Session:
        """Stop any running session, load (or reuse) the pipeline and start a session.

        ``input_node``: a scalar/vector volume node with one slice (live), or the proxy volume of a
        sequence browser (replay). ``output_node``: a vtkMRMLSegmentationNode, or None to create one
        (``<input name> segmentation``, then in ``output_node`` here). ``target_points``: also write
        the targets' centroids into the markups node `TARGET_POINTS_NODE_NAME` (live). ``threaded``:
        overrides the controller's setting for this session. Raises ValueError with what to do for a
        missing input or a replay input that no browser plays (mode ``"remote"``: `start_remote`).
        """
        self.stop(None)
        mode = Mode(mode)
        if mode is Mode.REMOTE:
            raise ValueError("remote mode receives label maps from a gateway: use start_remote")
        if input_node is None or not input_node.IsA("vtkMRMLVolumeNode"):
            raise ValueError("Select an input volume first.")
        scene = input_node.GetScene()
        if scene is None:
            raise ValueError(f"the input volume {mrml._node_label(input_node)} is not in a scene")
        browser = None
        if mode is Mode.REPLAY:
            browser = sequence_browser_for_proxy(input_node)
            if browser is None:
                raise ValueError(
                    f"Replay needs a sequence: {input_node.GetName()!r} is not played by a sequence browser. Load "
                    "a recording (e.g. a PLUS .igs.mha) as a sequence, or choose live mode."
                )
        pipeline = self.load_pipeline(models, config)
        spacing = mrml.geometry_from_volume(input_node).spacing
        self._spacing = (float(spacing[0]), float(spacing[1]))
        if output_node is None:
            output_node = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{input_node.GetName()} segmentation"
            )
            output_node.CreateDefaultDisplayNodes()
        self.output_node = output_node
        if browser is not None:
            session: Session = ReplaySession(
                browser,
                output_node,
                self._frame_processor(pipeline, self._spacing),
                kpi_sink=self.kpi_sink,
                status_callback=status_callback,
            )
        else:
            markups = None
            if target_points:
                markups = scene.GetFirstNodeByName(TARGET_POINTS_NODE_NAME) or scene.AddNewNodeByClass(
                    "vtkMRMLMarkupsFiducialNode", TARGET_POINTS_NODE_NAME
                )
            session = LiveSession(
                input_node,
                output_node,
                self._frame_processor(pipeline, self._spacing),
                drop_policy=drop_policy,
                every_nth=every_nth if drop_policy == "every_nth" else 1,
                status_callback=status_callback,
                kpi_sink=self.kpi_sink,
                markups_node=markups,
                threaded=self.threaded if threaded is None else threaded,
                render_pause=self.render_pause,
            )
        self.session = session
        LOG.info("starting %s session on %s (%s)", mode.value, mrml._node_label(input_node), pipeline.device)
        session.start()
        return session

    def start_remote(
        self,
        scene: Any,
        output_node: Any,
        *,
        host: str | None = None,
        port: int | None = None,
        label_volume_node: Any = None,
        status_callback: Any = None,
    ) -> Session:
        """Stop any running session and show what an ``ultramotion-igt serve`` gateway sends.

        With ``host`` (and ``port``) a SlicerOpenIGTLink connector (client) is created or reused and
        started (`gateway_client.connect_to_gateway`; raises `MissingExtensionError` without that
        extension); without a host the label map volume is awaited from whatever feeds the scene (a
        connector the user set up in the OpenIGTLinkIF module).
        ``output_node``: as for `start` (created when None). ``label_volume_node``: the received
        label map volume, if known (else the first volume carrying the gateway's metadata).
        Imports no torch.
        """
        from UltramotionIGTLib.services import protocol
        from UltramotionIGTLib.slicer.gateway_client import RemoteSession, connect_to_gateway

        self.stop(None)
        if host:
            connect_to_gateway(scene, host, int(port or protocol.DEFAULT_LISTEN_PORT))
        if output_node is None:
            output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Remote segmentation")
            output_node.CreateDefaultDisplayNodes()
        self.output_node = output_node
        session = RemoteSession(
            scene,
            output_node,
            label_volume_node=label_volume_node,
            status_callback=status_callback,
            kpi_sink=self.kpi_sink,
            render_pause=self.render_pause,
        )
        self.session = session
        session.start()
        return session

    def step(self, wait: float | None = None) -> bool:
        """Do the pending work of the session on this (the main) thread; True when a result was
        written. ``wait``: seconds to block for a frame in flight (tests; the timer never waits).
        Never raises for a frame's failure: the session ends with ``state`` ERROR and its status."""
        return self.session.step(wait) if self.session is not None else False

    def drain(self, timeout: float) -> int:
        """Write results until the session has nothing in flight, or ``timeout`` s pass; returns the
        results written (a live session's `LiveSession.drain`; others: one `step`)."""
        session = self.session
        if session is None:
            return 0
        drain = getattr(session, "drain", None)
        return drain(timeout) if drain is not None else int(session.step(timeout))

    def stop(self, reason: str | None = "stopped by the user") -> None:
        """Stop the session (if one runs). Idempotent."""
        if self.session is not None and not self.session.done:
            self.session.stop(reason or "stopped")

    def process_once(
        self, input_node: Any, output_node: Any, models: ModelSource, config: PipelineConfig
    ) -> Any:
        """Process the input's current frame once into the output; returns the `HostResult`.

        Raises RuntimeError with the session's status when the frame could not be processed.
        """
        session = self.start(input_node, output_node, models, config, Mode.LIVE, threaded=False)
        processed = session.step()
        message = session.status_message
        if not processed:
            self.stop(None)
            raise RuntimeError(f"The frame was not processed: {message or 'no frame in the input'}")
        result = session.last_result
        session.stop(f"processed one frame: {len(result)} target(s)")
        return result

    # -- indicators -------------------------------------------------------------------------------
    def snapshot(self) -> KpiSnapshot | None:
        """What the indicators show now (None before any start)."""
        session = self.session
        if session is None:
            return None
        # remote: the gateway's own counts, device and path (from its KPI records); no local pipeline
        counters = getattr(session, "gateway_counters", None)
        received, dropped = counters() if counters is not None else (None, None)
        pipeline = self.pipeline if counters is None else None
        device = pipeline.device if pipeline is not None else None
        device_name = None
        if device is not None and device.type == "cuda":
            import torch

            device_name = torch.cuda.get_device_name(device)
        return build_snapshot(
            session.kpi,
            running=session.running,
            frames_received=session.frames_received if received is None else received,
            frames_dropped=session.frames_dropped if dropped is None else dropped,
            status_message=session.status_message,
            error=session.status_message if session.state == SessionState.ERROR else None,
            device=str(device) if device is not None else None,
            device_name=device_name,
            path=pipeline.path if pipeline is not None else None,
            **gpu_memory_mb(device),
        )

    def indicator_texts(self) -> dict[str, str] | None:
        """The KPI panel, the status light (style sheet, tooltip) and the one-line summary (None
        before any start)."""
        snap = self.snapshot()
        if snap is None:
            return None
        light = status_light(snap)
        return {
            "panel": format_kpi_panel(snap),
            "lightStyleSheet": light.style_sheet(),
            "lightTooltip": light.tooltip,
            "corner": format_corner_annotation(snap),
        }


def sequence_browser_for_proxy(volume_node: Any) -> Any:
    """The sequence browser whose proxy node is ``volume_node`` (a replay input), or None."""
    scene = volume_node.GetScene()
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        if browser.GetSequenceNode(volume_node) is not None:
            return browser
    return None
