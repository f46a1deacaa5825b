"""The benchmark commands run and report what they promise (no timing is asserted: speed is a benchmark)."""

from __future__ import annotations

import json

import pytest

from UltramotionIGTLib.tools import cli


def test_bench_pipeline_reports_both_paths_and_their_syncs(capsys):
    assert (
        cli.main(
            [
                "bench",
                "pipeline",
                "--random-models",
                "--device",
                "cpu",
                "--frames",
                "2",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    legacy, resident = report["paths"]["legacy"], report["paths"]["gpu_resident"]
    assert resident["host_syncs_per_frame"] == 0.0
    assert legacy["host_syncs_per_frame"] > 0
    assert legacy["fps"] > 0 and resident["fps"] > 0
    assert report["speedup_fps"] == resident["fps"] / legacy["fps"]
    assert {"detector", "sam_encoder", "sam_decoder", "end_to_end"} <= set(resident["latency_ms"])


def test_bench_sam_compares_official_loop_and_batched(capsys):
    assert (
        cli.main(
            [
                "bench",
                "sam",
                "--random-models",
                "--device",
                "cpu",
                "--frames",
                "1",
                "--warmup",
                "0",
                "--boxes",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "official SamPredictor loop" in out and "batched predict_boxes" in out and "official / batched" in out
    )


def test_bench_unknown_benchmark_is_usage_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramotion-igt bench: error: ") and "invalid choice: 'nope'" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_slicer_reports_main_thread_time_next_to_the_pipeline(capsys):
    pytest.importorskip("slicer", reason="slicer-core provides MRML")
    argv = ["bench", "slicer", "--random-models", "--frames", "2", "--sync-frames", "1", "--warmup", "0"]
    assert cli.main([*argv, "--rate", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    threaded, synchronous = report["passes"]
    assert report["shape"] == [616, 820] and "CPU" in report["device"]
    assert (threaded["mode"], synchronous["mode"]) == ("threaded", "synchronous")
    assert threaded["frames_processed"] >= 2 and synchronous["frames_processed"] >= 1
    for p in (threaded, synchronous):
        assert p["frames_produced"] == p["frames_processed"] + p["frames_dropped"]
        assert 0 < p["copy_ms"]["p50"] and 0 < p["write_ms"]["p50"] and 0 < p["pipeline_ms"]["p50"]
    # threaded: the main thread's share is the copy and the write; synchronous: the pipeline too
    assert threaded["main_thread_ms"]["p50"] == pytest.approx(
        threaded["copy_ms"]["p50"] + threaded["write_ms"]["p50"], rel=0.5
    )
    assert threaded["blocked_ms"] == threaded["main_thread_ms"] and threaded["main_thread_cpu_ms"]["p50"] > 0
    assert threaded["mrml_ms"]["p50"] <= threaded["write_ms"]["max"]
    assert synchronous["blocked_ms"]["p50"] >= synchronous["pipeline_ms"]["p50"]
    assert report["sync_over_threaded_main_thread"] > 0 and isinstance(report["target_met"], bool)
    assert cli.main(["bench", "slicer", "--random-models", "--frames", "1", "--rate", "0"]) == 2
    assert "--rate must be > 0" in capsys.readouterr().err
