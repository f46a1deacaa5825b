"""Mutation check of the transfer audit: hide one sync at a time in a copy of the library, run both gates.

Each `Mutant` injects one construct that syncs (or copies, or uploads) per frame on a GPU into a copy
of ``UltramotionIGTLib`` -- in the pipeline, a helper module, the tracker, the KPI code or inside the
declared host copy. The runtime gate (``ultramotion-igt audit --runtime --fail-on undeclared``) runs
on each copy, the copy's own code imported from the copy; the static lint
(``ultramotion-igt audit UltramotionIGTLib --fail-on critical``) scans each copy. An unmutated copy
is the control: it must pass both.

Print the table (Markdown, as in the README)::

    PYTHONPATH=$PWD .venv/bin/python Testing/audit_mutants.py

`Testing/test_audit_mutants.py` asserts that the runtime gate fails on every mutant, naming the
injected line, and that the README table's static column is what this measures.

Not a test module (no ``test_`` prefix): the suite imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "UltramotionIGTLib"
MARK = "# MUTANT"
#: audited frames per mutant (after 1 warm-up): enough for the periodic mutant (every 5th frame)
FRAMES = 5


@dataclass(frozen=True)
class Edit:
    """Insert ``code`` (lines, indented like the anchor line) before or after the unique line that
    contains ``anchor`` in ``file`` (relative to the repository root)."""

    file: str
    anchor: str
    code: tuple[str, ...]
    after: bool = False


@dataclass(frozen=True)
class Mutant:
    """One injected construct. ``expect``: the ``file`` whose ``file:line`` the runtime gate must name
    (default: the marked line of the first edit; a third-party origin names it as "called from")."""

    name: str
    where: str
    construct: str
    edits: tuple[Edit, ...]
    expect: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


PIPE = "UltramotionIGTLib/core/pipeline.py"
BOXES = "UltramotionIGTLib/core/boxes.py"
TRACK = "UltramotionIGTLib/core/tracking.py"
PACKET = "UltramotionIGTLib/core/packet.py"
KPI = "UltramotionIGTLib/core/kpi.py"
FRAME_END = "        return ResultPacket("  # in Pipeline.process_frame, after every stage
TRACK_END = "        # --- per-detection ids"  # in Tracker._advance
IOU_END = "    floor = eps if eps > 0 else torch.finfo(inter.dtype).tiny"  # in box_iou
STATE = "        # --- matched tracks"  # in Tracker._advance, after association


def _m(name: str, where: str, construct: str, file: str, anchor: str, *code: str, **kw: Any) -> Mutant:
    after = kw.pop("after", False)
    return Mutant(name, where, construct, (Edit(file, anchor, tuple(code), after),), **kw)


MUTANTS: tuple[Mutant, ...] = (
    _m(
        "kwarg-int",
        "pipeline",
        "`int(t)` in a keyword argument",
        PIPE,
        FRAME_END,
        "extra_kpi = dict(n_valid=int(valid.sum()))  " + MARK,
    ),
    _m(
        "kwarg-cpu",
        "pipeline",
        "`.cpu()` in a keyword argument",
        PIPE,
        FRAME_END,
        "extra_kpi = dict(host_boxes=boxes.cpu())  " + MARK,
    ),
    _m(
        "unpacked-any",
        "pipeline",
        "`if valid.any():` on a tensor unpacked from `select_prompts`",
        PIPE,
        FRAME_END,
        "if valid.any():  " + MARK,
        "    pass",
    ),
    _m(
        "param-mask",
        "pipeline",
        "`scores[valid]`: a `valid: Tensor` parameter as a mask",
        PIPE,
        "    areas = mask_probs.sum(dim=(1, 2)) * valid.to(mask_probs.dtype)",
        "kept_scores = scores[valid]  " + MARK,
    ),
    _m(
        "upload",
        "pipeline",
        "per-frame `torch.tensor([...], device=...)`",
        PIPE,
        FRAME_END,
        "size_t = torch.tensor([h, w], device=self.device)  " + MARK,
    ),
    _m(
        "periodic",
        "pipeline",
        "`.item()` every 5th frame",
        PIPE,
        FRAME_END,
        "if frame_index % 5 == 4:",
        "    scores.max().item()  " + MARK,
    ),
    _m(
        "bincount",
        "helper module (boxes.py)",
        "`torch.bincount` (syncs inside its kernel)",
        BOXES,
        IOU_END,
        "torch.bincount((a[..., 2] > a[..., 0]).flatten().long())  " + MARK,
    ),
    _m(
        "histc",
        "helper module (boxes.py)",
        "`torch.histc`",
        BOXES,
        IOU_END,
        "torch.histc(a.float(), bins=4)  " + MARK,
    ),
    _m(
        "linalg",
        "helper module (boxes.py)",
        "`torch.linalg.inv` (error check reads the device)",
        BOXES,
        IOU_END,
        "torch.linalg.inv(torch.eye(2, device=a.device))  " + MARK,
    ),
    Mutant(
        "aliased-nonzero",
        "helper module (boxes.py)",
        "`nonzero` imported under another name at import time",
        (
            Edit(BOXES, "import torch", ("from torch import nonzero as _nz",), after=True),
            Edit(BOXES, IOU_END, ("_nz(a[..., 0] >= 0)  " + MARK,)),
        ),
    ),
    _m(
        "nms",
        "tracker",
        "torchvision `nms`",
        TRACK,
        TRACK_END,
        "import torchvision",
        "torchvision.ops.nms(boxes.float(), scores.float(), 0.5)  " + MARK,
        expect="torchvision",
    ),
    _m(
        "batched-nms",
        "tracker",
        "torchvision `batched_nms`",
        TRACK,
        TRACK_END,
        "import torchvision",
        "torchvision.ops.batched_nms(boxes.float(), scores.float(), labels, 0.5)  " + MARK,
        expect="torchvision",
    ),
    _m("equal", "tracker", "`torch.equal`", TRACK, TRACK_END, "torch.equal(self.ids, self.ids)  " + MARK),
    _m(
        "allclose",
        "tracker",
        "`torch.allclose`",
        TRACK,
        TRACK_END,
        "torch.allclose(self.boxes, self.boxes)  " + MARK,
    ),
    _m(
        "setattr-state",
        "tracker",
        "`if self.alive.any():` on state made with `setattr`",
        TRACK,
        STATE,
        "if self.alive.any():  " + MARK,
        "    pass",
    ),
    _m(
        "repeat-interleave",
        "tracker",
        "`repeat_interleave` without `output_size`",
        TRACK,
        TRACK_END,
        "self.ids.repeat_interleave(self.hits.clamp(min=0))  " + MARK,
    ),
    _m("unique", "tracker", "`torch.unique`", TRACK, TRACK_END, "torch.unique(labels)  " + MARK),
    _m(
        "kpi-float",
        "KPI code (the frame's `FrameRecord` in `Pipeline.run`, between frames)",
        "`float(t)` in a KPI record",
        PIPE,
        "            if sink is not None:",
        'record.extra["best_score"] = float(packet.scores.max())  ' + MARK,
    ),
    _m(
        "kpi-format",
        "KPI code (`format_kpi`)",
        "a tensor in a KPI record, formatted by `format_kpi`",
        PIPE,
        "            if sink is not None:",
        'record.extra["scores"] = packet.scores  ' + MARK,
        expect=KPI,
    ),
    _m(
        "data-dependent",
        "frame loop (`Pipeline.run`)",
        "`.tolist()` only once tracks are confirmed (host data decides)",
        PIPE,
        "            wall_ms = (time.perf_counter() - t0) * 1000.0",
        "if (result.track_ids >= 0).any():",
        "    packet.track_ids.tolist()  " + MARK,
    ),
    _m(
        "declared-overrun",
        "declared block (`ResultPacket.to_host`, max_syncs=3 with the track table)",
        "one host read more inside the budgeted block",
        PACKET,
        "            tracks_np = host_tracks.numpy() if self.tracks is not None else None",
        "_ = self.scores.tolist()  " + MARK,
        after=True,
    ),
)


# ---------------------------------------------------------------------------------------------------
# copies


def _apply(root: Path, edit: Edit) -> None:
    path = root / edit.file
    lines = path.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if edit.anchor in line]
    if len(hits) != 1:
        raise RuntimeError(f"mutant anchor {edit.anchor!r} found {len(hits)} times in {edit.file}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    block = [indent + line for line in edit.code]
    lines[i + 1 if edit.after else i : i + 1 if edit.after else i] = block
    path.write_text("\n".join(lines) + "\n")


def make_copy(dest: Path, mutant: Mutant | None) -> Path:
    """A copy of the library under ``dest`` (``dest/UltramotionIGTLib``), mutated when asked."""
    shutil.copytree(LIB, dest / "UltramotionIGTLib", ignore=shutil.ignore_patterns("__pycache__"))
    for edit in mutant.edits if mutant is not None else ():
        _apply(dest, edit)
    return dest


def marked_lines(root: Path, mutant: Mutant) -> list[str]:
    """``file:line`` of every line marked ``# MUTANT`` in the mutated copy."""
    out = []
    for file in sorted({e.file for e in mutant.edits}):
        for n, line in enumerate((root / file).read_text().splitlines(), 1):
            if MARK in line:
                out.append(f"{file}:{n}")
    return out


def write_models(folder: Path) -> tuple[str, str]:
    """A tiny random-weight D-FINE (64 px input, 16 queries) and SAM (128 px input), in the real formats."""
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint
    from UltramotionIGTLib.core.sam.config import SamConfig

    detector = write_random_detector(folder / "detector", image_size=64, seed=0, num_queries=16)
    tiny = SamConfig(
        name="tiny_audit",
        image_size=128,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=4,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )
    sam = write_random_sam_checkpoint(folder / "sam_tiny.safetensors", tiny, seed=0)
    return str(detector), str(sam)


def gate_argv(detector: str, sam: str, frames: int = FRAMES) -> list[str]:
    return [
        "audit",
        "--runtime",
        "--frames",
        str(frames),
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--detector",
        detector,
        "--sam",
        sam,
        "--fail-on",
        "undeclared",
        "-o",
        os.devnull,
    ]


# ---------------------------------------------------------------------------------------------------
# the runtime gate, each copy's own code, in one subprocess


def _driver(spec_path: str) -> None:
    """Subprocess body: for each copy, import that copy's library afresh and run its gate."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(1)  # the drivers run side by side
    results = {}
    for name, root in spec["copies"].items():
        for mod in [m for m in sys.modules if m == "UltramotionIGTLib" or m.startswith("UltramotionIGTLib.")]:
            del sys.modules[mod]
        sys.path[0] = root
        os.chdir(root)
        from UltramotionIGTLib.tools.cli import main  # the same command tree as the CLI

        assert Path(sys.modules["UltramotionIGTLib"].__file__).resolve().is_relative_to(Path(root).resolve())
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(spec["argv"])
            except Exception as exc:  # a crash is not a gate failure: report it as such
                print(f"crashed: {type(exc).__name__}: {exc}", file=sys.stderr)
                rc = -1
        results[name] = {"rc": rc, "stderr": err.getvalue(), "seconds": round(time.perf_counter() - start, 1)}
    Path(spec["out"]).write_text(json.dumps(results))


def start_runtime_gates(copies: dict[str, Path], argv: list[str], work: Path, jobs: int = 2) -> list:
    """Start ``jobs`` driver subprocesses (PYTHONPATH: a copy), each running the gate on its share
    of the copies; `wait_runtime_gates` collects {copy name: {"rc", "stderr", "seconds"}}."""
    names = list(copies)
    started = []
    for j in range(jobs):
        share = names[j::jobs]
        if not share:
            continue
        spec, out = work / f"spec{j}.json", work / f"results{j}.json"
        spec.write_text(
            json.dumps({"copies": {k: str(copies[k]) for k in share}, "argv": argv, "out": str(out)})
        )
        env = dict(os.environ, PYTHONPATH=str(copies[share[0]]), OMP_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--driver", str(spec)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((proc, out))
    return started


def wait_runtime_gates(started: list) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for proc, out in started:
        _, err = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"mutation driver failed ({proc.returncode}):\n{err[-4000:]}")
        results.update(json.loads(out.read_text()))
    return results


def static_critical(root: Path) -> list[str]:
    """``file:line`` of the static lint's critical findings on a copy (default entries, not-hot list)."""
    from UltramotionIGTLib.tools.audit.static import scan_paths

    result = scan_paths([root / "UltramotionIGTLib"], root=root)
    return [f"{f.file}:{f.line}" for f in result.critical()]


def measure(mutants: tuple[Mutant, ...] = MUTANTS, frames: int = FRAMES) -> dict[str, Any]:
    """Build the copies, run both gates. Returns {"control": {...}, "mutants": {name: {...}}}."""
    with tempfile.TemporaryDirectory(prefix="ultramotion-mutants-") as tmp:
        work = Path(tmp)
        detector, sam = write_models(work / "models")
        copies = {"control": make_copy(work / "control", None)}
        for m in mutants:
            copies[m.name] = make_copy(work / m.name, m)
        started = start_runtime_gates(copies, gate_argv(detector, sam, frames), work)
        try:  # the static lint meanwhile, here
            statics = {name: static_critical(root) for name, root in copies.items()}
        finally:
            gates = wait_runtime_gates(started)
        control_static = statics["control"]
        out: dict[str, Any] = {
            "control": {**gates["control"], "static_critical": control_static},
            "mutants": {},
        }
        for m in mutants:
            lines = marked_lines(copies[m.name], m)
            critical = statics[m.name]
            gate = gates[m.name]
            expect = m.expect if m.expect is not None else lines[0].rsplit(":", 1)[0]
            named = [ln for ln in gate["stderr"].splitlines() if ln.startswith("  ")]
            out["mutants"][m.name] = {
                "where": m.where,
                "construct": m.construct,
                "marked": lines,
                "runtime_rc": gate["rc"],
                "runtime_seconds": gate["seconds"],
                "runtime_lines": named,
                "runtime_names_it": any(
                    (expect in ln) and (m.expect is not None or any(mark in ln for mark in lines))
                    for ln in named
                ),
                "static_catches": any(ln in critical for ln in lines),
            }
    return out


def markdown(measured: dict[str, Any]) -> str:
    """The README table: one row per mutant, what each gate did."""
    rows = [
        "| Injected construct | Where | Runtime gate | Static lint |",
        "|---|---|---|---|",
    ]
    for m in MUTANTS:
        r = measured["mutants"][m.name]
        runtime = (
            "fails"
            if r["runtime_rc"] == 1 and r["runtime_names_it"]
            else f"**passes** (rc {r['runtime_rc']})"
        )
        rows.append(
            f"| {m.construct} | {m.where} | {runtime} | {'catches' if r['static_catches'] else 'misses'} |"
        )
    n = len(MUTANTS)
    caught_rt = sum(1 for r in measured["mutants"].values() if r["runtime_rc"] == 1 and r["runtime_names_it"])
    caught_st = sum(1 for r in measured["mutants"].values() if r["static_catches"])
    control = measured["control"]
    rows += [
        "",
        f"Runtime gate: fails on {caught_rt} of {n}; static lint: catches {caught_st} of {n}. "
        f"Unmutated control: runtime gate rc {control['rc']}, static critical findings "
        f"{len(control['static_critical'])}.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    if args.driver:
        _driver(args.driver)
        return 0
    measured = measure()
    print(json.dumps(measured, indent=2) if args.json else markdown(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
