"""The OpenIGTLink gateway over real loopback sockets: pyigtl messages both ways, a real PLUS recording,
the shipped demo models. Every wait is bounded; ports are chosen free by the tests (127.0.0.1 only)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pyigtl = pytest.importorskip("pyigtl")

from UltramotionIGTLib.core.kpi import FrameRecord  # noqa: E402
from UltramotionIGTLib.core.mailbox import LatestFrameMailbox  # noqa: E402
from UltramotionIGTLib.services import protocol  # noqa: E402
from UltramotionIGTLib.services.gateway import Gateway, GatewayConfig, frame_from_image_message  # noqa: E402
from UltramotionIGTLib.services.igtl import IgtlServer, MessageReader  # noqa: E402
from UltramotionIGTLib.services.plus_simulator import PlusSimulator  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDING = "SpinePhantomFreehand.igs.mha"
POSE = "ProbeToTracker"


# -- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond, timeout: float = 90.0, what: str = "condition", gateway=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            state = f" (gateway: {gateway.status_line()})" if gateway is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{state}")
        time.sleep(0.02)


class RecordingClient:
    """pyigtl's own OpenIGTLinkClient (the Slicer side), keeping every message it decodes: pyigtl keeps
    only the newest message per device name, so its store is wrapped to see each one go in."""

    def __init__(self, port: int) -> None:
        self.messages: list = []
        outer = self

        class _Every(dict):
            def __setitem__(self, key, value):
                outer.messages.append(value)
                super().__setitem__(key, value)

        self.client = pyigtl.OpenIGTLinkClient("127.0.0.1", port, start_now=False)
        self.client.incoming_messages = _Every()
        self.client.start()

    def of(self, message_type: str) -> list:
        with self.client.lock_incoming_messages:
            return [m for m in self.messages if m.message_type == message_type]

    def stop(self) -> None:
        self.client.stop()


def image_message(image, name="Image", timestamp=None, metadata=None, matrix=None, version=2):
    msg = pyigtl.ImageMessage(
        np.asarray(image),
        ijk_to_world_matrix=np.eye(4) if matrix is None else matrix,
        timestamp=timestamp,
        device_name=name,
    )
    msg.header_version = version
    msg.metadata = dict(metadata or {})
    return msg


def accounted(gw: Gateway) -> bool:
    s = gw.stats()
    return s["processed"] + s["dropped"] == s["frames_in"]


@pytest.fixture(scope="module")
def pipeline():
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.models.packs import default_models

    models = default_models()
    return Pipeline.from_paths(models["detector"], models["sam"], config=PipelineConfig(device="cpu"))


@pytest.fixture(scope="module")
def recording(plus_dir):
    from UltramotionIGTLib.io import read_sequence

    return read_sequence(plus_dir / RECORDING)


# -- the stream parser and the protocol, without sockets -------------------------------------------


def test_reader_resynchronises_after_garbage_and_reports_each_bad_message():
    good = image_message(np.arange(48, dtype=np.uint8).reshape(1, 6, 8), timestamp=10.5).pack()
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF  # last pixel: the CRC no longer matches
    status = pyigtl.StringMessage("x", device_name="S")
    status._message_type = "STATUS"  # well formed, of a type the gateway does not decode
    unknown_pixel = bytearray(good)
    body = unknown_pixel[58:]
    body[12 + 3] = 9  # IMAGE scalar type 9 does not exist (v2: after the 12-byte extended header)
    unknown_pixel[50:58] = pyigtl.messages.CRC64(bytes(body)).to_bytes(8, "big")
    unknown_pixel[58:] = body
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    stream = good + noise + bytes(corrupt) + status.pack() + bytes(unknown_pixel) + good + good[:100]

    reader = MessageReader()
    items = []
    for i in range(0, len(stream), 997):  # arbitrary chunking, as TCP delivers
        items += reader.feed(stream[i : i + 997])
    items += reader.close()
    kinds = [getattr(x, "reason", None) or x.message_type for x in items]
    assert kinds == ["IMAGE", "garbage", "crc", "unsupported_type", "pixel_type", "IMAGE", "truncated"]
    assert items[1].size == len(noise)
    assert items[0].timestamp == pytest.approx(10.5, abs=1e-6)
    np.testing.assert_array_equal(items[5].image, np.arange(48, dtype=np.uint8).reshape(1, 6, 8))

    small = MessageReader(max_body_bytes=100)
    out = small.feed(good + status.pack())
    assert [getattr(x, "reason", x.message_type) for x in out] == ["too_large", "unsupported_type"]


def test_device_names_fit_20_bytes_and_stay_distinct():
    names = protocol.output_names(protocol.default_output_name("Image_Reference"))
    assert names.image == names.transform == "Image_Reference_Segm"
    assert names.targets.endswith("_Targets") and names.kpi.endswith("_KPI")
    assert len({names.image, names.targets, names.kpi}) == 3
    assert all(len(n.encode()) <= protocol.MAX_DEVICE_NAME_BYTES for n in vars(names).values())
    assert protocol.fit_device_name("Bildé" * 5, "_KPI").encode("utf-8").decode("utf-8")  # cut on a character
    assert protocol.output_names("Seg").targets == "Seg_Targets"


def test_segment_metadata_round_trip_and_labelmap_decoding():
    segments = [
        protocol.LabelSegment(3, "vessel-7", (0.9, 0.25, 0.25), "vessel", 7, 0.8125),
        protocol.LabelSegment(300, "needle-2", (0.95, 0.85, 0.15), "needle", 2, 0.5),
    ]
    metadata = protocol.segments_to_metadata(segments)
    metadata[protocol.META_CLASS_NAMES] = json.dumps(["vessel", "needle"])
    metadata[protocol.META_FRAME_NUMBER] = "41"
    assert protocol.segments_from_metadata(metadata) == segments
    stale = {**metadata, **protocol.segments_to_metadata(segments[:1])}  # Segment1_* left from before
    assert protocol.segments_from_metadata(stale) == segments[:1]
    labelmap = np.zeros((20, 30), np.uint16)
    labelmap[2:5, 3:9] = 3
    labelmap[10:12, 20:21] = 300
    result = protocol.host_result_from_labelmap(labelmap, metadata)
    assert result.frame_index == 41 and result.segment_names() == ["vessel-7", "needle-2"]
    np.testing.assert_array_equal(result.masks[0], labelmap == 3)
    np.testing.assert_array_equal(result.boxes[1], [20, 10, 21, 12])
    np.testing.assert_allclose(result.centroids[0], [5.5, 3.0])
    assert list(result.labels) == [0, 1] and list(result.track_ids) == [7, 2]
    with pytest.raises(ValueError, match="label value"):
        protocol.segments_from_metadata({"Segment0_LabelValue": "zero"})
    with pytest.raises(ValueError, match="event"):
        protocol.parse_kpi_string('{"event": "start"}')


def test_frame_validation_refuses_what_is_not_a_2d_brightness_frame():
    def check(image, metadata=None):
        return frame_from_image_message(image_message(image, metadata=metadata), 0, 0.0, 0.0)[1]

    assert check(np.zeros((1, 4, 5), np.uint8)) == ""
    assert check(np.zeros((1, 4, 5), np.int16), {"UltrasoundImageType": "RF_I_LINE_Q_LINE"}) == "rf_data"
    assert check(np.zeros((3, 4, 5), np.uint8)) == "volume_3d"
    assert check(np.zeros((1, 4, 5), np.float32)) == "pixel_type"
    assert check(np.zeros((1, 0, 5), np.uint8)) == "zero_size"
    assert check(np.zeros((1, 4, 5, 2), np.uint8)) == "components"
    frame, _, _ = frame_from_image_message(image_message(np.zeros((1, 4, 5, 4), np.uint8)), 0, 0.0, 0.0)
    assert frame.image.shape == (4, 5, 3) and frame.image.flags.writeable


def test_mailbox_keeps_only_the_newest_item():
    box = LatestFrameMailbox()
    assert box.put(1) is None and box.put(2) == 1
    assert box.take(0) == 2 and box.take(0) is None
    later = threading.Timer(0.05, box.put, args=(3,))
    later.start()
    assert box.take(5.0) == 3


# -- end to end: a recording streamed at 30 Hz ------------------------------------------------------


@pytest.fixture(scope="module")
def served(pipeline, recording, tmp_path_factory):
    """The recording through the built-in PLUS simulator at 30 Hz, the gateway, and pyigtl's client."""
    plus_port = free_port()
    record = tmp_path_factory.mktemp("record")
    gw = Gateway(
        pipeline,
        GatewayConfig(
            plus_host="127.0.0.1",
            plus_port=plus_port,
            listen_port=0,
            record_dir=record,
            plus_retry_max_s=0.2,
            sync_audit=True,
        ),
    ).start()
    client = RecordingClient(gw.listen_port)
    sim = None
    try:
        wait_until(lambda: gw.server.connections, what="the Slicer-side client")
        sim = PlusSimulator(recording, rate_hz=30.0, port=plus_port, passes=1, queue_limit=64)
        sim.start()
        wait_until(lambda: sim.done.is_set() and sim.drained(), 90, "the simulator to finish")
        sent = sim.frames_sent
        wait_until(
            lambda: gw.stats()["frames_in"] == sent and accounted(gw), 90, "every frame accounted for", gw
        )
        processed = gw.stats()["processed"]
        wait_until(lambda: len(client.of("STRING")) >= processed, 90, "the results of every processed frame")
    finally:
        client.stop()
        summary = gw.stop()
        if sim is not None:
            sim.stop()
    return {"summary": summary, "client": client, "sent": sent, "record": record, "names": gw._names}


@pytest.mark.plus
def test_every_frame_is_answered_or_counted_as_dropped(served):
    g = served["summary"]["gateway"]
    assert served["sent"] == 21  # the whole recording reached the gateway
    assert g["frames_in"] == 21 == g["processed"] + g["dropped"]
    assert set(g["dropped_by_cause"]) <= {"superseded"}
    assert g["processed"] >= 2 and not g["rejected"] and not g["bad_messages"]
    client = served["client"]
    images = client.of("IMAGE")
    assert len(images) + g["client_drops"] == g["processed"]
    assert len(client.of("STRING")) == len(client.of("POINT")) == len(images)
    frame_numbers = [int(m.metadata[protocol.META_FRAME_NUMBER]) for m in images]
    assert (
        frame_numbers == sorted(set(frame_numbers)) and frame_numbers[-1] == 20
    )  # in order, the last one made it


@pytest.mark.plus
def test_label_maps_have_the_input_geometry_voxel_for_voxel(served, recording):
    names = served["names"]
    for msg in served["client"].of("IMAGE"):
        assert msg.device_name == names.image == "Image_Segmentation"
        assert msg.image.shape == (1, *recording.frame_shape) and msg.image.dtype == np.uint8
        # the frame's IJK-to-RAS, as the simulator sent it (float32 on the wire), both ways
        np.testing.assert_allclose(msg.ijk_to_world_matrix, recording.ijk_to_ras(), atol=1e-4)
        values = set(np.unique(msg.image)) - {0}
        listed = {s.value for s in protocol.segments_from_metadata(msg.metadata)}
        assert values <= listed  # every label in the image is named in the metadata


@pytest.mark.plus
def test_transforms_and_timestamps_are_echoed(served, recording):
    client = served["client"]
    transforms = {round(m.timestamp, 6): m for m in client.of("TRANSFORM")}
    for msg in client.of("IMAGE"):
        n = int(msg.metadata[protocol.META_FRAME_NUMBER])  # frame n of the recording (one pass)
        assert float(msg.metadata["Timestamp"]) == recording.timestamps[n]  # PLUS's own time stamp
        assert float(msg.metadata[protocol.META_SOURCE_TIMESTAMP]) == pytest.approx(msg.timestamp, abs=1e-6)
        echoed = transforms[round(msg.timestamp, 6)]
        assert echoed.device_name == msg.device_name and echoed.metadata["SourceTransform"] == POSE
        np.testing.assert_allclose(echoed.matrix, recording.transforms[POSE][n], rtol=1e-6, atol=1e-4)


@pytest.mark.plus
def test_points_and_kpi_strings_decode(served):
    client, names = served["client"], served["names"]
    images = {round(m.timestamp, 6): m for m in client.of("IMAGE")}
    for points in client.of("POINT"):
        assert points.device_name == names.targets
        image = images[round(points.timestamp, 6)]
        segment_names = {s.name for s in protocol.segments_from_metadata(image.metadata)}
        assert set(points.names) <= segment_names and all(o == names.image for o in points.owners)
        ijk = (
            np.linalg.inv(image.ijk_to_world_matrix)
            @ np.c_[np.array(points.positions), np.ones(len(points.positions))].T
        ).T
        assert np.all((ijk[:, 0] >= 0) & (ijk[:, 0] < 820) & (ijk[:, 1] >= 0) & (ijk[:, 1] < 616))
    records = [protocol.parse_kpi_string(m.string) for m in client.of("STRING")]
    assert records[0]["fps_out"] is None  # one frame is no rate yet
    for record in records:
        assert record["source"] == "Image" and record["device"] == "cpu"
        assert {"detector", "sam_encoder", "sam_decoder"} <= set(record["stage_ms"])
        assert record["latency_reference"] == "acquisition" and record["latency_ms"] >= 0
        assert record["latency_ms"] >= record["gateway_ms"]["total"] - 1.0
        assert record["host_syncs"] == 0
    assert all(r["fps_out"] > 0 and r["fps_in"] > 0 for r in records[1:])
    assert records[-1]["frames_received"] == 21 and records[-1]["frames_processed"] == len(records)


@pytest.mark.plus
def test_record_holds_run_outputs_matching_what_was_sent(served, recording):
    from UltramotionIGTLib.io import read_segmentation_sequence

    out = served["record"]
    summary = json.loads((out / "summary.json").read_text())
    assert {"segmentation.seq.nrrd", "kpi.jsonl", "summary.json", "overlay.png"} <= set(summary["outputs"])
    assert not (out / "segmentation.seq.raw").exists()  # the streaming pair was folded into the .nrrd
    seg = read_segmentation_sequence(out / "segmentation.seq.nrrd")
    images = served["client"].of("IMAGE")
    assert seg.n_frames == summary["frames_out"] == len(images)
    np.testing.assert_allclose(seg.ijk_to_ras(), recording.ijk_to_ras(), atol=1e-9)
    for item, msg in zip(seg.labelmaps, images, strict=True):
        np.testing.assert_array_equal(item, msg.image[0])
    np.testing.assert_allclose(seg.timestamps, [m.timestamp for m in images], atol=1e-6)
    lines = [json.loads(line) for line in (out / "kpi.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start"] + ["frame"] * len(images) + ["summary"]


@pytest.mark.plus
def test_slicer_side_turns_received_label_maps_into_segments(served):
    slicer = pytest.importorskip("slicer", reason="slicer-core provides MRML")
    import vtk

    from UltramotionIGTLib.slicer import mrml
    from UltramotionIGTLib.slicer.gateway_client import GatewaySegmentationUpdater, host_result_from_message

    ctx = mrml.create_standalone_context()
    try:
        scene = ctx.scene
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
        pose = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Image_Segmentation")
        updater = GatewaySegmentationUpdater(segmentation)
        volume = None
        transforms = {round(m.timestamp, 6): m for m in served["client"].of("TRANSFORM")}
        for msg in served["client"].of("IMAGE")[-3:]:
            # the echoed pose TRANSFORM comes first, into the transform node of the same device name
            pose.SetMatrixTransformToParent(
                slicer.util.vtkMatrixFromArray(transforms[round(msg.timestamp, 6)].matrix)
            )
            # what SlicerOpenIGTLink does with an IMAGE: voxels + IJK-to-RAS into a volume node,
            # each metadata entry K into the attribute "OpenIGTLink.K"
            geometry = mrml.FrameGeometry.from_matrix(msg.ijk_to_world_matrix, msg.image.shape[1:])
            if volume is None:
                volume = mrml.new_volume_node(scene, msg.image[0], geometry, name=msg.device_name)
                volume.SetAndObserveTransformNodeID(pose.GetID())
            else:
                mrml.write_frame_to_volume(volume, msg.image[0], geometry)
            for key, value in msg.metadata.items():
                volume.SetAttribute(protocol.SLICER_METADATA_PREFIX + key, value)
            ids = updater.update(volume)
            expected = host_result_from_message(msg)
            assert ids == expected.segment_names()
            seg = segmentation.GetSegmentation()
            assert seg.GetNumberOfSegments() == len(ids)
            for row, segment_id in enumerate(ids):
                image = seg.GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
                from vtk.util import numpy_support

                voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
                    msg.image.shape
                )
                np.testing.assert_array_equal(voxels[0] > 0, expected.masks[row])
        # placed with the frame's pose: under the session's pose node holding the echoed transform
        placed = segmentation.GetParentTransformNode()
        assert placed is not None and placed is not pose
        placed_matrix, pose_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        placed.GetMatrixTransformToWorld(placed_matrix)
        pose.GetMatrixTransformToWorld(pose_matrix)
        assert [placed_matrix.GetElement(r, c) for r in range(4) for c in range(4)] == [
            pose_matrix.GetElement(r, c) for r in range(4) for c in range(4)
        ]
    finally:
        ctx.close()
    assert slicer is not None


def test_slicer_side_helper_does_not_import_torch():
    code = (
        "import sys, UltramotionIGTLib.slicer.gateway_client\n"
        "assert 'torch' not in sys.modules and 'pyigtl' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT, timeout=60)


@pytest.mark.plus
def test_pyigtl_server_as_plus_image_before_transform_header_v1(pipeline, recording):
    """pyigtl's own OpenIGTLinkServer as the PLUS side: v1 headers (no metadata), IMAGE sent before
    its TRANSFORM (the pose is matched by timestamp when the results are built)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        plus = pyigtl.OpenIGTLinkServer(port=0, local_server=True)  # installs its own signal handlers
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    gw = Gateway(
        pipeline,
        GatewayConfig(
            plus_host="127.0.0.1", plus_port=plus.server_address[1], listen_port=0, pose_transform=POSE
        ),
    ).start()
    client = RecordingClient(gw.listen_port)
    sent = []
    try:
        wait_until(
            lambda: plus.is_connected() and gw.plus.connected and gw.server.connections, what="connections"
        )
        for n in range(3):
            stamp = time.time()
            image = pyigtl.ImageMessage(
                recording.frames[n][np.newaxis],
                ijk_to_world_matrix=recording.ijk_to_ras(),
                timestamp=stamp,
                device_name="Image_Reference",
            )
            plus.send_message(image, wait=True)
            plus.send_message(
                pyigtl.TransformMessage(recording.transforms[POSE][n], timestamp=stamp, device_name=POSE)
            )
            sent.append(stamp)
            wait_until(
                lambda n=n: len(client.of("STRING")) == n + 1, what=f"the results of frame {n}", gateway=gw
            )
    finally:
        client.stop()
        summary = gw.stop()
        plus.stop()
    g = summary["gateway"]
    assert g["frames_in"] == g["processed"] == 3 and g["pose"] == {"echoed": 3}
    images, transforms = client.of("IMAGE"), client.of("TRANSFORM")
    assert [m.device_name for m in images] == ["Image_Reference_Segm"] * 3  # 20-byte device names
    for n, (image, transform) in enumerate(zip(images, transforms, strict=True)):
        assert image.timestamp == pytest.approx(sent[n], abs=1e-6) and transform.timestamp == pytest.approx(
            sent[n], abs=1e-6
        )
        np.testing.assert_allclose(transform.matrix, recording.transforms[POSE][n], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(image.ijk_to_world_matrix, recording.ijk_to_ras(), atol=1e-4)


# -- faults: PLUS goes away, Slicer misbehaves, bad bytes -------------------------------------------


@pytest.mark.plus
def test_plus_killed_and_restarted_mid_stream(pipeline, recording, caplog):
    caplog.set_level(logging.INFO, logger="UltramotionIGTLib.services")
    plus_port = free_port()
    gw = Gateway(
        pipeline,
        GatewayConfig(plus_host="127.0.0.1", plus_port=plus_port, listen_port=0, plus_retry_max_s=0.2),
    ).start()
    client = RecordingClient(gw.listen_port)
    sims = []
    try:
        wait_until(lambda: gw.server.connections, what="the Slicer-side client")
        first = PlusSimulator(recording, rate_hz=30.0, port=plus_port, passes=1, queue_limit=64)
        sims.append(first)
        first.start()
        wait_until(lambda: first.frames_scheduled >= 8, 90, "8 frames from the first PLUS")
        first.stop()  # PLUS goes away in the middle of the recording
        wait_until(lambda: not gw.plus.connected, 90, "the gateway to notice")
        wait_until(lambda: gw.plus.failed_attempts >= 2, 90, "reconnection attempts")
        restarted_at = time.time()
        second = PlusSimulator(recording, rate_hz=30.0, port=plus_port, passes=1, queue_limit=64)
        sims.append(second)
        second.start()
        wait_until(lambda: second.done.is_set() and second.drained(), 90, "the restarted PLUS to finish")
        sent = first.frames_sent + second.frames_sent
        wait_until(
            lambda: gw.stats()["frames_in"] == sent and accounted(gw), 90, "every frame accounted for", gw
        )
        wait_until(
            lambda: any(m.timestamp > restarted_at for m in client.of("IMAGE")),
            90,
            "results after the restart",
        )
    finally:
        client.stop()
        summary = gw.stop()
        for sim in sims:
            sim.stop()
    g = summary["gateway"]
    assert g["plus"]["connects"] == 2 and g["plus"]["disconnects"] >= 1 and g["plus"]["failed_attempts"] >= 2
    assert 8 <= first.frames_sent < 21 and second.frames_sent == 21
    assert g["frames_in"] == sent == g["processed"] + g["dropped"]
    assert set(g["bad_messages"]) <= {"truncated"}  # at most the message cut by the kill
    log = caplog.text
    assert "connection lost" in log and "unreachable" in log and log.count("PLUS: connected to") == 2


@pytest.mark.plus
def test_slicer_side_connects_late_stalls_and_disconnects(pipeline, recording, caplog):
    caplog.set_level(logging.INFO, logger="UltramotionIGTLib.services")
    sim = PlusSimulator(recording, rate_hz=30.0, passes=0)
    port = sim.start()
    gw = Gateway(
        pipeline,
        GatewayConfig(
            plus_host="127.0.0.1", plus_port=port, listen_port=0, send_timeout_s=2.0, sync_audit=False
        ),
    ).start()
    stalled = client = None
    try:
        # late: frames processed while no client listens are counted; nothing waits for a client
        wait_until(
            lambda: gw.stats()["processed_without_client"] >= 2, 90, "frames processed without a client"
        )
        # stalls: a client that connects and never reads, beside a live one
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", gw.listen_port))
        client = RecordingClient(gw.listen_port)
        wait_until(lambda: gw.server.disconnects["stalled"] == 1, 90, "the stalled client to be dropped")
        n = len(client.of("IMAGE"))
        wait_until(lambda: len(client.of("IMAGE")) >= n + 2, 90, "results to keep flowing to the live client")
        # disconnects: the gateway goes on without clients
        client.stop()
        wait_until(lambda: not gw.server.connections, 90, "the gateway to see the client go")
        done = gw.stats()["processed"]
        wait_until(lambda: gw.stats()["processed"] >= done + 2, 90, "processing to go on")
    finally:
        if client is not None:
            client.stop()
        if stalled is not None:
            stalled.close()
        summary = gw.stop()
        sim.stop()
    g = summary["gateway"]
    assert g["clients"]["connects"] == 2
    assert g["clients"]["disconnects"]["stalled"] == 1 and g["clients"]["disconnects"]["closed_by_peer"] == 1
    assert g["processed_without_client"] >= 2 and g["client_drops"] >= 1
    assert g["frames_in"] == g["processed"] + g["dropped"]
    assert "disconnected (stalled" in caplog.text and "disconnected (closed by peer)" in caplog.text


def test_garbage_and_unsupported_messages_are_counted_and_the_stream_goes_on(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="UltramotionIGTLib.services")
    plus = IgtlServer(0, name="test PLUS")
    port = plus.start()
    gw = Gateway(pipeline, GatewayConfig(plus_host="127.0.0.1", plus_port=port, listen_port=0)).start()
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (1, 48, 64), dtype=np.uint8)
    good = image_message(frame, timestamp=time.time()).pack()
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    status = pyigtl.StringMessage("ok", device_name="Status")
    status._message_type = "STATUS"
    unknown_pixel = bytearray(good)
    unknown_pixel[58 + 12 + 3] = 9
    unknown_pixel[50:58] = pyigtl.messages.CRC64(bytes(unknown_pixel[58:])).to_bytes(8, "big")
    stream = [
        good,
        rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),  # garbage
        pyigtl.StringMessage("hello", device_name="Note").pack(),  # a type the gateway does not use
        image_message(
            np.zeros((1, 48, 64), np.int16), metadata={"UltrasoundImageType": "RF_I_LINE_Q_LINE"}
        ).pack(),
        image_message(np.zeros((2, 48, 64), np.uint8)).pack(),  # 3-D volume
        image_message(np.zeros((1, 48, 64), np.float32)).pack(),  # pixel type
        image_message(np.zeros((1, 0, 64), np.uint8)).pack(),  # zero size
        bytes(corrupt),  # CRC mismatch
        status.pack(),  # undecoded type
        bytes(unknown_pixel),  # scalar type OpenIGTLink does not define
        image_message(frame, name="Doppler").pack(),  # another device than the one segmented
        image_message(
            rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8), timestamp=time.time()
        ).pack(),  # RGB
        image_message(frame, timestamp=time.time()).pack(),
    ]
    try:
        wait_until(lambda: plus.connections and gw.plus.connected, 90, "the gateway to connect")
        plus.broadcast(b"".join(stream))
        wait_until(
            lambda: gw.stats()["frames_in"] == 3 and accounted(gw), 90, "the valid frames to be handled"
        )
        alive = gw.plus.connected
    finally:
        summary = gw.stop()
        plus.stop()
    g = summary["gateway"]
    assert alive and g["plus"]["disconnects"] == 0  # the stream went on, on the same connection
    assert g["bad_messages"] == {"garbage": 1, "crc": 1, "unsupported_type": 1, "pixel_type": 1}
    assert g["ignored"] == {"STRING": 1}
    assert g["rejected"] == {"rf_data": 1, "volume_3d": 1, "pixel_type": 1, "zero_size": 1, "other_device": 1}
    assert g["messages_received"]["IMAGE"] == 8 and g["processed"] >= 1
    log = caplog.text
    assert "rejected (rf_data)" in log and "(garbage): 4000 bytes" in log and "(crc)" in log


# -- the command line --------------------------------------------------------------------------------


@pytest.mark.plus
def test_serve_replay_answers_a_pyigtl_client_and_stops_cleanly_on_sigint(plus_dir, tmp_path, capsys):
    """``serve --replay`` through the command line's own entry point, stopped by a real SIGINT."""
    from UltramotionIGTLib.tools.cli import main

    port = free_port()
    record = tmp_path / "record"
    client = RecordingClient(port)
    seen = threading.Event()

    def interrupt_when_served() -> None:
        deadline = time.monotonic() + 120
        while len(client.of("STRING")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.set()
        time.sleep(1.2)  # at least one status line
        os.kill(os.getpid(), signal.SIGINT)  # serve's handler stops it; pytest's is back afterwards

    watcher = threading.Thread(target=interrupt_when_served, daemon=True)
    watcher.start()
    argv = ["serve", "--replay", str(plus_dir / RECORDING), "--rate", "30", "--listen", str(port)]
    try:
        code = main([*argv, "--device", "cpu", "--record", str(record)])
    finally:
        watcher.join(5)
        client.stop()
    err = capsys.readouterr().err
    assert code == 0 and seen.is_set()
    images = client.of("IMAGE")
    assert len(images) >= 2 and images[0].image.shape == (1, 616, 820)
    assert "serving label maps on 127.0.0.1:" in err and " fps | out " in err
    summary = json.loads((record / "summary.json").read_text())
    assert summary["frames_out"] >= 2 and summary["gateway"]["frames_in"] >= summary["frames_out"]
    assert (record / "segmentation.seq.nrrd").is_file() and not (record / "segmentation.seq.raw").exists()
    assert signal.getsignal(signal.SIGINT) is not None


def test_serve_max_frames_processes_exactly_that_many(plus_dir, tmp_path, capsys):
    """--max-frames N: N frames processed and recorded, not what arrives before the next status tick."""
    from UltramotionIGTLib.tools.cli import main

    record = tmp_path / "rec"
    argv = ["serve", "--replay", str(plus_dir / RECORDING), "--rate", "30", "--listen", "0", "--quiet"]
    assert main([*argv, "--device", "cpu", "--max-frames", "3", "--record", str(record)]) == 0
    summary = json.loads((record / "summary.json").read_text())
    assert summary["gateway"]["processed"] == 3 and summary["frames_out"] == 3
    records = [json.loads(line) for line in (record / "kpi.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "frame" for r in records) == 3
    capsys.readouterr()


def test_serve_refuses_bad_options_with_exit_code_2(capsys, tmp_path):
    from UltramotionIGTLib.tools.cli import main

    assert main(["serve", "--plus", "localhost:notaport", "--device", "cpu"]) == 2
    assert main(["serve", "--replay", str(tmp_path / "missing.igs.mha"), "--device", "cpu"]) == 2
    assert main(["serve", "--output-name", "x" * 21, "--device", "cpu"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert main(["serve", "--plus", "127.0.0.1:9", "--listen", port, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "HOST:PORT" in err and "missing.igs.mha" in err and "20 bytes" in err
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_bench_gateway_reports_round_trip_next_to_in_process(capsys):
    from UltramotionIGTLib.tools.cli import main

    argv = ["bench", "gateway", "--device", "cpu", "--frames", "1", "--warmup", "0"]  # the shipped demo pack
    assert main([*argv, "--open-loop-frames", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["in_process_ms"]["p50"] > 0 and report["round_trip_ms"]["p50"] > 0
    assert report["overhead_ratio_p50"] == pytest.approx(
        report["round_trip_ms"]["p50"] / report["in_process_ms"]["p50"]
    )
    assert set(report["gateway_ms"]) == {"queue", "pipeline", "encode", "total"}
    open_loop = report["open_loop"]
    assert (
        open_loop["answered"] + sum(open_loop["dropped_by_cause"].values()) == open_loop["frames_sent"] == 3
    )


def test_recorder_streams_a_readable_sequence_and_widens_past_255_segments(tmp_path):
    from UltramotionIGTLib.core.packet import HostResult
    from UltramotionIGTLib.io import read_segmentation_sequence
    from UltramotionIGTLib.services.gateway import InputFrame
    from UltramotionIGTLib.services.recorder import StreamRecorder

    rng = np.random.default_rng(3)
    a = np.deg2rad(30.0)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [0.2, 0.3, 1.0]
    )
    matrix[:3, 3] = (-12.5, 40.0, 7.0)
    h, w = 12, 16

    def frame(i, shape=(h, w)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        return InputFrame(i, "Image", image, matrix, "ras", 100.0 + i / 30, {}, 0.0, 0.0)

    def result(i, shape=(h, w)):
        mask = np.zeros((1, *shape), bool)
        mask[0, 2:5, 3:7] = True
        return HostResult(
            i, shape, np.array([[3, 2, 7, 5]], np.float32), np.array([0.9], np.float32), np.array([0]),
            np.array([[4.5, 3.0]], np.float32), np.array([12.0], np.float32), np.array([1]), mask,
        )  # fmt: skip

    recorder = StreamRecorder(tmp_path, "test", {"device": "cpu"})
    labels = []
    for i in range(3):
        labelmap = rng.integers(0, 4, (h, w), dtype=np.uint8)
        recorder.write_frame(
            frame(i), result(i), labelmap, [(1, "vessel-1", (0.9, 0.25, 0.25))], FrameRecord(frame=i)
        )
        labels.append(labelmap)
    running = read_segmentation_sequence(tmp_path / "segmentation.seq.nhdr")  # readable while recording
    np.testing.assert_array_equal(running.labelmaps, np.stack(labels))
    np.testing.assert_allclose(running.ijk_to_ras(), matrix, atol=1e-12)
    recorder.write_frame(
        frame(3, (5, 5)), result(3, (5, 5)), np.zeros((5, 5), np.uint8), [], FrameRecord(frame=3)
    )
    wide = rng.integers(0, 300, (h, w)).astype(np.uint16)  # a stream past 255 segments
    recorder.write_frame(
        frame(4), result(4), wide, [(300, "vessel-300", (0.9, 0.25, 0.25))], FrameRecord(frame=4)
    )
    labels.append(wide)
    summary = recorder.close({"frames_out": 5})

    assert summary["recorded_frames"] == 4 and summary["skipped_size"] == 1
    assert not (tmp_path / "segmentation.seq.nhdr").exists()
    seg = read_segmentation_sequence(tmp_path / "segmentation.seq.nrrd")
    assert seg.labelmaps.dtype == np.uint16
    np.testing.assert_array_equal(seg.labelmaps, np.stack(labels).astype(np.uint16))
    np.testing.assert_allclose(seg.timestamps, [100 + i / 30 for i in (0, 1, 2, 4)])
    assert [s.value for s in seg.segments] == [300]
    lines = [json.loads(line) for line in (tmp_path / "kpi.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start"] + ["frame"] * 5 + ["summary"]
    np.testing.assert_allclose(np.reshape(lines[1]["ijk_to_ras"], (4, 4)), matrix)
    assert json.loads((tmp_path / "summary.json").read_text())["recorded_frames"] == 4

    slicer = pytest.importorskip("slicer", reason="slicer-core checks that Slicer reads the recording")
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    storage, sequence = slicer.vtkMRMLVolumeSequenceStorageNode(), slicer.vtkMRMLSequenceNode()
    scene.AddNode(storage)
    scene.AddNode(sequence)
    storage.SetFileName(str(tmp_path / "segmentation.seq.nrrd"))
    assert storage.ReadData(sequence) == 1
    assert sequence.GetNumberOfDataNodes() == 4
    volume = sequence.GetNthDataNode(3)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], matrix, atol=1e-9)
    voxels = numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).reshape(h, w)
    np.testing.assert_array_equal(voxels, wide)
