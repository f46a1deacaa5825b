"""Runtime transfer audit on small real torch code with known hops (written here, counted by hand).

Lines that must be counted carry a ``# hop: CATEGORY`` comment; the tests find their line numbers
in this file's source, so the expected origins are ours, written by hand, not taken from a run.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.tools.audit.report import runtime_compare_markdown
from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

HERE = Path(__file__).resolve()
CWD = Path.cwd().resolve()
THIS = HERE.relative_to(CWD).as_posix() if HERE.is_relative_to(CWD) else str(HERE)


def _marked(func) -> Counter:
    """(line, category) of the ``# hop:`` comments inside ``func``'s source."""
    lines, start = inspect.getsourcelines(func)
    out = Counter()
    for offset, line in enumerate(lines):
        match = re.search(r"# hop: (.+)$", line)
        if match:
            for category in match.group(1).split():
                out[(start + offset, category)] += 1
    return out


def known_hops(t: torch.Tensor) -> np.ndarray:
    """2 .item(), 1 .cpu(), 1 `if t.any():` undeclared; 1 declared .numpy(); .detach() is none."""
    total = t.sum().item()  # hop: item
    peak = t.max().item()  # hop: item
    host = t.cpu()  # hop: cpu
    if t.any():  # hop: bool
        total += peak
    detached = t.detach()  # not a transfer
    with allowed_host_transfer("test.edge"):
        out = detached.numpy()  # hop: numpy
    return out + total + float(host.shape[0])


def implicit_syncs(t: torch.Tensor, r: torch.Tensor) -> list:
    out = [t[t > 0]]  # hop: bool_mask_index
    out.append(t[torch.tensor([0, 1])])  # integer index: none
    out.append(torch.nonzero(t))  # hop: nonzero
    out.append(t.nonzero())  # hop: nonzero
    out.append(torch.where(t > 1))  # hop: nonzero
    out.append(torch.where(t > 1, t, 0.0))  # three arguments: none
    out.append(t.masked_select(t > 0))  # hop: masked_select
    out.append(torch.unique(t))  # hop: unique
    out.append(t.repeat_interleave(r))  # hop: repeat_interleave
    out.append(t.repeat_interleave(r, output_size=int(r.sum())))  # hop: int
    out.append(t.repeat_interleave(2))  # integer repeats: none
    out.append(f"{t.sum()}")  # hop: format
    out.append(str(t))  # hop: repr
    out.append(int(t[0]))  # hop: int
    out.append(float(t[1]))  # hop: float
    out.append(list(range(5))[t.argmax()])  # hop: index
    out.append(t.detach().cpu().numpy())  # hop: cpu
    out.append(t.to("cpu", non_blocking=True))  # hop: to_cpu
    out.append(t.to(torch.float64))  # dtype only: none
    out.append(t.tolist())  # hop: tolist
    out.append(np.asarray(t))  # hop: numpy
    return out


def test_known_counts_and_origins_per_frame():
    t = torch.arange(1.0, 6.0)
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        for i in range(3):
            with audit.frame(i):
                known_hops(t)
    result = audit.result
    assert [f.index for f in result.frames] == [0, 1, 2]
    for frame in result.frames:
        assert (frame.undeclared, frame.declared) == (4, 1)
        assert frame.by_category == Counter(item=2, cpu=1, bool=1, numpy=1)
    assert result.syncs_per_frame == 4.0 and result.declared_per_frame == 1.0
    expected = Counter()
    for (line, category), n in _marked(known_hops).items():
        expected[(f"{THIS}:{line}", category)] += 3 * n
    got = Counter((e.origin, e.category) for e in result.events)
    assert got == expected
    assert all(e.ours and e.our_frame == e.origin for e in result.events)
    declared = [e for e in result.events if e.declared is not None]
    assert len(declared) == 3 and {e.declared for e in declared} == {"test.edge"}
    assert all(e.category == "numpy" for e in declared)


def test_implicit_syncs_each_counted_once_at_their_line():
    t = torch.tensor([3.0, 0.0, 2.0, 5.0])
    r = torch.tensor([1, 0, 2, 1])
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        with audit.frame(0):
            implicit_syncs(t, r)
    got = Counter((int(e.origin.rsplit(":", 1)[1]), e.category) for e in audit.result.events)
    assert got == _marked(implicit_syncs)
    assert all(e.origin.startswith(THIS + ":") for e in audit.result.events)


def test_third_party_origin_and_our_calling_frame():
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10], dim=1)  # > 1000 boxes on CPU: torchvision's per-class loop
    scores = torch.rand(1200, generator=g)
    classes = torch.arange(1200) % 2
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        with audit.frame(0):
            keep = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)  # calls into torchvision
    call_line = inspect.currentframe().f_lineno - 1
    assert keep.ndim == 1
    events = audit.result.events
    # _batched_nms_vanilla: torch.unique(idxs), one torch.where(idxs == c) per class, torch.where(keep_mask)
    assert Counter(e.category for e in events) == Counter(unique=1, nonzero=3)
    for e in events:
        assert not e.ours and e.origin.split(":")[0].endswith("torchvision/ops/boxes.py")
        assert e.our_frame == f"{THIS}:{call_line}"
    row = audit.result.by_origin()[0]
    assert row["ours"] is False and row["our_frame"] == f"{THIS}:{call_line}"


def test_everything_is_restored_on_exit_and_on_error():
    patched = ("cpu", "numpy", "item", "tolist", "to", "__bool__", "__format__", "__repr__", "__getitem__")
    before = {name: vars(torch.Tensor).get(name) for name in patched}
    before_funcs = {name: getattr(torch, name) for name in ("nonzero", "unique", "where", "masked_select")}
    with pytest.raises(ValueError, match="boom"):
        with RuntimeTransferAudit("cpu") as audit:
            with audit.frame(0):
                torch.ones(1).item()
                raise ValueError("boom")
    assert {name: vars(torch.Tensor).get(name) for name in patched} == before
    assert {name: getattr(torch, name) for name in before_funcs} == before_funcs
    assert audit.result.frames[0].undeclared == 1  # the frame was closed on the way out
    with RuntimeTransferAudit("cpu") as audit2:
        pass
    assert {name: vars(torch.Tensor).get(name) for name in patched} == before
    assert audit2.result.frames == []
    torch.ones(1).item()  # after exit nothing is counted
    assert audit2.result.events == []


def test_nested_audits_are_refused():
    with RuntimeTransferAudit("cpu"):
        with pytest.raises(RuntimeError, match="already active"):
            with RuntimeTransferAudit("cpu"):
                pass


def test_next_frame_loop_outside_frames_and_rendering():
    t = torch.arange(4.0)
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        t.sum().item()  # set-up: outside any frame
        for i in range(4):
            audit.next_frame()
            for _ in range(i):
                t[i].item()
        audit.end_frame()
        assert audit.last_frame is not None and audit.last_frame.undeclared == 3
    result = audit.result
    assert [f.undeclared for f in result.frames] == [0, 1, 2, 3]
    assert result.syncs_per_frame == 1.5
    assert result.totals == {
        "undeclared": 6,
        "declared": 0,
        "outside_frames_undeclared": 1,
        "outside_frames_declared": 0,
    }
    data = json.loads(result.to_json())
    assert data["frames"] == 4 and data["syncs_per_frame"] == 1.5
    assert [f["undeclared"] for f in data["per_frame"]] == [0, 1, 2, 3]
    assert data["by_origin"][0]["count"] == 6 and data["by_origin"][0]["ours"] is True
    md = result.to_markdown(title="demo")
    assert "## demo" in md and "per frame (mean): 1.50" in md and "| `item` | 6 | 0 |" in md
    side = runtime_compare_markdown({"legacy": result, "gpu_resident": result})
    assert "| | legacy | gpu_resident |" in side and "**1.50**" in side


@pytest.mark.gpu
def test_cuda_profiler_and_sync_debug_mode():
    dev = torch.device("cuda")
    t = torch.arange(1.0, 6.0, device=dev)
    host_t = torch.arange(3.0)
    with RuntimeTransferAudit(dev, our_roots=[HERE.parent]) as audit:
        with audit.frame(0):
            t.sum().item()
            t.cpu()
            if t.any():
                pass
            with allowed_host_transfer("test.edge"):
                t.to("cpu")
            pinned = torch.empty(5, pin_memory=True)
            pinned.copy_(t, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            host_t.item()  # a host tensor: no transfer on CUDA
            host_t.numpy()
        with audit.frame(1):
            (t * 2).sum()
    first, second = audit.result.frames
    assert (first.undeclared, first.declared) == (4, 1)
    assert first.by_category == Counter(item=1, cpu=1, bool=1, to_cpu=1, copy_to_host=1)
    assert first.cuda_sync_warnings is not None and first.cuda_sync_warnings >= 3
    assert first.dtoh_memcpy is None or first.dtoh_memcpy >= 4
    assert (second.undeclared, second.declared) == (0, 0)
    assert second.cuda_sync_warnings == 0
    assert second.dtoh_memcpy in (None, 0)
    assert torch.cuda.get_sync_debug_mode() == 0


def test_cli_runtime_compare_on_the_real_pipeline(tmp_path, capsys):
    """The real pipeline (small random-weight models in the real formats) on the synthetic phantom."""
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint
    from UltramotionIGTLib.tools import cli

    detector = write_random_detector(tmp_path / "detector", seed=0)
    sam = write_random_sam_checkpoint(tmp_path / "sam.safetensors", model_type="vit_t_demo", seed=0)
    out = tmp_path / "runtime.json"
    argv = [
        "--runtime",
        "--compare",
        "--frames",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--format",
        "json",
        "--detector",
        str(detector),
        "--sam",
        str(sam),
        "--sam-type",
        "vit_t_demo",
        "-o",
        str(out),
    ]
    assert cli.main(["audit", *argv, "--fail-on", "undeclared"]) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["kind"] == "runtime" and set(data["runs"]) == {"legacy", "gpu_resident"}
    resident, legacy = data["runs"]["gpu_resident"], data["runs"]["legacy"]
    for run in (resident, legacy):
        assert run["frames"] == 2 and len(run["per_frame"]) == 2 and run["device"] == "cpu"
    # the GPU-resident path: only the declared hop at the edge (ResultPacket.to_host)
    assert resident["syncs_per_frame"] == 0.0
    assert resident["declared_per_frame"] >= 1
    assert {row["declared"] for row in resident["by_origin"]} == {"ResultPacket.to_host"}
    # the legacy path hops frame and detections to the host by design
    assert legacy["syncs_per_frame"] > 0
    assert any(row["origin"].startswith("UltramotionIGTLib/") and row["ours"] for row in legacy["by_origin"])
