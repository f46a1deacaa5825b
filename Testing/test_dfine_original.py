"""``models import-dfine``: checkpoints of the original D-FINE code, checked against its own outputs.

The golden outputs in Testing/data/dfine_original were produced by the original implementation
(github.com/Peterande/D-FINE) from random weights; see the README there. The weights are rebuilt here
from the recorded key list, seed and buffers (no code of the original is involved), saved the way the
original trainer or a framework on its modules saves them, imported, and run on the same inputs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.detector import CONFIG_NAME, WEIGHTS_NAME, DFineDetector, postprocess_detections
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.models.dfine_original import (
    import_original_dfine,
    infer_architecture,
    load_original_state_dict,
    read_original_config,
    to_dfine_config,
)
from UltramotionIGTLib.tools.cli import main as cli_main

DATA = Path(__file__).resolve().parent / "data" / "dfine_original"
CLASSES = ("vessel", "needle")
TOLERANCE = 1e-4  # logits and normalised boxes (measured: under 1e-5 for N, S, M, L and X)


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def manifests() -> dict:
    with gzip.open(DATA / "variants.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def buffers() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(DATA / "buffers.safetensors"))


@pytest.fixture(scope="module")
def goldens() -> dict[str, np.ndarray]:
    return dict(np.load(DATA / "outputs.npz"))


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """The model inputs of the goldens: F x 640 x 640 uint8 (PLUS frames, see the README)."""
    return np.load(DATA / "inputs.npz")["frames"]


def original_state_dict(manifest: dict, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The random weights of a golden variant, in the original module layout (README: "weights")."""
    rng = np.random.RandomState(manifest["seed"])
    state = {}
    for key, shape, _dtype in manifest["keys"]:
        if key in manifest["kept"]:
            state[key] = buffers[manifest["kept"][key]].clone()
            continue
        z = rng.standard_normal(int(np.prod(shape))).astype(np.float32).reshape(shape)
        leaf = key.rsplit(".", 1)[-1]
        if len(shape) == 2:  # linear layers: 0.5 / sqrt(fan_in)
            value = z * np.float32(0.5 / np.sqrt(shape[1]))
        elif len(shape) > 2:  # convolutions: 1 / sqrt(fan_in)
            value = z / np.float32(np.sqrt(np.prod(shape[1:])))
        elif leaf in ("weight", "scale"):
            value = 1.0 + 0.1 * z
        else:
            value = 0.02 * z
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def _model_input(inputs: np.ndarray, channels: int) -> torch.Tensor:
    x = torch.from_numpy(inputs).float()[:, None]
    return x.expand(-1, channels, -1, -1).contiguous()


def assert_matches_golden(
    logits: torch.Tensor, boxes: torch.Tensor, goldens: dict, variant: str, frames: list[int]
) -> None:
    """Golden ``frames`` vs ours: elementwise within TOLERANCE, up to swaps of near-tied queries.

    The encoder picks the top-k of its per-token scores; tokens whose scores differ by less than the
    float rounding of two implementations (README: adjacent gaps < 1e-5) may come out in either order.
    The decoder treats its queries as a set (self-attention has no query order), so such a swap only
    permutes the outputs. Each golden query is matched to the query of ours that equals it.
    """
    ours = torch.cat([logits.float(), boxes.float()], -1).numpy()
    theirs = np.concatenate([goldens[f"{variant}.pred_logits"], goldens[f"{variant}.pred_boxes"]], -1)[frames]
    assert ours.shape == theirs.shape
    for i, frame in enumerate(frames):
        distance = np.abs(theirs[i][:, None, :] - ours[i][None, :, :]).max(-1)
        match = distance.argmin(1)
        worst = float(distance[np.arange(len(match)), match].max())
        assert worst <= TOLERANCE, f"{variant} frame {frame}: a golden query is {worst:.2e} from ours"
        assert len(set(match.tolist())) == len(match), f"{variant} frame {frame}: not a one-to-one match"
        moved = int((match != np.arange(len(match))).sum())
        assert moved <= 10, f"{variant} frame {frame}: {moved} queries moved (more than near-ties explain)"
        # the queries are distinguishable: the match is not satisfied by look-alike outputs
        second_nearest = np.partition(distance, 1, axis=1)[:, 1]
        assert np.median(second_nearest) > 100 * TOLERANCE


def _import(tmp_path: Path, variant: str, manifests, buffers, config=None) -> tuple:
    checkpoint = tmp_path / f"{variant}.pt"
    torch.save(original_state_dict(manifests[variant], buffers), checkpoint)
    out = tmp_path / f"{variant}_hf"
    report = import_original_dfine(checkpoint, out, config=config, class_names=CLASSES)
    return report, DFineDetector.from_pretrained(out, device="cpu", channels_last=False)


ALL_FRAMES = [0, 1, 2]


def _run_goldens(detector: DFineDetector, inputs: np.ndarray, frames: list[int]) -> tuple[torch.Tensor, ...]:
    # the goldens' inputs are already 640x640: the detector's preprocessing is the rescale only
    pixel_values = detector.preprocess_torch(torch.from_numpy(inputs[frames])[:, None])
    with torch.inference_mode():
        outputs = detector.model(pixel_values=pixel_values)
    return outputs.logits, outputs.pred_boxes


# ------------------------------------------------------------------ parity with the original


@pytest.mark.parametrize("variant", ["n_rgb", "n_mono", "s_rgb", "s_mono"])
def test_import_matches_the_original_implementation(variant, manifests, buffers, goldens, inputs, tmp_path):
    report, detector = _import(tmp_path, variant, manifests, buffers)
    size = variant[0].upper()
    channels = 1 if "mono" in variant else 3
    assert f"D-FINE-{size} " in report.lines[1]
    assert report.architecture.in_channels == channels == detector.num_channels
    assert detector.class_names == CLASSES and detector.input_size == (640, 640)
    pixel_values = detector.preprocess_torch(torch.from_numpy(inputs)[:, None])
    assert pixel_values.shape[1] == channels
    # the goldens' inputs divided by 255 as the original's ToTensor does (the processor multiplies by 1/255)
    torch.testing.assert_close(pixel_values, _model_input(inputs, channels) / 255.0, rtol=0, atol=1e-7)
    # the first frame for S-mono (its RGB twin runs all three): keeps the default suite quick
    frames = [0] if variant == "s_mono" else ALL_FRAMES
    assert_matches_golden(*_run_goldens(detector, inputs, frames), goldens, variant, frames)
    if variant == "n_mono":  # grey frames through the product path: detections follow the goldens
        detections = detector.run_inference_batch(torch.from_numpy(inputs), num_top=20)
        expected = postprocess_detections(
            torch.from_numpy(goldens[f"{variant}.pred_logits"]),
            torch.from_numpy(goldens[f"{variant}.pred_boxes"]),
            (640, 640),
            20,
        )
        torch.testing.assert_close(detections.scores, expected.scores, rtol=0, atol=TOLERANCE)
        # a colour frame reaches a grey model as its luma
        colour = torch.from_numpy(inputs[0])[..., None].expand(-1, -1, 3)
        single = detector.run_inference_torch(colour, num_top=20)
        torch.testing.assert_close(single.scores, detections.scores[0], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["m_rgb", "l_rgb", "x_rgb"])
def test_import_matches_the_original_for_m_l_x(variant, manifests, buffers, goldens, inputs, tmp_path):
    report, detector = _import(tmp_path, variant, manifests, buffers)
    assert f"D-FINE-{variant[0].upper()} " in report.lines[1]
    assert_matches_golden(*_run_goldens(detector, inputs, ALL_FRAMES), goldens, variant, ALL_FRAMES)


def test_training_yaml_decides_what_the_shapes_cannot(manifests, buffers, goldens, inputs, tmp_path):
    """eval_idx=-2: the original evaluates after its second-to-last decoder layer; so must the import."""
    config = DATA / "configs" / "dfine_hgnetv2_s_eval_idx_-2.yml"
    report, detector = _import(tmp_path, "s_rgb_eval_idx_-2", manifests, buffers, config=config)
    assert detector.model.config.decoder_layers == 2  # the third layer is never evaluated by the original
    assert any("eval_idx=-2" in line and str(config) in line for line in report.lines)
    assert_matches_golden(*_run_goldens(detector, inputs, [1]), goldens, "s_rgb_eval_idx_-2", [1])


# ------------------------------------------------------------------ checkpoint shapes and wrappers


def test_trainer_checkpoint_prefers_ema_weights(manifests, buffers, tmp_path):
    state = original_state_dict(manifests["n_rgb"], buffers)
    training = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "last.pth"
    torch.save(
        {
            "date": "2025-01-01T00:00:00",
            "last_epoch": 11,
            "model": training,
            "ema": {"module": state, "updates": 1234, "warmups": 1000},
        },
        path,
    )
    loaded = load_original_state_dict(path)
    assert loaded.source.startswith("EMA weights") and "non-EMA" in loaded.source
    key = "decoder.dec_score_head.2.weight"
    assert torch.equal(loaded.state_dict[key], state[key])
    # a checkpoint without EMA uses "model"; DDP's "module." prefix goes away
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_original_state_dict(path)
    assert loaded.source == "'model' weights" and torch.equal(loaded.state_dict[key], state[key])


def test_cli_prints_its_decisions_and_writes_a_loadable_folder(manifests, buffers, tmp_path, capsys):
    path = tmp_path / "Dfine_last.pt"
    torch.save(original_state_dict(manifests["n_mono"], buffers), path)
    out = tmp_path / "imported"
    assert (
        cli_main(["models", "import-dfine", str(path), "--classes", "vessel,needle", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "plain state dict" in printed and "D-FINE-N" in printed and "1 channel (grey)" in printed
    assert "num_queries=300 (assumed" in printed and "640x640 (from the 2000 anchors" in printed
    assert {p.name for p in out.iterdir()} >= {CONFIG_NAME, WEIGHTS_NAME, "preprocessor_config.json"}
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["model_type"] == "d_fine" and config["backbone_config"]["num_channels"] == 1
    # an existing folder is not overwritten without --force
    assert cli_main(["models", "import-dfine", str(path), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


class _PickledDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2, 2)


def test_bad_checkpoints_get_one_line_and_exit_2(manifests, buffers, tmp_path, capsys):
    out = str(tmp_path / "out")
    pickled = tmp_path / "whole_model.pt"
    torch.save(_PickledDetector(), pickled)
    assert cli_main(["models", "import-dfine", str(pickled), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pickled model object" in err and "_PickledDetector" in err and ".state_dict()" in err
    assert "\x1b" not in err  # torch's colour codes are not passed on

    truncated = tmp_path / "truncated.pt"
    torch.save(original_state_dict(manifests["n_rgb"], buffers), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    assert cli_main(["models", "import-dfine", str(truncated), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(truncated) in err

    for name, content, words in [
        ("text.pth", b"hello\n", "not a PyTorch file"),
        ("empty.pth", b"", "empty (0 bytes)"),
    ]:
        (tmp_path / name).write_bytes(content)
        assert cli_main(["models", "import-dfine", str(tmp_path / name), "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "\x1b" not in err

    not_dfine = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(2, 4)}, not_dfine)
    assert cli_main(["models", "import-dfine", str(not_dfine), "--out", out]) == 2
    assert "not a D-FINE" in capsys.readouterr().err

    state = original_state_dict(manifests["n_rgb"], buffers)
    torch.save(state, tmp_path / "n.pt")
    assert (
        cli_main(["models", "import-dfine", str(tmp_path / "n.pt"), "--classes", "a,b,c", "--out", out]) == 2
    )
    assert "3 names" in capsys.readouterr().err


def test_yaml_that_contradicts_the_weights_is_refused(manifests, buffers, tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "base.yml").write_text(
        (DATA / "configs" / "include" / "dfine_hgnetv2.yml").read_text(), encoding="utf-8"
    )
    wrong = tmp_path / "wrong.yml"
    wrong.write_text(
        "__include__: ['include/base.yml']\nHybridEncoder:\n  hidden_dim: 384\n", encoding="utf-8"
    )
    merged = read_original_config(wrong)
    assert merged["HybridEncoder"]["hidden_dim"] == 384 and merged["HybridEncoder"]["depth_mult"] == 0.34
    state = original_state_dict(manifests["s_rgb"], buffers)
    with pytest.raises(CheckpointError, match=r"hidden_dim=384 but the checkpoint's tensors have 256"):
        infer_architecture(state, merged, config_name=str(wrong))
    missing = tmp_path / "missing_include.yml"
    missing.write_text("__include__: ['nowhere.yml']\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="nowhere.yml.*does not exist"):
        read_original_config(missing)


# ------------------------------------------------------------------ the hub's configs describe these networks


def _meta_state(manifest: dict, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shapes (meta tensors) and the recorded buffers: all the architecture inference reads."""
    return {
        key: buffers[manifest["kept"][key]] if key in manifest["kept"] else torch.empty(shape, device="meta")
        for key, shape, _ in manifest["keys"]
    }


@pytest.mark.parametrize("variant", ["n_rgb", "s_rgb", "m_rgb", "l_rgb", "x_rgb"])
def test_inferred_architecture_equals_the_published_config(variant, manifests, buffers):
    from test_dfine_hub_configs import HUB_CONFIGS, hub_config

    arch = infer_architecture(_meta_state(manifests[variant], buffers))
    ours = to_dfine_config(arch, CLASSES).to_dict()
    hub = hub_config(HUB_CONFIGS[f"dfine-{variant[0]}-coco"], num_labels=2).to_dict()
    for key in (
        "encoder_in_channels",
        "feat_strides",
        "encoder_hidden_dim",
        "encoder_ffn_dim",
        "encode_proj_layers",
        "d_model",
        "decoder_in_channels",
        "decoder_ffn_dim",
        "num_feature_levels",
        "decoder_n_points",
        "decoder_layers",
        "num_queries",
        "max_num_bins",
    ):
        assert ours[key] == hub[key], key
    # the number of blocks and the branch width these multipliers give (N's 0.5 and M's 0.67 both give 2)
    assert round(3 * ours["depth_mult"]) == round(3 * hub["depth_mult"]) and round(
        ours["hidden_expansion"] * ours["encoder_hidden_dim"] // 2
    ) == round(hub["hidden_expansion"] * hub["encoder_hidden_dim"] // 2)
    for key in (
        "stem_channels",
        "stage_in_channels",
        "stage_mid_channels",
        "stage_out_channels",
        "stage_num_blocks",
        "stage_numb_of_layers",
        "stage_downsample",
        "stage_light_block",
        "stage_kernel_size",
        "use_learnable_affine_block",
        "out_indices",
    ):
        assert ours["backbone_config"][key] == hub["backbone_config"][key], key
    # D-FINE-X trains with reg_scale 8 (kept in its weights; the hub config keeps the default 4)
    assert arch.reg_scale == (8.0 if variant == "x_rgb" else 4.0)
