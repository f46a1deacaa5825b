"""Runtime transfer audit on small real torch code with known hops (written here, counted by hand).

Lines that must be counted carry a ``# hop: CATEGORY`` comment; the tests find their line numbers
in this file's source, so the expected origins are ours, written by hand, not taken from a run.
On this CPU-only machine the audit emulates the device: tensors made by torch before the audit,
or from a device tensor, are on the device; ``torch.from_numpy`` and ``device="cpu"`` are the host.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nonzero as aliased_nonzero  # imported under another name before any audit starts

from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.tools.audit.report import gate_lines, runtime_compare_markdown
from UltramotionIGTLib.tools.audit.runtime import CATEGORIES, RuntimeTransferAudit

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
    with allowed_host_transfer("test.edge", max_syncs=1):
        out = detached.numpy()  # hop: numpy
    return out + total + float(host.shape[0]) + host.numpy()  # host data: no hop


def implicit_syncs(t: torch.Tensor, r: torch.Tensor) -> list:
    out = [t[t > 0]]  # hop: bool_mask_index
    out.append(t[torch.tensor([0, 1])])  # integer index: none
    out.append(torch.nonzero(t))  # hop: nonzero
    out.append(t.nonzero())  # hop: nonzero
    out.append(aliased_nonzero(t))  # hop: nonzero
    out.append(torch.where(t > 1))  # hop: nonzero
    out.append(torch.where(t > 1, t, 0.0))  # three arguments: none
    out.append(t.masked_select(t > 0))  # hop: masked_select
    out.append(torch.unique(t))  # hop: unique
    out.append(t.repeat_interleave(r))  # hop: repeat_interleave
    out.append(t.repeat_interleave(r, output_size=int(r.sum())))  # hop: int
    out.append(t.repeat_interleave(2))  # integer repeats: none
    out.append(f"{t.sum()}")  # hop: format
    out.append(str(t))  # hop: format
    out.append(int(t[0]))  # hop: int
    out.append(float(t[1]))  # hop: float
    out.append(list(range(5))[t.argmax()])  # hop: index
    out.append(t.detach().cpu().numpy())  # hop: cpu
    out.append(t.to("cpu", non_blocking=True))  # hop: to_host
    out.append(t.to(torch.float64))  # dtype only: none
    out.append(t.tolist())  # hop: tolist
    out.append(np.asarray(t))  # hop: numpy
    out.append(torch.bincount(r))  # hop: bincount
    out.append(torch.histc(t, bins=4))  # hop: histc
    out.append(torch.equal(t, t))  # hop: equal
    out.append(torch.allclose(t, t))  # hop: equal
    out.append(torch.linalg.inv(torch.eye(2, device=t.device) * 2))  # hop: linalg_check
    out.append(t.masked_scatter(t > 2, t * 10))  # hop: masked_scatter
    out.append(torch.tensor([1.0, 2.0], device=t.device))  # hop: upload
    out.append(torch.from_numpy(np.ones(2)).to(t.device))  # hop: upload
    out.append(torch.zeros(2, device=t.device))  # made on the device: none
    host = torch.empty(4)  # no device given: the host
    host.copy_(t)  # hop: copy_to_host
    out.append(torch.zeros(3, device="cpu").tolist())  # a host tensor: none
    out.append(torch.from_numpy(np.arange(3.0)).numpy())  # a host tensor: none
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
        assert (frame.undeclared, frame.declared, frame.over_budget) == (4, 1, 0)
        assert frame.by_category == Counter(item=2, cpu=1, bool=1, numpy=1)
        assert frame.kpi() == {"host_syncs": 4, "declared_hops": 1, "budget_overruns": 0, "uploads": 0}
    assert result.syncs_per_frame == 4.0 and result.declared_per_frame == 1.0
    expected = Counter()
    for (line, category), n in _marked(known_hops).items():
        expected[(f"{THIS}:{line}", category)] += 3 * n
    got = Counter((e.origin, e.category) for e in result.events)
    assert got == expected
    assert all(e.ours and e.our_frame == e.origin and e.third_party_frame is None for e in result.events)
    declared = [e for e in result.events if e.declared is not None]
    assert len(declared) == 3 and {e.declared for e in declared} == {"test.edge"}
    assert all(e.category == "numpy" and e.budget == 1 and not e.over_budget for e in declared)
    assert result.budgets == {"test.edge": {"max_syncs": 1, "max_used": 1}}


@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_implicit_syncs_each_counted_once_at_their_line(inference):
    """Also under inference mode, where torch hands composite ops (``linalg_inv``, one-argument
    ``where``, ``item``) to the dispatcher whole."""
    t = torch.tensor([3.0, 0.0, 2.0, 5.0])
    r = torch.tensor([1, 0, 2, 1])
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit, torch.inference_mode(inference):
        with audit.frame(0):
            implicit_syncs(t, r)
    got = Counter((int(e.origin.rsplit(":", 1)[1]), e.category) for e in audit.result.events)
    assert got == _marked(implicit_syncs)
    assert all(e.origin.startswith(THIS + ":") for e in audit.result.events)
    assert {c for _, c in got} <= set(CATEGORIES)
    assert audit.result.frames[0].uploads == 2


def test_budget_overrun_is_a_finding():
    t = torch.arange(4.0)
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        for i in range(2):
            with audit.frame(i):
                with allowed_host_transfer("edge", max_syncs=2):
                    t.cpu()
                    t.tolist()
                    if i == 1:
                        t.sum().item()  # the third event of a pass with max_syncs=2
                with allowed_host_transfer("no budget stated"):  # default max_syncs=0
                    torch.zeros(2, device="cpu").tolist()  # host data: nothing to charge
    first, second = audit.result.frames
    assert (first.undeclared, first.declared, first.over_budget) == (0, 2, 0)
    assert (second.undeclared, second.declared, second.over_budget) == (0, 2, 1)
    assert second.kpi()["host_syncs"] == 1 and second.kpi()["budget_overruns"] == 1
    failing = audit.result.failures()
    assert [(e.category, e.declared, e.over_budget, e.frame) for e in failing] == [("item", "edge", True, 1)]
    assert audit.result.budgets["edge"] == {"max_syncs": 2, "max_used": 3}
    (line,) = gate_lines(audit.result)
    assert "over the budget of 'edge' (max_syncs=2)" in line and line.startswith(f"{THIS}:")
    with pytest.raises(ValueError, match="max_syncs"):
        with allowed_host_transfer("bad", max_syncs=-1):
            pass


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
    # _batched_nms_vanilla: torch.unique(idxs), per class torch.where(idxs == c) and the nms kernel,
    # then torch.where(keep_mask)
    assert Counter(e.category for e in events) == Counter(unique=1, nonzero=3, nms=2)
    for e in events:
        assert not e.ours and e.origin.split(":")[0].endswith("torchvision/ops/boxes.py")
        assert e.third_party_frame == e.origin and e.our_frame == f"{THIS}:{call_line}"
    row = audit.result.by_origin()[0]
    assert row["ours"] is False and row["our_frame"] == f"{THIS}:{call_line}"


def test_nothing_is_patched_and_the_modes_leave_on_error():
    before = dict(vars(torch.Tensor))
    funcs = {name: getattr(torch, name) for name in ("nonzero", "unique", "where", "masked_select")}
    t = torch.ones(1)
    with pytest.raises(ValueError, match="boom"):
        with RuntimeTransferAudit("cpu") as audit:
            assert dict(vars(torch.Tensor)) == before  # no patching while active either
            with audit.frame(0):
                t.item()
                raise ValueError("boom")
    assert dict(vars(torch.Tensor)) == before
    assert {name: getattr(torch, name) for name in funcs} == funcs
    assert torch._C._len_torch_function_stack() == 0 and torch._C._len_torch_dispatch_stack() == 0
    assert audit.result.frames[0].undeclared == 1  # the frame was closed on the way out
    with RuntimeTransferAudit("cpu") as audit2:
        pass
    assert audit2.result.frames == []
    t.item()  # after exit nothing is counted
    assert audit2.result.events == []


def test_one_audit_per_thread_and_other_threads_unseen():
    t = torch.arange(3.0)
    seen_in_thread: list[int] = []

    def worker() -> None:
        with RuntimeTransferAudit("cpu") as own:  # a second audit, on another thread: allowed
            with own.frame(0):
                t.sum().item()
        seen_in_thread.append(own.result.frames[0].undeclared)

    with RuntimeTransferAudit("cpu") as audit:
        with pytest.raises(RuntimeError, match="already active on this thread"):
            with RuntimeTransferAudit("cpu"):
                pass
        with audit.frame(0):
            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
            threading.Thread(target=lambda: t.max().item()).start()  # a thread with no audit
    assert seen_in_thread == [1]
    assert audit.result.frames[0].undeclared == 0  # neither thread's sync lands here


def test_next_frame_loop_outside_frames_and_rendering():
    t = torch.arange(4.0)
    with RuntimeTransferAudit("cpu", our_roots=[HERE.parent]) as audit:
        t.sum().item()  # set-up: before the first frame
        for i in range(4):
            audit.next_frame()
            for _ in range(i):
                t[i].item()
        audit.end_frame()
        t.max().item()  # between frames: after the first frame opened
        assert audit.last_frame is not None and audit.last_frame.undeclared == 3
    result = audit.result
    assert [f.undeclared for f in result.frames] == [0, 1, 2, 3]
    assert [f.after_frame for f in result.frames] == [0, 0, 0, 1]
    # the per-frame mean counts what ran between frames too (the frame loop's KPI code runs there)
    assert result.syncs_per_frame == 1.75 and result.max_syncs_in_a_frame == 4
    totals = result.totals
    assert (totals["undeclared"], totals["setup_undeclared"], totals["between_frames_failing"]) == (6, 1, 1)
    assert len(result.failures()) == 7  # set-up is not a failure; between frames is
    data = json.loads(result.to_json())
    assert data["frames"] == 4 and data["syncs_per_frame"] == 1.75
    assert [f["undeclared"] for f in data["per_frame"]] == [0, 1, 2, 3]
    assert data["by_origin"][0]["count"] == 6 and data["by_origin"][0]["ours"] is True
    md = result.to_markdown(title="demo")
    assert "## demo" in md and "per frame (mean): 1.75**" in md and "| `item` | sync | 6 | 0 | 0 |" in md
    side = runtime_compare_markdown({"legacy": result, "gpu_resident": result})
    assert "| | legacy | gpu_resident |" in side and "**1.75**" in side


@pytest.mark.gpu
def test_cuda_real_placement_sync_debug_and_profiler():
    dev = torch.device("cuda")
    t = torch.arange(1.0, 6.0, device=dev)
    host_t = torch.arange(3.0)
    with RuntimeTransferAudit(dev, our_roots=[HERE.parent], cuda_profiler=True) as audit:
        with audit.frame(0):
            t.sum().item()
            t.cpu()
            if t.any():
                pass
            with allowed_host_transfer("test.edge", max_syncs=1):
                t.to("cpu")
            pinned = torch.empty(5, pin_memory=True)
            pinned.copy_(t, non_blocking=True)
            torch.tensor([1.0, 2.0], device=dev)  # a blocking upload
            torch.cuda.current_stream().synchronize()
            host_t.item()  # a host tensor: nothing on CUDA
            host_t.numpy()
        with audit.frame(1):
            (t * 2).sum()
    first, second = audit.result.frames
    assert (first.undeclared, first.declared) == (5, 1)
    assert first.by_category == Counter(item=1, cpu=1, bool=1, to_host=1, copy_to_host=1, upload=1)
    assert first.cuda_sync_warnings is not None and first.cuda_sync_warnings >= 3
    assert first.dtoh_memcpy is None or first.dtoh_memcpy >= 3
    assert (second.undeclared, second.declared) == (0, 0)
    assert second.cuda_sync_warnings == 0
    assert second.dtoh_memcpy in (None, 0)
    assert torch.cuda.get_sync_debug_mode() == 0


def test_cli_runtime_compare_on_the_real_pipeline(tmp_path, capsys):
    """The real per-frame loop (small random-weight models in the real formats) on the phantom."""
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
    # the GPU-resident path: only the declared frame upload and host copy, within their budgets
    assert resident["syncs_per_frame"] == 0.0 and resident["overruns_per_frame"] == 0.0
    assert resident["declared_per_frame"] >= 1
    assert {row["declared"] for row in resident["by_origin"]} <= {
        "ResultPacket.to_host",
        "frame upload (prepare_inference_inputs)",
    }
    # the legacy path hops frame and detections to the host and uploads them again, by design
    assert legacy["syncs_per_frame"] > 0 and legacy["uploads_per_frame"] > 1
    assert any(row["origin"].startswith("UltramotionIGTLib/") and row["ours"] for row in legacy["by_origin"])
    # gating the legacy path fails, naming file:line
    legacy_argv = ["--legacy" if a == "--compare" else a for a in argv]
    assert cli.main(["audit", *legacy_argv, "--fail-on", "undeclared"]) == 1
    err = capsys.readouterr().err
    assert "undeclared or over-budget" in err and re.search(r"UltramotionIGTLib/\S+\.py:\d+: ", err)


def test_ci_gate_audits_at_least_100_frames():
    """The CI runtime gate looks at enough frames for periodic and data-dependent syncs to show."""
    ci = (HERE.parents[1] / ".ci" / "run").read_text()
    gate = [line for line in ci.splitlines() if "--runtime" in line and "--fail-on undeclared" in line]
    assert len(gate) == 1
    frames = int(re.search(r"--frames (\d+)", gate[0]).group(1))
    assert frames >= 100
