"""Runtime transfer audit: every host sync, device-to-host copy and blocking upload, per frame.

>>> with RuntimeTransferAudit(pipeline.device) as audit:
...     for i, frame in enumerate(frames):
...         with audit.frame(i):
...             packet = pipeline.process_frame(frame, i)
...             result = packet.to_host()
>>> print(audit.result.to_markdown())

Where it looks (both layers are torch "modes": they are pushed on this thread's mode stacks only,
nothing in torch is patched, other threads are not seen):

* **The dispatcher** (`torch.utils._python_dispatch.TorchDispatchMode`): every aten or custom op
  the code runs, whoever calls it (our code, transformers, segment-anything, torchvision, a name
  imported under an alias before the audit started). Counted when its first tensor is on the
  device: ops that synchronise with the host on CUDA (`SYNC_OPS`: ``_local_scalar_dense`` -- the
  op behind ``.item()``, ``bool()``, ``int()``, ``float()`` and a tensor passed where a number is
  expected --, ``nonzero``/``argwhere``/one-argument ``where``, ``masked_select``, ``unique*``,
  boolean-mask ``index``/``index_put``, ``repeat_interleave`` without ``output_size``,
  ``masked_scatter``, ``bincount``, ``histc``, ``equal``/``allclose``, linalg error checks,
  torchvision ``nms`` (also inside ``batched_nms``), sparse conversion) and copies between host
  and device (``_to_copy``, ``copy_``): device-to-host always, host-to-device when blocking (not
  ``non_blocking`` from pinned memory).
* **Python level** (`torch.overrides.TorchFunctionMode`), only for what never reaches the
  dispatcher on a CPU tensor -- ``.numpy()``/``np.asarray``, ``.tolist()``, printing and
  formatting, ``.cpu()``/``.to(...)`` (on the CPU these may return the tensor itself),
  ``torch.tensor``/``as_tensor``/``asarray``/``new_tensor`` from host data -- and to name the
  Python call (``.item()``, ``bool()``...) of what the dispatcher sees. One Python call is one
  event: ``print(t)`` counts once, not once per element the printer reads.

**Placement, per tensor.** On CUDA a tensor is on the device when ``tensor.device`` says so. On a
CPU-only machine the audit *emulates* the device and tracks which tensors would live on it on a
GPU, so that "would this be a hop on a GPU" is decided per tensor, not per method name. Device
tensors: made by an op from a device tensor; made by a factory given a ``torch.device`` (the
pipeline's ``self.device``, a tensor's ``.device``) or ``"cpu:0"``; ``.to(device)`` of host data;
model weights (``nn.Parameter``); and any other tensor first seen without one of the host marks
below (buffers, tracker state, tensors made before the audit started). Host tensors: made by a
factory without a device or with the string ``device="cpu"``, by ``torch.tensor(data)`` without a
device, ``.cpu()`` / ``.to("cpu")`` of a device tensor, an op on host tensors only, and other
memory torch did not allocate (``torch.from_numpy``, file-backed tensors that are not weights). So ``x.numpy()`` counts for a device tensor and not
for a host one, and ``.to(self.device)`` counts as an upload for host data only. What the
emulation cannot see: control flow on ``tensor.device`` (host and device tensors compare equal on
the CPU) and an explicit ``torch.device("cpu")`` object meaning the host (taken as the device).

**Declared hops** (`UltramotionIGTLib.core.hostsync.allowed_host_transfer`): an event inside a
declaration is charged to it; within the declaration's ``max_syncs`` per pass it is declared,
past it a budget overrun. The KPI (`FrameCounts.kpi`) gives undeclared (``host_syncs``, overruns
included), declared (``declared_hops``) and overruns apart.

Each event records its **origin**: the innermost stack frame outside torch and this module, whether
it is ours (under ``our_roots``, default the ``UltramotionIGTLib`` package), the first of our
frames (``our_frame``: where our code called into a library) and the first third-party frame
(``third_party_frame``).

On **CUDA** two more measurements, per frame, apart from the counts above: the sync-debug mode's
warnings (``torch.cuda.set_sync_debug_mode("warn")``; this mode is process-wide, the warnings are
attributed to the auditing thread only) and, with ``cuda_profiler``, the profiler's
``Memcpy DtoH``/``HtoD`` device events and synchronising CUDA runtime calls, from one profiler
session around the whole audit (frames are marked with ``record_function``; the counts are filled
in when the audit ends). The audit adds no synchronisation of its own inside a frame.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from UltramotionIGTLib.core.hostsync import current_declaration

_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_LIB_DIR = str(Path(__file__).resolve().parents[2])  # the UltramotionIGTLib package

_local = threading.local()  # .audit: this thread's active audit; .quiet: depth of counted calls

#: category -> (kind, what it is). Kinds: download (device to host), upload (host to device,
#: blocking), sync (the host waits for a value computed on the device).
CATEGORIES: dict[str, tuple[str, str]] = {
    "cpu": ("download", "`.cpu()` of a device tensor"),
    "to_host": ("download", '`.to("cpu")` / a copy to the host'),
    "copy_to_host": ("download", "`host.copy_(device_tensor)`"),
    "numpy": ("download", "`.numpy()` / `np.asarray` of a device tensor"),
    "tolist": ("download", "`.tolist()` of a device tensor"),
    "format": ("download", "printing or formatting a device tensor"),
    "upload": (
        "upload",
        "blocking host-to-device copy (`.to(device)`, `torch.tensor(..., device=)`, `copy_`)",
    ),
    "item": ("sync", "`.item()`"),
    "bool": ("sync", "truth value of a tensor (`if`, `while`, `and`, `or`, `not`, `bool()`)"),
    "int": ("sync", "`int(tensor)`"),
    "float": ("sync", "`float(tensor)`"),
    "index": ("sync", "a tensor used as a Python index (`__index__`)"),
    "complex": ("sync", "`complex(tensor)`"),
    "scalar_read": ("sync", "a number read from a device tensor by the dispatcher (`_local_scalar_dense`)"),
    "nonzero": ("sync", "`nonzero` / `argwhere` / one-argument `where`: size depends on data"),
    "masked_select": ("sync", "`masked_select`: size depends on data"),
    "unique": ("sync", "`unique` / `unique_consecutive`: size depends on data"),
    "bool_mask_index": ("sync", "boolean-mask indexing (read or write): size depends on data"),
    "repeat_interleave": ("sync", "`repeat_interleave` with tensor repeats and no `output_size`"),
    "masked_scatter": ("sync", "`masked_scatter`: reads the mask's count"),
    "bincount": ("sync", "`bincount`: output size is the largest value"),
    "histc": ("sync", "`histc`: reads the data range"),
    "equal": ("sync", "`torch.equal` / `allclose`: a Python bool"),
    "linalg_check": ("sync", "linalg error check (`inv`, `cholesky`, `solve`...)"),
    "nms": ("sync", "torchvision `nms` (also inside `batched_nms`): kept count read back"),
    "to_sparse": ("sync", "dense-to-sparse conversion: runs `nonzero`"),
}

#: aten/custom op (schema name) -> category, counted when one of its tensors is on the device
SYNC_OPS: dict[str, str] = {
    "aten::_local_scalar_dense": "scalar_read",
    "aten::item": "scalar_read",
    "aten::is_nonzero": "scalar_read",
    "aten::nonzero": "nonzero",
    "aten::argwhere": "nonzero",
    "aten::nonzero_numpy": "nonzero",
    "aten::masked_select": "masked_select",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::unique_dim_consecutive": "unique",
    "aten::masked_scatter": "masked_scatter",
    "aten::masked_scatter_": "masked_scatter",
    "aten::bincount": "bincount",
    "aten::histc": "histc",
    "aten::equal": "equal",
    "aten::allclose": "equal",
    "aten::_linalg_check_errors": "linalg_check",
    # linalg ops that check their result on the host; under inference mode torch hands the composite
    # op itself to the dispatcher, so its inner ``_linalg_check_errors`` is not seen apart
    "aten::linalg_inv": "linalg_check",
    "aten::inverse": "linalg_check",
    "aten::linalg_cholesky": "linalg_check",
    "aten::cholesky": "linalg_check",
    "aten::cholesky_inverse": "linalg_check",
    "aten::linalg_solve": "linalg_check",
    "aten::linalg_eigh": "linalg_check",
    "aten::linalg_eigvalsh": "linalg_check",
    "aten::linalg_eig": "linalg_check",
    "aten::linalg_eigvals": "linalg_check",
    "aten::linalg_lu_factor": "linalg_check",
    "aten::linalg_ldl_factor": "linalg_check",
    "aten::linalg_tensorinv": "linalg_check",
    "aten::linalg_tensorsolve": "linalg_check",
    "aten::linalg_matrix_power": "linalg_check",
    "aten::linalg_lstsq": "linalg_check",
    "torchvision::nms": "nms",
    "aten::to_sparse": "to_sparse",
    "aten::_to_sparse": "to_sparse",
    "aten::to_sparse_csr": "to_sparse",
    "aten::to_sparse_csc": "to_sparse",
    "aten::to_sparse_bsr": "to_sparse",
    "aten::to_sparse_bsc": "to_sparse",
    "aten::_to_sparse_csr": "to_sparse",
    "aten::_to_sparse_csc": "to_sparse",
    "aten::_to_sparse_bsr": "to_sparse",
    "aten::_to_sparse_bsc": "to_sparse",
}
#: ops whose indices argument syncs when it holds a boolean mask
_INDEX_OPS = {
    "aten::index",
    "aten::index_put",
    "aten::index_put_",
    "aten::_index_put_impl_",
    "aten::_unsafe_index_put",
}

_T = torch.Tensor
#: Python-level reads (counted when the tensor is on the device; the dispatcher is quiet meanwhile)
_PY_READS: dict[Any, str] = {
    _T.item: "item",
    _T.__bool__: "bool",
    _T.__int__: "int",
    _T.__float__: "float",
    _T.__index__: "index",
    _T.__complex__: "complex",
    _T.numpy: "numpy",
    _T.__array__: "numpy",
    _T.tolist: "tolist",
    _T.__repr__: "format",
    _T.__format__: "format",
}
#: every Python-level call the function layer acts on -> (what it does, the name shown in reports)
_PY_CALLS: dict[Any, tuple[str, str]] = {
    **{func: ("read", f"Tensor.{func.__name__}") for func in _PY_READS},
    _T.data.__get__: ("data", "Tensor.data"),
    _T.cpu: ("cpu", "Tensor.cpu"),
    _T.to: ("to", "Tensor.to"),
    _T.cuda: ("cuda", "Tensor.cuda"),
    _T.new_tensor: ("create", "Tensor.new_tensor"),
    torch.tensor: ("create", "torch.tensor"),
    torch.as_tensor: ("create", "torch.as_tensor"),
    torch.asarray: ("create", "torch.asarray"),
}


@dataclass(frozen=True)
class HopEvent:
    """One counted event.

    ``frame``: the frame index, None outside frames; ``phase``: ``setup`` (before the first frame
    opened), ``frame`` or ``between`` (after the first frame, outside any: e.g. KPI code between
    frames). ``op``: the aten op or Python call. ``declared``: the declaration's reason (None when
    undeclared); ``budget``: its ``max_syncs``; ``over_budget``: past the budget of its pass.
    """

    frame: int | None
    category: str
    op: str
    origin: str
    ours: bool
    our_frame: str | None
    third_party_frame: str | None
    declared: str | None
    budget: int | None
    over_budget: bool
    tensor_device: str
    phase: str

    @property
    def kind(self) -> str:
        return CATEGORIES[self.category][0]

    @property
    def counts_against(self) -> bool:
        """Undeclared or over budget: what the gate fails on (outside set-up)."""
        return self.declared is None or self.over_budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "phase": self.phase,
            "category": self.category,
            "kind": self.kind,
            "op": self.op,
            "origin": self.origin,
            "ours": self.ours,
            "our_frame": self.our_frame,
            "third_party_frame": self.third_party_frame,
            "declared": self.declared,
            "budget": self.budget,
            "over_budget": self.over_budget,
            "tensor_device": self.tensor_device,
        }


@dataclass
class FrameCounts:
    """Counts for one frame. ``undeclared`` excludes overruns (``over_budget``), ``declared`` is
    within budget; ``uploads`` counts the blocking uploads among all three. ``after_frame``:
    undeclared or over-budget events after this frame closed and before the next opened (the KPI
    code of the frame loop runs there). The CUDA-only fields stay None elsewhere (the profiler's
    are filled in when the audit ends)."""

    index: int
    undeclared: int = 0
    declared: int = 0
    over_budget: int = 0
    uploads: int = 0
    after_frame: int = 0
    by_category: Counter = field(default_factory=Counter)
    cuda_sync_warnings: int | None = None
    cuda_sync_warnings_declared: int | None = None
    dtoh_memcpy: int | None = None
    htod_memcpy: int | None = None
    cuda_runtime_syncs: int | None = None

    @property
    def host_syncs(self) -> int:
        """Syncs and copies not covered by a declaration's budget (undeclared + overruns)."""
        return self.undeclared + self.over_budget

    def kpi(self) -> dict[str, Any]:
        """Fields for this frame's KPI record: ``host_syncs`` (undeclared, overruns included),
        ``declared_hops`` (within budget), ``budget_overruns`` and ``uploads``."""
        out: dict[str, Any] = {
            "host_syncs": self.host_syncs,
            "declared_hops": self.declared,
            "budget_overruns": self.over_budget,
            "uploads": self.uploads,
        }
        if self.cuda_sync_warnings is not None:
            out["cuda_sync_warnings"] = self.cuda_sync_warnings
        if self.dtoh_memcpy is not None:
            out["dtoh_memcpy"] = self.dtoh_memcpy
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.index,
            "undeclared": self.undeclared,
            "declared": self.declared,
            "over_budget": self.over_budget,
            "uploads": self.uploads,
            "after_frame": self.after_frame,
            "by_category": dict(sorted(self.by_category.items())),
            "cuda_sync_warnings": self.cuda_sync_warnings,
            "cuda_sync_warnings_declared": self.cuda_sync_warnings_declared,
            "dtoh_memcpy": self.dtoh_memcpy,
            "htod_memcpy": self.htod_memcpy,
            "cuda_runtime_syncs": self.cuda_runtime_syncs,
        }


@dataclass
class RuntimeAuditResult:
    """What a `RuntimeTransferAudit` counted. ``budgets``: per declaration reason, its
    ``max_syncs`` and the most events one pass made (``max_used``), over the audited frames."""

    device: str
    device_name: str
    mode: str
    frames: list[FrameCounts]
    events: list[HopEvent]
    notes: list[str] = field(default_factory=list)
    budgets: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def frame_events(self) -> list[HopEvent]:
        return [e for e in self.events if e.phase == "frame"]

    def failures(self) -> list[HopEvent]:
        """Undeclared events and budget overruns after set-up (in frames and between them)."""
        return [e for e in self.events if e.phase != "setup" and e.counts_against]

    @property
    def totals(self) -> dict[str, int]:
        ev = self.frame_events
        outside = [e for e in self.events if e.phase != "frame"]
        return {
            "undeclared": sum(1 for e in ev if e.declared is None),
            "declared": sum(1 for e in ev if e.declared is not None and not e.over_budget),
            "over_budget": sum(1 for e in ev if e.over_budget),
            "uploads": sum(1 for e in ev if e.kind == "upload"),
            "between_frames_failing": sum(1 for e in outside if e.phase == "between" and e.counts_against),
            "setup_undeclared": sum(1 for e in outside if e.phase == "setup" and e.declared is None),
            "setup_declared": sum(1 for e in outside if e.phase == "setup" and e.declared is not None),
        }

    def _per_frame(self, value: Any) -> float:
        return sum(value(f) for f in self.frames) / len(self.frames) if self.frames else 0.0

    @property
    def syncs_per_frame(self) -> float:
        """Mean undeclared syncs + copies + blocking uploads per frame, overruns included, and what
        ran between this frame and the next (the frame loop's KPI code)."""
        return self._per_frame(lambda f: f.host_syncs + f.after_frame)

    @property
    def declared_per_frame(self) -> float:
        return self._per_frame(lambda f: f.declared)

    @property
    def overruns_per_frame(self) -> float:
        return self._per_frame(lambda f: f.over_budget)

    @property
    def uploads_per_frame(self) -> float:
        return self._per_frame(lambda f: f.uploads)

    @property
    def max_syncs_in_a_frame(self) -> int:
        return max((f.host_syncs + f.after_frame for f in self.frames), default=0)

    def by_category(self) -> dict[str, dict[str, int]]:
        """Frame events per category: undeclared / declared / over_budget."""
        out: dict[str, dict[str, int]] = {}
        for e in self.frame_events:
            row = out.setdefault(e.category, {"undeclared": 0, "declared": 0, "over_budget": 0})
            key = "over_budget" if e.over_budget else ("declared" if e.declared is not None else "undeclared")
            row[key] += 1
        return dict(sorted(out.items()))

    def by_origin(self, phases: Sequence[str] = ("frame",)) -> list[dict[str, Any]]:
        """Rows (origin, ours, category, op, declared, over_budget, our_frame, third_party_frame,
        count, frames), failing rows first, then most frequent."""
        groups: dict[tuple, list[HopEvent]] = {}
        for e in self.events:
            if e.phase in phases:
                key = (
                    e.origin,
                    e.ours,
                    e.category,
                    e.op,
                    e.declared,
                    e.over_budget,
                    e.our_frame,
                    e.third_party_frame,
                )
                groups.setdefault(key, []).append(e)
        rows = []
        for (o, ours, c, op, d, over, of, tp), evs in groups.items():
            frames = sorted({e.frame for e in evs if e.frame is not None})
            rows.append(
                {
                    "origin": o,
                    "ours": ours,
                    "category": c,
                    "op": op,
                    "declared": d,
                    "over_budget": over,
                    "our_frame": of,
                    "third_party_frame": tp,
                    "count": len(evs),
                    "frames": len(frames),
                    "first_frame": frames[0] if frames else None,
                }
            )
        rows.sort(key=lambda r: (not (r["declared"] is None or r["over_budget"]), -r["count"], r["origin"]))
        return rows

    def _mean(self, attr: str) -> float | None:
        values = [getattr(f, attr) for f in self.frames if getattr(f, attr) is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        totals = self.totals
        return {
            "device": self.device,
            "device_name": self.device_name,
            "mode": self.mode,
            "frames": len(self.frames),
            "syncs_per_frame": self.syncs_per_frame,
            "declared_per_frame": self.declared_per_frame,
            "overruns_per_frame": self.overruns_per_frame,
            "uploads_per_frame": self.uploads_per_frame,
            "max_syncs_in_a_frame": self.max_syncs_in_a_frame,
            "cuda_sync_warnings_per_frame": self._mean("cuda_sync_warnings"),
            "dtoh_memcpy_per_frame": self._mean("dtoh_memcpy"),
            "htod_memcpy_per_frame": self._mean("htod_memcpy"),
            "cuda_runtime_syncs_per_frame": self._mean("cuda_runtime_syncs"),
            "totals": totals,
            "budgets": self.budgets,
            "by_category": self.by_category(),
            "by_origin": self.by_origin(),
            "failures": [e.to_dict() for e in self.failures()],
            "setup": self.by_origin(phases=("setup",)),
            "per_frame": [f.to_dict() for f in self.frames],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, title: str | None = None) -> str:
        from UltramotionIGTLib.tools.audit.report import runtime_markdown

        return runtime_markdown(self, title=title)


# ---------------------------------------------------------------------------------------------------
# placement


class _Placement:
    """Which tensors are on the (emulated) device: a table by tensor identity, holding weak refs."""

    def __init__(self) -> None:
        self._table: dict[int, tuple[weakref.ref, bool]] = {}

    def get(self, t: torch.Tensor) -> bool:
        hit = self._table.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        # first sight: model weights (Parameters) are on the device; other memory torch did not
        # allocate (numpy arrays, files) is host memory; anything else made out of the audit's
        # sight (buffers, state from before the audit) is on the device
        if isinstance(t, torch.nn.Parameter):
            on = True
        else:
            try:
                on = bool(t.untyped_storage().resizable())
            except Exception:  # sparse, nested...: no plain storage
                on = True
        self.set(t, on)
        return on

    def set(self, t: torch.Tensor, on_device: bool) -> None:
        try:
            self._table[id(t)] = (weakref.ref(t), on_device)
        except TypeError:  # pragma: no cover - every tensor takes weak references
            pass

    def sweep(self) -> None:
        """Forget dead tensors (called between frames when the table grew)."""
        if len(self._table) > 20000:
            self._table = {k: v for k, v in self._table.items() if v[0]() is not None}


def _tensors_in(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [x for x in out if isinstance(x, torch.Tensor)]
    return []


def _schema_arg(
    func: Any, args: Sequence[Any], kwargs: dict[str, Any], name: str, default: Any = None
) -> Any:
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) and not a.kwarg_only else default
    return default


# ---------------------------------------------------------------------------------------------------
# the two layers


class _FunctionLayer(TorchFunctionMode):
    """Python-level calls that never reach the dispatcher on a CPU tensor, and call names."""

    def __init__(self, audit: RuntimeTransferAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(_local, "busy", 0):
            return func(*args, **kwargs)
        try:
            action, name = _PY_CALLS.get(func, (None, ""))
        except TypeError:  # an unhashable callable
            return func(*args, **kwargs)
        if action is None:
            if not self.audit.emulating:
                return func(*args, **kwargs)
            return self._generic(func, args, kwargs)
        a = self.audit
        if action == "read":
            if args and isinstance(args[0], torch.Tensor) and a.on_device(args[0]):
                a.record(_PY_READS[func], name, args[0])
                return a.quietly(func, args, kwargs)
            return func(*args, **kwargs)
        if action == "cpu":
            return self._move(func, name, args, kwargs, target_on_device=False, non_blocking=False)
        if action == "to":
            target = self._to_target(args, kwargs)
            if target is None:
                return func(*args, **kwargs)
            return self._move(func, name, args, kwargs, target, bool(kwargs.get("non_blocking", False)))
        if action == "cuda" and a.gpu:
            return self._move(func, name, args, kwargs, True, bool(kwargs.get("non_blocking", False)))
        if action == "create":
            return self._create(func, name, args, kwargs)
        if action == "data" and a.emulating:
            out = func(*args, **kwargs)
            a.place(out, a.on_device(args[0]))
            return out
        return func(*args, **kwargs)

    def _generic(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """Any other call (emulated placement). With tensor arguments: run it with their placement as
        the context of the factories torch runs inside it. Without: a factory, placed by its
        ``device=`` (none given: torch's default device, the host)."""
        a = self.audit
        inputs = _tensors_in(args, kwargs)
        stack = _local.__dict__.setdefault("context", [])
        stack.append(any(a.on_device(t) for t in inputs) if inputs else False)
        try:
            out = func(*args, **kwargs)
        finally:
            stack.pop()
        if not inputs:
            device = kwargs.get("device")
            on = device is not None and a.is_device_arg(device)
            for o in _outputs(out):
                a.place(o, on)
        return out

    def _to_target(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool | None:
        """Is the target of ``Tensor.to(...)`` the device (True), the host (False), or no move (None)?"""
        a = self.audit
        if "device" in kwargs and kwargs["device"] is not None:
            return a.is_device_arg(kwargs["device"])
        if len(args) > 1:
            first = args[1]
            if isinstance(first, torch.Tensor):
                return a.on_device(first)
            if isinstance(first, (str, torch.device)) or (
                isinstance(first, int) and not isinstance(first, bool)
            ):
                return a.is_device_arg(first)
        return None

    def _move(
        self,
        func: Any,
        name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        target_on_device: bool,
        non_blocking: bool,
    ) -> Any:
        a = self.audit
        src = args[0]
        src_on = a.on_device(src)
        if src_on and not target_on_device:
            a.record("cpu" if func is _T.cpu else "to_host", name, src)
            out = a.quietly(func, args, kwargs)
            if a.emulating:
                out = a.alias_if_same(out, src)
                a.place(out, False)
            return out
        if not src_on and target_on_device:
            if not (non_blocking and a.pinned(src)):
                a.record("upload", name, src)
            out = a.quietly(func, args, kwargs)
            if a.emulating:
                out = a.alias_if_same(out, src)
                a.place(out, True)
            return out
        return func(*args, **kwargs)

    def _create(self, func: Any, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """torch.tensor / as_tensor / asarray / Tensor.new_tensor: data from Python or numpy."""
        a = self.audit
        is_new = func is _T.new_tensor
        data = (
            args[1] if is_new and len(args) > 1 else (args[0] if args and not is_new else kwargs.get("data"))
        )
        device = kwargs.get("device")
        if device is None and func is torch.as_tensor and len(args) > 2:
            device = args[2]
        data_on = a.on_device(data) if isinstance(data, torch.Tensor) else False
        if device is not None:
            target = a.is_device_arg(device)
        elif is_new:
            target = a.on_device(args[0])
        else:
            target = data_on  # no device: torch keeps a tensor where it is, other data on the host
        inner = None if isinstance(data, torch.Tensor) else _device_tensor_in(a, data)
        if inner is not None:  # a list of device tensors: each element is read on the host
            a.record("to_host", name, inner)
            out = a.quietly(func, args, kwargs)
            if target:
                a.record("upload", name, None)
        elif target and not data_on:
            a.record("upload", name, data if isinstance(data, torch.Tensor) else None)
            out = a.quietly(func, args, kwargs)
        elif data_on and not target:
            a.record("to_host", name, data)
            out = a.quietly(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if a.emulating and isinstance(out, torch.Tensor) and out is not data:
            a.place(out, target)
        return out


class _DispatchLayer(TorchDispatchMode):
    """Every aten/custom op: placement of its outputs, syncing ops and copies on device tensors."""

    def __init__(self, audit: RuntimeTransferAudit) -> None:
        super().__init__()
        self.audit = audit
        self._kind: dict[Any, str | None] = {}

    def _op_kind(self, func: Any) -> str | None:
        kind = self._kind.get(func, "?")
        if kind == "?":
            name = func._schema.name
            overload = func._overloadname
            if name in SYNC_OPS:
                kind = "sync:" + SYNC_OPS[name]
            elif name in _INDEX_OPS:
                kind = "index"
            elif name == "aten::where" and overload == "default":  # where(condition): nonzero
                kind = "sync:nonzero"
            elif name == "aten::repeat_interleave" and overload in ("Tensor", "self_Tensor"):
                kind = "repeat"
            elif name.startswith("aten::linalg_") and name.endswith("_ex"):
                kind = "linalg_ex"
            elif name in ("aten::linspace", "aten::logspace") and "Tensor" in overload:
                kind = "sync:scalar_read"
            elif name == "aten::_to_copy":
                kind = "to_copy"
            elif name == "aten::copy_":
                kind = "copy_"
            else:
                kind = None
            self._kind[func] = kind
        return kind

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        a = self.audit
        kind = self._op_kind(func)
        if kind is None and not a.emulating:
            return func(*args, **kwargs)
        _local.busy = getattr(_local, "busy", 0) + 1
        try:
            inputs = _tensors_in(args, kwargs)
            if kind is not None and not getattr(_local, "quiet", 0):
                self._count(kind, func, args, kwargs, inputs)
            out = func(*args, **kwargs)
            if a.emulating:
                self._place_outputs(func, kwargs, inputs, out)
            return out
        finally:
            _local.busy -= 1

    def _count(
        self, kind: str, func: Any, args: Sequence[Any], kwargs: dict[str, Any], inputs: list[torch.Tensor]
    ) -> None:
        a = self.audit
        name = func._schema.name
        if kind == "to_copy":
            device = kwargs.get("device")
            # emulated: moves are judged by the Python call (.to, .cpu, torch.tensor), which knows the
            # spelling of the target; the dispatcher sees every CPU device alike
            if device is None or not inputs or a.emulating:
                return
            src_on, dst_on = a.on_device(inputs[0]), a.is_device_arg(device)
            if src_on and not dst_on:
                a.record("to_host", name, inputs[0])
            elif dst_on and not src_on and not (kwargs.get("non_blocking") and a.pinned(inputs[0])):
                a.record("upload", name, inputs[0])
            return
        if kind == "copy_":
            if len(args) < 2:
                return
            dst, src = args[0], args[1]
            src_on, dst_on = a.on_device(src), a.on_device(dst)
            if src_on and not dst_on:
                a.record("copy_to_host", name, src)
            elif dst_on and not src_on:
                non_blocking = _schema_arg(func, args, kwargs, "non_blocking", False)
                if not (non_blocking and a.pinned(src)):
                    a.record("upload", name, src)
            return
        # the first tensor argument decides: on a GPU an op's tensors share a device (0-d host
        # scalars aside), so a mixed placement only means the emulation misjudged the other one
        if not inputs or not a.on_device(inputs[0]):
            return
        subject = inputs[0]
        if kind.startswith("sync:"):
            a.record(kind[5:], name, subject)
        elif kind == "index":
            indices = _schema_arg(func, args, kwargs, "indices", ())
            if any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
            ):
                a.record("bool_mask_index", name, subject)
        elif kind == "repeat":
            if _schema_arg(func, args, kwargs, "output_size") is None:
                a.record("repeat_interleave", name, subject)
        elif kind == "linalg_ex":
            if _schema_arg(func, args, kwargs, "check_errors", False):
                a.record("linalg_check", name, subject)

    def _place_outputs(self, func: Any, kwargs: dict[str, Any], inputs: list[torch.Tensor], out: Any) -> None:
        a = self.audit
        if inputs:
            on = any(a.on_device(t) for t in inputs)
        else:
            # a factory: torch fills in ``device=cpu`` whatever the Python call said, so take the
            # placement of the Python-level call it runs in (the Python call itself places its own
            # results afterwards from the spelling of its ``device=``)
            context = getattr(_local, "context", None)
            on = bool(context[-1]) if context else False
        for o in _outputs(out):
            if not any(o is t for t in inputs):  # in-place results keep their placement
                a.place(o, on)


def _device_tensor_in(audit: RuntimeTransferAudit, data: Any, depth: int = 0) -> torch.Tensor | None:
    """A device tensor inside nested lists/tuples (``torch.tensor([t0, t1])``), or None."""
    if isinstance(data, torch.Tensor):
        return data if audit.on_device(data) else None
    if isinstance(data, (list, tuple)) and depth < 3:
        for item in data:
            found = _device_tensor_in(audit, item, depth + 1)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------
# CUDA-only: sync-debug warnings (process-wide mode, routed per thread)


class _SyncDebug:
    lock = threading.Lock()
    users = 0
    previous_mode: int | None = None
    previous_show: Any = None
    filter: tuple | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls.lock:
            if cls.users == 0:
                cls.previous_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
                cls.previous_show = warnings.showwarning
                warnings.showwarning = cls.show
                warnings.filterwarnings("always", message=r".*[Ss]ynchroniz")
                cls.filter = warnings.filters[0]
            cls.users += 1

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users == 0:
                torch.cuda.set_sync_debug_mode(cls.previous_mode or 0)
                if warnings.showwarning is cls.show:
                    warnings.showwarning = cls.previous_show
                with contextlib.suppress(ValueError):
                    warnings.filters.remove(cls.filter)
                mutated = getattr(warnings, "_filters_mutated", None)
                if mutated is not None:
                    mutated()

    @classmethod
    def show(
        cls, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        audit = getattr(_local, "audit", None)
        if audit is not None and "synchroniz" in str(message).lower():
            audit._sync_warning()
            return
        cls.previous_show(message, category, filename, lineno, file, line)


# ---------------------------------------------------------------------------------------------------
# the audit


class RuntimeTransferAudit:
    """Context manager counting host syncs, copies and blocking uploads per frame (see module doc).

    ``device``: the device the pipeline runs on; a CPU device turns on the emulated placement,
    ``cuda`` the CUDA-only measurements. ``our_roots``: folders
    whose files count as ours (the UltramotionIGTLib package always does). ``cuda_profiler``: count
    memcpy events and synchronising runtime calls per frame with the profiler (CUDA).
    ``cuda_sync_debug``: count the sync-debug mode's warnings per frame (CUDA). One audit per thread
    at a time (``RuntimeError`` when nested); audits on different threads are independent.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        our_roots: Sequence[str | Path] = (),
        cuda_profiler: bool = False,
        cuda_sync_debug: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.emulating = self.device.type == "cpu"
        self.our_roots = [_LIB_DIR] + [str(Path(r).resolve()) for r in our_roots]
        self.cuda_profiler = cuda_profiler and self.gpu
        self.cuda_sync_debug = cuda_sync_debug and self.gpu
        self.events: list[HopEvent] = []
        self.frames: list[FrameCounts] = []
        self.notes: list[str] = []
        self.budgets: dict[str, dict[str, int]] = {}
        self._current: FrameCounts | None = None
        self._started = False
        self._placement = _Placement()
        self._modes: list[Any] = []
        self._profiler: Any = None
        self._frame_marker: Any = None
        self._sync_debug_held = False
        self._result: RuntimeAuditResult | None = None
        self._file_cache: dict[str, tuple[bool, bool, str]] = {}

    # -- life cycle --------------------------------------------------------------------------------
    def __enter__(self) -> RuntimeTransferAudit:
        if getattr(_local, "audit", None) is not None:
            raise RuntimeError(
                "a RuntimeTransferAudit is already active on this thread; they cannot be nested"
            )
        _local.audit = self
        _local.quiet = 0
        _local.busy = 0
        try:
            if self.cuda_sync_debug:
                _SyncDebug.acquire()
                self._sync_debug_held = True
            if self.cuda_profiler:
                self._start_profiler()
            for mode in (_FunctionLayer(self), _DispatchLayer(self)):
                mode.__enter__()
                self._modes.append(mode)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._current is not None:
                self._end_frame()
        finally:
            self._teardown()
            self._result = self._build_result()

    def _teardown(self) -> None:
        try:
            while self._modes:
                self._modes.pop().__exit__(None, None, None)
        finally:
            try:
                if self._profiler is not None:
                    self._stop_profiler()
            finally:
                if self._sync_debug_held:
                    self._sync_debug_held = False
                    _SyncDebug.release()
                if getattr(_local, "audit", None) is self:
                    _local.audit = None

    @property
    def result(self) -> RuntimeAuditResult:
        """The counts so far (final after the ``with`` block)."""
        return self._result if self._result is not None else self._build_result()

    def _build_result(self) -> RuntimeAuditResult:
        if self.gpu:
            name = torch.cuda.get_device_name(self.device)
            mode = "cuda: real syncs, device-to-host copies and blocking uploads"
        else:
            import platform

            name = platform.processor() or platform.machine() or "cpu"
            mode = "cpu, emulated device: what would sync, copy or upload on a GPU, decided per tensor"
        return RuntimeAuditResult(
            str(self.device),
            name,
            mode,
            list(self.frames),
            list(self.events),
            list(self.notes),
            {k: dict(v) for k, v in self.budgets.items()},
        )

    # -- frames ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def frame(self, index: int | None = None) -> Iterator[FrameCounts]:
        """Count what happens inside the block as frame ``index`` (default: the next index)."""
        record = self._start_frame(index)
        try:
            yield record
        finally:
            self._end_frame()

    def next_frame(self, index: int | None = None) -> FrameCounts:
        """Close the open frame (if any) and start the next one; for loops without a ``with``."""
        if self._current is not None:
            self._end_frame()
        return self._start_frame(index)

    def end_frame(self) -> FrameCounts | None:
        """Close the open frame, returning its record (None when no frame was open)."""
        return self._end_frame() if self._current is not None else None

    @property
    def last_frame(self) -> FrameCounts | None:
        """The last closed frame's counts (for a per-frame KPI record)."""
        return self.frames[-1] if self.frames else None

    def keep_last_frame_only(self) -> None:
        """Forget every event and all frames but the last: for long runs whose counts already went
        into per-frame KPI records, so that memory does not grow with the frames (the frame numbering
        goes on)."""
        del self.frames[:-1]
        del self.events[:]

    def _start_frame(self, index: int | None) -> FrameCounts:
        if self._current is not None:
            raise RuntimeError("audit.frame(): a frame is already open")
        if index is None:
            index = self.frames[-1].index + 1 if self.frames else 0
        record = FrameCounts(index)
        if self.cuda_sync_debug:
            record.cuda_sync_warnings = 0
            record.cuda_sync_warnings_declared = 0
        if self._profiler is not None:
            self._frame_marker = torch.profiler.record_function(f"ultramotion_audit_frame_{len(self.frames)}")
            self._frame_marker.__enter__()
        self._started = True
        self._current = record
        return record

    def _end_frame(self) -> FrameCounts:
        record = self._current
        assert record is not None
        if self._frame_marker is not None:
            marker, self._frame_marker = self._frame_marker, None
            marker.__exit__(None, None, None)
        self._current = None
        self.frames.append(record)
        self._placement.sweep()
        return record

    # -- placement ---------------------------------------------------------------------------------
    def on_device(self, t: torch.Tensor) -> bool:
        """Would ``t`` be on the device on a GPU (real placement on CUDA, emulated on CPU)?"""
        if self.emulating:
            return self._placement.get(t)
        return t.device.type not in ("cpu", "meta")

    def assume_on_device(self, *tensors: torch.Tensor) -> None:
        """Emulation: take these tensors to be on the device (inputs a test made from numpy, which
        the emulation would otherwise see as host memory). No effect on CUDA."""
        for t in tensors:
            self.place(t, True)

    def place(self, t: Any, on_device: bool) -> None:
        if self.emulating and isinstance(t, torch.Tensor):
            self._placement.set(t, on_device)

    def is_device_arg(self, device: Any) -> bool:
        """Does a ``device=`` argument (str, torch.device, int) name the device rather than the host?

        On CUDA: any non-CPU device. Emulated: a ``torch.device`` object (``self.device``, a
        tensor's ``.device``) or an ordinal is the device; a string is the host unless it carries
        an index (``"cpu"`` is the host, ``"cpu:0"`` the device).
        """
        if isinstance(device, bool):
            return False
        if isinstance(device, int):
            return True  # an accelerator ordinal
        if self.emulating:
            if isinstance(device, torch.device):
                return device.type != "meta"
            return isinstance(device, str) and ":" in device and device.split(":")[0] == "cpu"
        try:
            return torch.device(device).type not in ("cpu", "meta")
        except (RuntimeError, TypeError):
            return False

    def pinned(self, t: torch.Tensor) -> bool:
        if not self.gpu:
            return False  # pinned memory needs a GPU; an emulated upload is always blocking
        try:
            return bool(t.is_pinned())
        except RuntimeError:
            return False

    def alias_if_same(self, out: Any, src: torch.Tensor) -> Any:
        """On the CPU ``.cpu()`` / ``.to(...)`` may return the tensor itself; give the host (or
        device) side its own tensor object so that the two placements stay apart."""
        if out is src:
            out = torch.ops.aten.alias.default(src)
        return out

    def quietly(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """Run a counted Python-level call with the dispatcher's counting off (one event per call)."""
        _local.quiet = getattr(_local, "quiet", 0) + 1
        try:
            return func(*args, **kwargs)
        finally:
            _local.quiet -= 1

    # -- recording ---------------------------------------------------------------------------------
    def record(self, category: str, op: str, tensor: torch.Tensor | None) -> None:
        _local.busy = getattr(_local, "busy", 0) + 1
        try:
            self._record(category, op, tensor)
        finally:
            _local.busy -= 1

    def _record(self, category: str, op: str, tensor: torch.Tensor | None) -> None:
        decl = current_declaration()
        over = False
        if decl is not None:
            decl.used += 1
            over = decl.used > decl.max_syncs
            stats = self.budgets.setdefault(decl.reason, {"max_syncs": decl.max_syncs, "max_used": 0})
            stats["max_syncs"] = decl.max_syncs
            stats["max_used"] = max(stats["max_used"], decl.used)
        origin, ours, our_frame, third = self._origin()
        if tensor is None:
            shown = "?"
        elif self.emulating:
            shown = "cpu (emulated device)" if self.on_device(tensor) else "cpu (host)"
        else:
            shown = str(tensor.device)
        rec = self._current
        phase = "frame" if rec is not None else ("between" if self._started else "setup")
        event = HopEvent(
            frame=rec.index if rec is not None else None,
            category=category,
            op=op,
            origin=origin,
            ours=ours,
            our_frame=our_frame,
            third_party_frame=third,
            declared=decl.reason if decl is not None else None,
            budget=decl.max_syncs if decl is not None else None,
            over_budget=over,
            tensor_device=shown,
            phase=phase,
        )
        self.events.append(event)
        if rec is None and phase == "between" and self.frames and event.counts_against:
            self.frames[-1].after_frame += 1
        if rec is not None:
            rec.by_category[category] += 1
            if over:
                rec.over_budget += 1
            elif decl is not None:
                rec.declared += 1
            else:
                rec.undeclared += 1
            if CATEGORIES[category][0] == "upload":
                rec.uploads += 1

    def _sync_warning(self) -> None:
        rec = self._current
        if rec is not None and rec.cuda_sync_warnings is not None:
            if current_declaration() is not None:
                rec.cuda_sync_warnings_declared = (rec.cuda_sync_warnings_declared or 0) + 1
            else:
                rec.cuda_sync_warnings += 1

    def _classify_file(self, filename: str) -> tuple[bool, bool, str]:
        """(skip, ours, shown name) for a code object's file name, cached."""
        hit = self._file_cache.get(filename)
        if hit is None:
            if filename.startswith("<"):
                hit = (True, False, filename)
            else:
                resolved = str(Path(filename).resolve())
                skip = resolved == _THIS_FILE or resolved.startswith(_TORCH_DIR + "/")
                ours = any(resolved == root or resolved.startswith(root + "/") for root in self.our_roots)
                hit = (skip, ours, _display(resolved))
            self._file_cache[filename] = hit
        return hit

    def _origin(self) -> tuple[str, bool, str | None, str | None]:
        """(origin, ours, first of our frames, first third-party frame), as ``file:line``."""
        frame = sys._getframe(1)
        origin: str | None = None
        third: str | None = None
        while frame is not None:
            skip, ours, shown = self._classify_file(frame.f_code.co_filename)
            if not skip:
                where = f"{shown}:{frame.f_lineno}"
                if ours:
                    return (origin or where), origin is None, where, third
                if third is None:
                    third = where
                if origin is None:
                    origin = where
            frame = frame.f_back
        return origin or "<unknown>", False, None, third

    # -- CUDA profiler -----------------------------------------------------------------------------
    def _start_profiler(self) -> None:
        try:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()
            self.notes.append(
                "CUDA profiler: one session around the audit (its start and stop synchronise outside frames)"
            )
        except Exception as exc:  # profiler unavailable (no CUPTI...): say so, keep counting
            self._profiler = None
            self.cuda_profiler = False
            self.notes.append(f"CUDA profiler unavailable ({type(exc).__name__}: {exc})")

    def _stop_profiler(self) -> None:
        prof, self._profiler = self._profiler, None
        try:
            prof.__exit__(None, None, None)
            self._assign_profiler_events(prof.profiler.kineto_results.events())
        except Exception as exc:
            self.notes.append(f"CUDA profiler events unreadable ({type(exc).__name__}: {exc})")

    def _assign_profiler_events(self, events: Sequence[Any]) -> None:
        """Memcpy device events (by the start time of the runtime call that issued them) and
        synchronising runtime calls, per frame marker."""
        spans: list[tuple[int, int, FrameCounts]] = []
        by_name = {f"ultramotion_audit_frame_{i}": rec for i, rec in enumerate(self.frames)}
        runtime_start: dict[int, int] = {}
        for e in events:
            name = e.name()
            if name in by_name:
                spans.append((e.start_ns(), e.start_ns() + e.duration_ns(), by_name[name]))
            elif name.startswith("cuda"):
                runtime_start[e.correlation_id()] = e.start_ns()
        for _, _, rec in spans:
            rec.dtoh_memcpy = rec.htod_memcpy = rec.cuda_runtime_syncs = 0

        def frame_at(t: int) -> FrameCounts | None:
            for start, end, rec in spans:
                if start <= t <= end:
                    return rec
            return None

        for e in events:
            name = e.name()
            lower = name.lower()
            if "memcpy" in lower and ("dtoh" in lower or "htod" in lower) and not name.startswith("cuda"):
                rec = frame_at(runtime_start.get(e.correlation_id(), e.start_ns()))
                if rec is not None:
                    if "dtoh" in lower:
                        rec.dtoh_memcpy += 1
                    else:
                        rec.htod_memcpy += 1
            elif name in (
                "cudaStreamSynchronize",
                "cudaDeviceSynchronize",
                "cudaEventSynchronize",
                "cudaMemcpy",
            ):
                rec = frame_at(e.start_ns())
                if rec is not None:
                    rec.cuda_runtime_syncs += 1


def _display(filename: str) -> str:
    path = Path(filename)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        parts = path.parts
        if "site-packages" in parts:
            return "/".join(parts[parts.index("site-packages") + 1 :])
        lib_parent = Path(_LIB_DIR).parent
        with contextlib.suppress(ValueError):
            return path.resolve().relative_to(lib_parent).as_posix()
        return filename
