"""`ultramotion-igt doctor`: the pre-flight checks, on real files, the real torch and real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from UltramotionIGTLib.tools import cli, doctor
from UltramotionIGTLib.tools.doctor import CheckResult, CheckStatus, format_report, run_checks

REPO_ROOT = Path(__file__).resolve().parents[1]


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


@pytest.fixture(scope="module")
def test_models(tmp_path_factory) -> tuple[Path, Path]:
    """Small random-weight models in the real formats (HF D-FINE folder, SAM safetensors)."""
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    out = tmp_path_factory.mktemp("models")
    det = write_random_detector(out / "detector", image_size=128, seed=0)
    sam = write_random_sam_checkpoint(
        out / "sam" / "sam_vit_t_demo.safetensors", model_type="vit_t_demo", seed=0
    )
    return Path(det), Path(sam)


def test_models_root_is_resources_models_beside_the_library():
    assert doctor.models_root() == REPO_ROOT / "Resources" / "Models"


def test_python_and_torch_checks_report_versions():
    results = by_name(run_checks(device="cpu", detector_dir="/nonexistent", sam_checkpoint="/nonexistent"))
    assert results["python"].status is CheckStatus.OK
    assert results["torch"].status is CheckStatus.OK
    assert torch.__version__ in results["torch"].summary
    assert results["torch"].details["torch_cuda"] == torch.version.cuda


def test_missing_model_files_fail_with_the_path_and_what_to_do(tmp_path):
    missing = tmp_path / "no_such_detector"
    results = run_checks(device="cpu", detector_dir=missing, sam_checkpoint=tmp_path / "no_sam.pth")
    checks = by_name(results)
    assert checks["detector files"].status is CheckStatus.FAIL
    assert str(missing) in checks["detector files"].summary
    assert "config.json" in checks["detector files"].advice
    assert checks["SAM files"].status is CheckStatus.FAIL
    assert "no_sam.pth" in checks["SAM files"].summary
    for name in ("detector load", "SAM load", "warm-up"):
        assert checks[name].status is CheckStatus.SKIP
    assert not doctor.all_ok(results)
    report = format_report(results)
    assert report.splitlines()[-1].startswith("NOT READY: 2 check(s) failed")
    assert "-> " in report


def test_detector_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    res = doctor.check_detector_files(tmp_path)
    assert res.status is CheckStatus.FAIL
    assert "model.safetensors" in res.summary and "config.json" not in res.summary
    res = doctor.check_detector_files(tmp_path.parent / "absent")
    assert res.status is CheckStatus.FAIL and "does not exist" in res.summary


def test_sam_checkpoint_lookup_and_empty_file(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"x" * 10)
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert doctor.find_sam_checkpoint(tmp_path) == tmp_path / "a.safetensors"
    assert doctor.find_sam_checkpoint(tmp_path / "b.pth") == tmp_path / "b.pth"
    assert doctor.find_sam_checkpoint(tmp_path / "missing") is None
    res = doctor.check_sam_files(tmp_path)
    assert res.status is CheckStatus.FAIL and "empty" in res.summary and "a.safetensors" in res.summary
    (tmp_path / "a.safetensors").unlink()
    res = doctor.check_sam_files(tmp_path)
    assert res.status is CheckStatus.OK and res.details["path"].endswith("b.pth")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert doctor.check_sam_files(empty).status is CheckStatus.FAIL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_cuda_requested_without_cuda_fails_and_says_what_to_do():
    res = doctor.check_device("cuda")
    assert res.status is CheckStatus.FAIL
    assert "cuda" in res.summary
    assert "cpu" in res.advice
    auto = doctor.check_device("auto")
    assert auto.status is CheckStatus.WARN
    assert auto.details["device"] == "cpu"
    assert "GPU" in auto.advice
    assert doctor.check_device("cpu").status in (CheckStatus.OK, CheckStatus.WARN)


def test_unknown_device_fails():
    res = doctor.check_device("tpu")
    assert res.status is CheckStatus.FAIL
    assert "tpu" in res.summary


@pytest.mark.gpu
def test_cuda_device_details():
    res = doctor.check_device("cuda")
    assert res.status in (CheckStatus.OK, CheckStatus.WARN)
    props = torch.cuda.get_device_properties(0)
    assert res.details["name"] == props.name
    assert res.details["compute_capability"] == f"{props.major}.{props.minor}"
    assert 0 < res.details["free_mib"] <= res.details["total_mib"]


def test_main_exit_code_and_json(tmp_path, capsys):
    argv = ["--device", "cpu", "--detector", str(tmp_path / "d"), "--sam", str(tmp_path / "s.pth")]
    assert cli.main(["doctor", *argv, "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ready"] is False
    statuses = {c["name"]: c["status"] for c in payload["checks"]}
    assert statuses["detector files"] == "fail" and statuses["torch"] == "ok"
    assert cli.main(["doctor", *argv, "--no-warmup"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] detector files" in out


def test_corrupt_checkpoints_fail_to_load(tmp_path):
    det = tmp_path / "detector"
    det.mkdir()
    (det / "config.json").write_text('{"model_type": "d_fine"')  # truncated JSON
    (det / "model.safetensors").write_bytes(b"\x00" * 64)
    sam = tmp_path / "sam.safetensors"
    sam.write_bytes(b"not a safetensors file")
    checks = by_name(run_checks(device="cpu", detector_dir=det, sam_checkpoint=sam, sam_type="vit_t_demo"))
    assert checks["detector files"].status is CheckStatus.OK
    assert checks["detector load"].status is CheckStatus.FAIL
    assert checks["SAM load"].status is CheckStatus.FAIL
    assert "sam.safetensors" in checks["SAM load"].summary
    assert checks["warm-up"].status is CheckStatus.SKIP


def test_real_models_load_and_warm_up(test_models):
    det, sam = test_models
    results = run_checks(device="cpu", detector_dir=det, sam_checkpoint=sam, sam_type="vit_t_demo")
    checks = by_name(results)
    for name in ("detector files", "SAM files", "detector load", "SAM load"):
        assert checks[name].status is CheckStatus.OK, checks[name].format()
    warm = checks["warm-up"]
    assert warm.status in (CheckStatus.OK, CheckStatus.WARN), warm.format()
    assert warm.details["first_ms"] > 0 and warm.details["steady_ms"] > 0
    assert warm.details["fps"] == pytest.approx(1000.0 / warm.details["steady_ms"])
    assert doctor.all_ok(results)
    assert format_report(results).splitlines()[-1].startswith("READY")


def test_check_result_formatting():
    r = CheckResult("x", CheckStatus.WARN, "found y", "do z")
    assert r.ok
    assert r.format() == "[WARN] x: found y\n       -> do z"
    assert not CheckResult("x", CheckStatus.FAIL, "bad").ok
    assert format_report([r]).endswith("READY with 1 warning(s) (x).")


def test_doctor_prints_family_size_classes_channels_and_parameters(tmp_path, test_models, capsys):
    """The hub's D-FINE-N config made grey (1 channel) with 3 named classes, and a SAM: what doctor
    says about each model."""
    from test_dfine_hub_configs import HUB_CONFIGS, hub_config
    from transformers import DFineForObjectDetection

    from UltramotionIGTLib.core.detector import save_detector_folder

    _, sam = test_models
    config = hub_config(HUB_CONFIGS["dfine-n-coco"], num_labels=3)
    config.backbone_config.num_channels = 1  # a grey stem, as `models import-dfine` writes mono models
    config.backbone_config.stem_channels = [1, *config.backbone_config.stem_channels[1:]]
    config.id2label = {0: "vessel", 1: "needle", 2: "nerve"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    model = DFineForObjectDetection(config).eval()
    folder = save_detector_folder(model, tmp_path / "dfine_n_grey", 320)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    code = cli.main(["doctor", "--device", "cpu", "--detector", str(folder), "--sam", str(sam)])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if "detector load" in line)
    assert "D-FINE-N, 3 classes (vessel, needle, nerve), 1-channel input 320x320" in line, line
    assert f"{parameters / 1e6:.2f} M parameters" in line
    line = next(line for line in out.splitlines() if "SAM load" in line)
    assert "SAM-vit_t_demo, 3-channel input 256x256" in line and " M parameters" in line, line


@pytest.mark.plus
def test_warm_up_on_the_users_frame_size(test_models, plus_dir, tmp_path):
    det, sam = test_models
    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    checks = by_name(run_checks(device="cpu", detector_dir=det, sam_checkpoint=sam, warmup_input=src))
    assert checks["warm-up"].summary.startswith("820x616 frame on cpu"), checks["warm-up"].summary
    bad = by_name(
        run_checks(device="cpu", detector_dir=det, sam_checkpoint=sam, warmup_input=tmp_path / "x.mha")
    )
    assert bad["warm-up"].status is CheckStatus.FAIL and "x.mha" in bad["warm-up"].summary


def test_a_pack_that_run_would_refuse_is_not_ready(tmp_path, capsys):
    """doctor checks a --pack's sha256 as run does: a changed file is a FAIL naming it, not READY."""
    import shutil

    from UltramotionIGTLib.models.packs import default_pack

    pack = shutil.copytree(default_pack(), tmp_path / "pack")
    sam = next((pack / "sam").glob("*.safetensors"))
    data = bytearray(sam.read_bytes())
    data[-100:-96] = b"\x00\x01\x02\x03"
    sam.write_bytes(bytes(data))
    assert cli.main(["doctor", "--no-warmup", "--device", "cpu", "--pack", str(pack)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] pack:" in out and sam.name in out and "sha256" in out
    assert cli.main(["doctor", "--no-warmup", "--device", "cpu", "--pack", str(default_pack())]) == 0
    assert "[OK  ] pack:" in capsys.readouterr().out
