"""The ``ultramotion-igt`` tree: every command's help, argparse's usage errors, the one error contract,
the model-source options resolved in one place, and a help that imports no torch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from UltramotionIGTLib.errors import CheckpointError, InputFileError, UsageError
from UltramotionIGTLib.models.packs import MANIFEST_NAME, make_pack, models_root
from UltramotionIGTLib.tools import cli
from UltramotionIGTLib.tools.options import add_model_arguments, resolve_model_source

REPO = Path(__file__).resolve().parents[1]


def _leaves(commands=cli.COMMANDS, prefix=()):
    for command in commands:
        path = (*prefix, command.name)
        if command.children:
            yield from _leaves(command.children, path)
        else:
            yield path


def _groups(commands=cli.COMMANDS, prefix=()):
    for command in commands:
        if command.children:
            yield (*prefix, command.name)
            yield from _groups(command.children, (*prefix, command.name))


LEAVES = list(_leaves())
GROUPS = list(_groups())


def _python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_the_tree_has_the_commands_of_the_reference():
    assert {" ".join(p) for p in LEAVES} == {
        "run",
        "demo",
        "evaluate",
        "evaluate-visibility",
        "train detector",
        "train sam",
        "models list",
        "models verify",
        "models import",
        "models manifest",
        "models make",
        "models import-dfine",
        "bench pipeline",
        "bench sam",
        "bench matcher",
        "bench mrml",
        "bench gateway",
        "bench slicer",
        "bench soak",
        "serve",
        "audit",
        "doctor",
        "make-test-models",
    }


@pytest.mark.parametrize("path", [(), *GROUPS, *LEAVES], ids=lambda p: " ".join(p) or "top")
def test_every_help_exits_0_and_shows_the_commands_options(path, capsys):
    assert cli.main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['ultramotion-igt', *path])} ")
    if path in LEAVES:  # the command's configure() ran: it has options beyond -h
        options = {w.strip(",[]()") for w in out.split() if w.startswith(("--", "[--", "(--"))}
        assert options - {"--help"}, out


@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["no-such-command"], "", "argument COMMAND: invalid choice: 'no-such-command'"),
        (["train"], "train", "the following arguments are required: COMMAND"),
        (["bench", "nope"], "bench", "invalid choice: 'nope'"),
        (["run", "--out", "o", "--pack", "p"], "run", "the following arguments are required: --input"),
        (["run", "--input", "i", "--out", "o"], "run", "one of the arguments --pack --detector is required"),
        (["run", "--input", "i", "--out", "o", "--pack", "p", "--x"], "run", "unrecognized arguments: --x"),
        (["run", "--input", "i", "--out", "o", "--pack", "p", "--detector", "d"], "run", "not allowed with"),
        (["demo", "--frames", "0"], "demo", "argument --frames: must be >= 1, got 0"),
        (["demo", "--no-sync-audit"], "demo", "unrecognized arguments: --no-sync-audit"),
        (["evaluate", "--device", "tpu"], "evaluate", "argument --device: 'tpu' is not a device"),
        (["doctor", "--bogus"], "doctor", "unrecognized arguments: --bogus"),
        (["audit", "--format", "xml"], "audit", "argument --format: invalid choice: 'xml'"),
        (["train", "detector"], "train detector", "the following arguments are required: --out"),
        (["train", "sam", "--out", "o", "--steps", "x"], "train sam", "argument --steps: 'x' is not a whole"),
        (["models", "import"], "models import", "the following arguments are required: PACK"),
        (["models", "manifest", "d"], "models manifest", "the following arguments are required: --name"),
        (["models", "list", "--bogus"], "models list", "unrecognized arguments: --bogus"),
        (
            ["bench", "pipeline", "--pack", "p", "--random-models"],
            "bench pipeline",
            "not allowed with argument",
        ),
        (["bench", "matcher", "--repeats", "0"], "bench matcher", "argument --repeats: must be >= 1, got 0"),
        (
            ["bench", "mrml", "--segments"],
            "bench mrml",
            "argument --segments: expected at least one argument",
        ),
        (["make-test-models"], "make-test-models", "the following arguments are required: --out"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, command, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines  # the one line of the error contract, no usage block
    assert lines[0].startswith(f"{' '.join(['ultramotion-igt', *command.split()])}: error: "), lines[0]
    assert message in lines[0] and lines[0].endswith("--help')")


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_command_rejects_an_unknown_option(path, capsys):
    assert cli.main([*path, "--no-such-option"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ultramotion-igt {' '.join(path)}: error: ")


def test_an_ultramotion_error_is_one_line_exit_2(tmp_path, capsys):
    argv = ["run", "--input", "i", "--out", str(tmp_path), "--detector", "d"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert (
        captured.err
        == "ultramotion-igt run: error: --detector needs --sam CKPT (the SAM checkpoint to pair it with)\n"
    )
    missing = tmp_path / "no-such-detector"
    assert cli.main(["demo", "--detector", str(missing), "--sam", "s.pth", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramotion-igt demo: error: --detector ") and str(missing) in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["evaluate", "--help"], ["audit", "--help"]])
def test_help_imports_no_torch(argv):
    proc = _python("-X", "importtime", "-m", "UltramotionIGTLib", *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ultramotion-igt")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "UltramotionIGTLib.tools.cli" in imported  # the importtime lines are there to be read
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "transformers", "segment_anything")}
    assert not heavy, sorted(heavy)[:10]


def test_building_the_tree_imports_no_command_module():
    code = (
        "import sys; from UltramotionIGTLib.tools import cli; cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'UltramotionIGTLib.tools.'))))"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['UltramotionIGTLib.tools.cli']"


def test_ctrl_c_is_one_line_exit_130(tmp_path):
    """A real SIGINT to a real training run (once its first checkpoint shows it is training): one
    line, exit 130, no traceback."""
    out = tmp_path / "d"
    argv = ["train", "detector", "--out", str(out), "--steps", "100000", "--heldout-frames", "0"]
    argv += ["--checkpoint-every", "1", "--batch-size", "1", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "UltramotionIGTLib", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 240
        while (
            not (out / "training-state.pt").exists() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ultramotion-igt train detector: interrupted"
    assert "Traceback" not in err


# -- resolve_model_source -----------------------------------------------------------------------------


def _args(*argv: str, required: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, required=required, random_models=True)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(detector folder, SAM checkpoint, pack folder with both) in the real formats, random weights."""
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    root = tmp_path_factory.mktemp("cli-models")
    det = write_random_detector(root / "detector", seed=0)
    sam = write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", "vit_t_demo", seed=0)
    pack = make_pack(
        root / "pack", detector_dir=det, sam_checkpoint=sam, sam_type="vit_t_demo", name="cli-pack"
    )
    return Path(det), Path(sam), Path(pack)


def test_resolve_explicit_paths(model_files):
    det, sam, _ = model_files
    source = resolve_model_source(_args("--detector", str(det), "--sam", str(sam)))
    assert (source.origin, source.detector, source.sam, source.sam_type) == ("paths", det, sam, "auto")
    assert source.pack is None and source.describe() == f"{det} + {sam}"
    typed = resolve_model_source(
        _args("--detector", str(det), "--sam", str(sam.parent), "--sam-type", "vit_t_demo")
    )
    assert typed.sam == sam and typed.sam_type == "vit_t_demo"  # a folder holding one checkpoint


def test_resolve_pack_folder_name_and_zip(model_files, tmp_path, monkeypatch):
    _, _, pack = model_files
    source = resolve_model_source(_args("--pack", str(pack)))
    assert (source.origin, source.pack, source.pack_name, source.sam_type) == (
        "pack",
        pack,
        "cli-pack",
        "vit_t_demo",
    )
    assert source.detector == pack / "detector" and source.sam.is_file() and source.sam.parent.parent == pack

    monkeypatch.setenv("ULTRAMOTION_MODELS", str(tmp_path / "user"))
    assert cli.main(["models", "import", str(pack)]) == 0
    by_name = resolve_model_source(_args("--pack", "cli-pack"))
    assert by_name.pack == tmp_path / "user" / "cli-pack" and by_name.origin == "pack"

    archive = make_pack(tmp_path / "cli-pack.zip", detector_dir=pack / "detector", sam_checkpoint=source.sam)
    zipped = resolve_model_source(_args("--pack", str(archive)))
    assert zipped.origin == "pack" and zipped.detector.is_dir() and zipped.sam.is_file()
    unpacked = zipped.pack
    assert (unpacked / MANIFEST_NAME).is_file() and Path(tempfile.gettempdir()) in unpacked.parents
    del zipped, source
    import gc

    gc.collect()
    assert not unpacked.exists(), "the unpacked zip lives as long as its ModelSource"


def test_resolve_demo_pack_when_nothing_is_given():
    if not (models_root() / MANIFEST_NAME).is_file():
        pytest.skip("the demo pack is not shipped in this tree")
    source = resolve_model_source(_args())
    assert (source.origin, source.pack, source.pack_name) == ("demo", models_root(), "demo-phantom")
    assert source.detector.is_dir() and source.sam.is_file() and source.sam_type == "vit_t_demo"
    assert source.describe().startswith("shipped demo pack 'demo-phantom'")


def test_resolve_random_models():
    source = resolve_model_source(_args("--random-models"))
    assert source.origin == "random" and source.sam_type == "vit_t_demo"
    assert (source.detector / "config.json").is_file() and source.sam.is_file()


@pytest.mark.parametrize(
    "argv, error, names",
    [
        (["--detector", "{tmp}/nope", "--sam", "{sam}"], InputFileError, "{tmp}/nope"),
        (["--detector", "{det}", "--sam", "{tmp}/nope.pth"], InputFileError, "{tmp}/nope.pth"),
        (["--pack", "{tmp}/no-pack"], CheckpointError, "{tmp}/no-pack"),
        (["--pack", "{sam}"], CheckpointError, "{sam}"),
        (["--sam", "{sam}"], UsageError, "--sam needs --detector"),
        (["--detector", "{det}"], UsageError, "--detector needs --sam"),
        (["--pack", "x", "--sam", "{sam}"], UsageError, "not with --pack"),
        (["--pack", "x", "--sam-type", "vit_b"], UsageError, "--sam-type goes with --sam"),
    ],
)
def test_resolve_names_the_bad_path_or_option_in_one_line(argv, error, names, model_files, tmp_path):
    det, sam, _ = model_files
    fill = {"tmp": tmp_path, "det": det, "sam": sam}
    with pytest.raises(error) as info:
        resolve_model_source(_args(*(a.format(**fill) for a in argv)))
    message = str(info.value)
    assert names.format(**fill) in message and "\n" not in message


def test_run_requires_a_model_source_the_others_default_to_the_demo_pack(capsys):
    assert cli.main(["run", "--input", "i", "--out", "o"]) == 2
    assert "one of the arguments --pack --detector is required" in capsys.readouterr().err
    for path in (["demo"], ["evaluate"], ["doctor"], ["audit"], ["bench", "pipeline"], ["bench", "sam"]):
        assert cli.main([*path, "--help"]) == 0
        assert "default: the shipped demo pack" in " ".join(capsys.readouterr().out.split()), path


def test_demo_end_to_end_with_sync_audit(tmp_path, capsys):
    if not (models_root() / MANIFEST_NAME).is_file():
        pytest.skip("the demo pack is not shipped in this tree")
    out = tmp_path / "demo"
    argv = ["demo", "--frames", "2", "--device", "cpu", "--quiet", "--sync-audit", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "end-to-end Dice vs phantom ground truth" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_out"] == 2 and summary["model_pack"] == str(models_root())
    assert summary["host_syncs_per_frame"] == 0.0 and set(summary["ground_truth_dice"]) >= {"mean"}
    frames = [json.loads(x) for x in (out / "kpi.jsonl").read_text().splitlines()]
    assert [r["host_syncs"] for r in frames if r["event"] == "frame"] == [0, 0]
