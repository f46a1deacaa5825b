"""``ultramotion-igt bench gateway``: OpenIGTLink round trip vs the in-process pipeline, one run.

The same frames (default: the PLUS recording SpinePhantomFreehand, 820 x 616) go through:

1. the pipeline in-process (``process_frame`` + ``to_host``), and
2. the gateway over loopback sockets: the benchmark is the PLUS server (sends IMAGE + TRANSFORM)
   and the Slicer-side client; the round trip runs from handing a frame's bytes to the socket to
   the arrival of that frame's last message (its KPI STRING), so it includes encoding, both socket
   hops, decoding, the mailbox, the pipeline, the label map and the four result messages.

The two alternate frame by frame (closed loop: one frame in flight), so that machine load drifts
affect both alike; each path has its own pipeline on the same model objects. Then an open-loop pass
sends frames faster than the pipeline runs (``--rate``, default 1.5 x the in-process rate) to
measure the gateway's throughput and its drop accounting. Prints p50/p95 latencies, the overhead
(round trip - in-process, and their ratio), the gateway's own per-stage times from its KPI records,
and throughput next to the in-process frame rate.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.tools.benchmarks.common import (
    add_bench_arguments,
    device_name,
    device_sync,
    table,
)

PLUS_RECORDING = "SpinePhantomFreehand.igs.mha"


def _default_recording() -> Path | None:
    env = os.environ.get("ULTRAMOTION_PLUS_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data" / "plus"
    path = root / PLUS_RECORDING
    return path if path.is_file() else None


def load_gateway_frames(path: str | None, n: int) -> tuple[Any, str]:
    """An `UltrasoundSequence` of ``n`` frames: ``path``, else the PLUS recording (820 x 616), else a
    synthetic phantom of the same size."""
    from UltramotionIGTLib.io import read_sequence

    source = Path(path) if path else _default_recording()
    if source is not None:
        seq = read_sequence(source)
        seq = seq.subset([i % seq.n_frames for i in range(n)])
        return seq, f"{source.name} ({seq.frame_shape[1]}x{seq.frame_shape[0]})"
    from dataclasses import replace

    from UltramotionIGTLib.io import UltrasoundSequence
    from UltramotionIGTLib.tools.phantom import PhantomStream, frames_to_arrays
    from UltramotionIGTLib.tools.training.common import demo_phantom_config

    config = replace(demo_phantom_config(), width=820, height=616)
    images, timestamps = frames_to_arrays(list(PhantomStream(config, seed=0, n_frames=n)))
    seq = UltrasoundSequence(frames=images, timestamps=timestamps)
    return seq, f"synthetic phantom (820x616; {PLUS_RECORDING} not found)"


class _Peer:
    """The benchmark's PLUS server and Slicer client around one gateway."""

    def __init__(self, sequence: Any) -> None:
        import pyigtl

        from UltramotionIGTLib.services.igtl import IgtlServer

        self.sequence = sequence
        self.plus = IgtlServer(0, name="bench PLUS")
        self.plus.start()
        self.records: dict[int, tuple[float, dict[str, Any]]] = {}
        self.bytes_back: dict[int, int] = {}
        self._cond = threading.Condition()
        self._pyigtl = pyigtl
        self.name = next(iter(sequence.transforms), None)
        self.client: Any = None

    def connect(self, gateway_port: int) -> None:
        from UltramotionIGTLib.services.igtl import IgtlClient

        self.client = IgtlClient("127.0.0.1", gateway_port, name="bench client", on_message=self._on_message)
        self.client.start()

    def _on_message(self, item: Any) -> None:
        t = time.perf_counter()
        if getattr(item, "message_type", "") != "STRING":
            return
        from UltramotionIGTLib.services.protocol import parse_kpi_string

        record = parse_kpi_string(item.string)
        with self._cond:
            self.records[int(record["frame"])] = (t, record)
            self._cond.notify_all()

    def payload(self, i: int) -> bytes:
        seq, pyigtl = self.sequence, self._pyigtl
        stamp = time.time()
        msgs = []
        if self.name is not None:
            msgs.append(
                pyigtl.TransformMessage(seq.transforms[self.name][i], timestamp=stamp, device_name=self.name)
            )
        msgs.append(
            pyigtl.ImageMessage(
                seq.frames[i][np.newaxis],
                ijk_to_world_matrix=seq.ijk_to_ras(),
                world_coordinate_system="ras",
                timestamp=stamp,
                device_name="Image",
            )
        )
        return b"".join(m.pack() for m in msgs)

    def wait_for(self, frame: int, timeout: float) -> tuple[float, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while frame not in self.records:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.records[frame]


def _wait(cond: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _p(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import describe_from_doc, positive_int

    describe_from_doc(parser, __doc__)
    add_bench_arguments(parser)
    parser.add_argument(
        "--rate", type=float, default=None, help="open-loop send rate, Hz (default 1.5 x in-process FPS)"
    )
    parser.add_argument(
        "--open-loop-frames", type=positive_int, default=None, help="frames in the open-loop pass"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.errors import UltramotionError, UsageError
    from UltramotionIGTLib.services.gateway import Gateway, GatewayConfig
    from UltramotionIGTLib.tools.options import resolve_model_source

    if args.rate is not None and not args.rate > 0:
        raise UsageError(f"--rate must be > 0 Hz, got {args.rate}")
    source_models = resolve_model_source(args)
    device = resolve_device(args.device)
    sync = device_sync(device)
    n = args.frames + args.warmup
    sequence, source = load_gateway_frames(args.input, n)
    detector, segmenter = source_models.load(device)
    models = source_models.describe()
    config = PipelineConfig(device=str(device))
    local = Pipeline(detector, segmenter, config)
    served = Pipeline(detector, segmenter, config)

    peer = _Peer(sequence)
    gateway = Gateway(
        served,
        GatewayConfig(plus_host="127.0.0.1", plus_port=peer.plus.port, listen_port=0, sync_audit=False),
        source="bench gateway",
    )
    gateway.start()
    try:
        peer.connect(gateway.listen_port)
        if not _wait(lambda: peer.plus.connections and gateway.server.connections and peer.client.connected):
            raise UltramotionError("bench gateway: the loopback connections did not come up within 30 s")
        inproc, rtt, gw_stage = [], [], {"queue": [], "pipeline": [], "encode": [], "total": []}
        payload_bytes = 0
        for i in range(n):
            t0 = time.perf_counter()
            local.process_frame(sequence.frames[i], i).to_host()
            sync()
            t_local = (time.perf_counter() - t0) * 1000.0
            payload = peer.payload(i)
            payload_bytes = len(payload)
            t_send = time.perf_counter()
            peer.plus.broadcast(payload)
            got = peer.wait_for(i, timeout=60.0)
            if got is None:
                raise UltramotionError(f"bench gateway: no answer for frame {i} within 60 s")
            if i >= args.warmup:
                inproc.append(t_local)
                rtt.append((got[0] - t_send) * 1000.0)
                for key in gw_stage:
                    gw_stage[key].append(float(got[1]["gateway_ms"][key]))
        in_fps = 1000.0 / float(np.mean(inproc))
        closed = gateway.stats()

        # open loop: faster than the pipeline, to see throughput and the drop accounting
        rate = args.rate or 1.5 * in_fps
        m = args.open_loop_frames or max(2 * args.frames, 20)
        first = n
        t_start = time.perf_counter()
        for k in range(m):
            due = t_start + k / rate
            while (wait := due - time.perf_counter()) > 0:
                time.sleep(min(wait, 0.005))
            peer.plus.broadcast(peer.payload(k % sequence.n_frames))
        t_sent = time.perf_counter()
        _wait(lambda: gateway.stats()["frames_in"] >= first + m, timeout=30.0)
        _wait(lambda: gateway.stats()["processed"] + gateway.stats()["dropped"] >= first + m, timeout=60.0)
        after = gateway.stats()
        done = after["processed"] - closed["processed"]
        _wait(lambda: sum(1 for f in list(peer.records) if f >= first) >= done, timeout=10.0)
        answered = sorted(t for f, (t, _) in list(peer.records.items()) if f >= first)
    finally:
        if peer.client is not None:
            peer.client.stop()
        gateway.stop()
        peer.plus.stop()

    span = (answered[-1] - t_start) if answered else float("nan")
    report = {
        "device": device_name(device),
        "models": models,
        "frames": source,
        "measured_frames": args.frames,
        "payload_bytes_per_frame": payload_bytes,
        "in_process_ms": _p(inproc),
        "round_trip_ms": _p(rtt),
        "gateway_ms": {k: _p(v) for k, v in gw_stage.items()},
        "overhead_ms_p50": _p(rtt)["p50"] - _p(inproc)["p50"],
        "overhead_ratio_p50": _p(rtt)["p50"] / _p(inproc)["p50"],
        "in_process_fps": in_fps,
        "closed_loop_fps": 1000.0 / float(np.mean(rtt)),
        "open_loop": {
            "send_rate_hz": rate,
            "frames_sent": m,
            "send_s": t_sent - t_start,
            "answered": len(answered),
            "throughput_fps": len(answered) / span if answered and span > 0 else None,
            "dropped_by_cause": {
                k: v - closed["dropped_by_cause"].get(k, 0) for k, v in after["dropped_by_cause"].items()
            },
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"device: {report['device']}\nmodels: {models}\nframes: {source}, {args.frames} measured "
        f"(+{args.warmup} warm-up), in-process and gateway alternating frame by frame\n"
        f"gateway messages per frame: {payload_bytes} bytes in (IMAGE + TRANSFORM)\n"
    )
    print(
        table(
            ["path (ms)", "p50", "p95"],
            [
                ["in-process pipeline (process_frame + to_host)", *report["in_process_ms"].values()],
                ["gateway round trip over loopback", *report["round_trip_ms"].values()],
                *[[f"  gateway {k}", *v.values()] for k, v in report["gateway_ms"].items()],
            ],
        )
    )
    ol = report["open_loop"]
    print()
    print(
        table(
            ["throughput", "FPS"],
            [
                ["in-process (1 / mean time)", in_fps],
                ["gateway, closed loop (1 / mean round trip)", report["closed_loop_fps"]],
                [
                    f"gateway, open loop at {ol['send_rate_hz']:.1f} Hz ({ol['answered']}/{m} answered)",
                    ol["throughput_fps"] or "-",
                ],
            ],
        )
    )
    causes = ", ".join(f"{k} {v}" for k, v in ol["dropped_by_cause"].items() if v) or "none"
    print(
        f"\noverhead (round trip - in-process, p50): {report['overhead_ms_p50']:.2f} ms; "
        f"round trip / in-process: {report['overhead_ratio_p50']:.2f}x; open-loop drops: {causes}"
    )
    return 0
