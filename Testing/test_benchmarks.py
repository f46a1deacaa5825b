"""The benchmark commands run and report what they promise (no timing is asserted: speed is a benchmark)."""

from __future__ import annotations

import json

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
    assert err.startswith("usage: ultramotion-igt bench") and "invalid choice: 'nope'" in err
