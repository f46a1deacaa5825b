"""Runtime transfer audit: count host syncs and device-to-host copies per frame, with their origin.

>>> with RuntimeTransferAudit(pipeline.device) as audit:
...     for i, frame in enumerate(frames):
...         with audit.frame(i):
...             packet = pipeline.process_frame(frame, i)
...             result = packet.to_host()
>>> print(audit.result.to_markdown())

How it counts:

* **Wrappers** (every device): ``torch.Tensor.cpu/.numpy/.item/.tolist/.to`` (when the target is the
  CPU; on a CPU-only run only the string spelling ``.to("cpu")`` counts, since ``.to(self.device)``
  there is an upload on a GPU), ``__bool__/__int__/__float__/__index__/__complex__/__format__/
  __repr__``, ``nonzero/argwhere/masked_select/unique/unique_consecutive/repeat_interleave`` (only
  with a tensor ``repeats`` and no ``output_size``), ``equal/allclose``, one-argument
  ``torch.where``, boolean-mask ``__getitem__/__setitem__``, the same ``torch.*`` functions, and
  ``host.copy_(device_tensor)`` (CUDA only). Only the outermost call counts (``f"{t}"`` is one
  ``format``, not also the ``.item()`` torch runs inside it). They are installed on enter and
  removed on exit, also when the block raises. Calls through names imported before the audit
  (``from torch import nonzero``) are not seen.
* On **CUDA** a call counts when its tensor lives on the GPU (a real hop or sync). In addition
  ``torch.cuda.set_sync_debug_mode("warn")`` is on and its warnings are counted per frame, and each
  frame runs under the profiler, whose ``Memcpy DtoH`` events are counted.
* On **CPU** every wrapped call counts: these are the calls that would be hops or syncs if the
  tensors were on a GPU ("would-be" mode). A chain on one line (``x.cpu().numpy()``) counts once,
  as its first hop, as it would on a GPU.

Each event records its **origin**: the first stack frame outside torch's own tensor plumbing and
this module, marked ``ours`` when it lies under one of ``our_roots`` (default: the
``UltramotionIGTLib`` package) or ``third-party`` otherwise; for third-party origins the first of our
frames further up the stack is recorded too (``our_frame``: where our code called into the library).
Hops made inside ``allowed_host_transfer(reason)`` are counted apart as declared, with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from UltramotionIGTLib.core.hostsync import current_allowed_transfer

_THIS_FILE = str(Path(__file__).resolve())
_TORCH_DIR = Path(torch.__file__).resolve().parent
#: torch's own tensor plumbing: a call from these files is attributed to their caller
_TORCH_PLUMBING = {
    str(_TORCH_DIR / name)
    for name in (
        "_tensor.py",
        "_tensor_str.py",
        "overrides.py",
        "functional.py",
        "_jit_internal.py",
        "_utils.py",
    )
}
_LIB_DIR = str(Path(__file__).resolve().parents[2])  # the UltramotionIGTLib package

_local = threading.local()
_ACTIVE: RuntimeTransferAudit | None = None
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class HopEvent:
    """One counted hop or sync. ``frame`` is None outside ``audit.frame(...)`` blocks (set-up)."""

    frame: int | None
    category: str
    origin: str
    ours: bool
    our_frame: str | None
    declared: str | None
    tensor_device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "category": self.category,
            "origin": self.origin,
            "ours": self.ours,
            "our_frame": self.our_frame,
            "declared": self.declared,
            "tensor_device": self.tensor_device,
        }


@dataclass
class FrameRecord:
    """Counts for one frame: undeclared and declared wrapper events, and CUDA-only measurements."""

    index: int
    undeclared: int = 0
    declared: int = 0
    by_category: Counter = field(default_factory=Counter)
    cuda_sync_warnings: int | None = None
    dtoh_memcpy: int | None = None

    def kpi(self) -> dict[str, Any]:
        """Fields for this frame's KPI record: ``host_syncs`` (undeclared) and ``declared_hops``."""
        out: dict[str, Any] = {"host_syncs": self.undeclared, "declared_hops": self.declared}
        if self.dtoh_memcpy is not None:
            out["dtoh_memcpy"] = self.dtoh_memcpy
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.index,
            "undeclared": self.undeclared,
            "declared": self.declared,
            "by_category": dict(sorted(self.by_category.items())),
            "cuda_sync_warnings": self.cuda_sync_warnings,
            "dtoh_memcpy": self.dtoh_memcpy,
        }


@dataclass
class RuntimeAuditResult:
    """What a `RuntimeTransferAudit` counted."""

    device: str
    device_name: str
    mode: str
    frames: list[FrameRecord]
    events: list[HopEvent]
    notes: list[str] = field(default_factory=list)

    @property
    def frame_events(self) -> list[HopEvent]:
        return [e for e in self.events if e.frame is not None]

    @property
    def totals(self) -> dict[str, int]:
        ev = self.frame_events
        return {
            "undeclared": sum(1 for e in ev if e.declared is None),
            "declared": sum(1 for e in ev if e.declared is not None),
            "outside_frames_undeclared": sum(
                1 for e in self.events if e.frame is None and e.declared is None
            ),
            "outside_frames_declared": sum(
                1 for e in self.events if e.frame is None and e.declared is not None
            ),
        }

    @property
    def syncs_per_frame(self) -> float:
        """Mean undeclared host syncs + device-to-host copies per audited frame (0.0 without frames)."""
        return sum(f.undeclared for f in self.frames) / len(self.frames) if self.frames else 0.0

    @property
    def declared_per_frame(self) -> float:
        return sum(f.declared for f in self.frames) / len(self.frames) if self.frames else 0.0

    def by_category(self) -> dict[str, dict[str, int]]:
        """Frame events per category, split undeclared/declared."""
        out: dict[str, dict[str, int]] = {}
        for e in self.frame_events:
            row = out.setdefault(e.category, {"undeclared": 0, "declared": 0})
            row["declared" if e.declared is not None else "undeclared"] += 1
        return dict(sorted(out.items()))

    def by_origin(self, include_outside_frames: bool = False) -> list[dict[str, Any]]:
        """Rows (origin, ours, category, declared, our_frame, count), most frequent first."""
        events = self.events if include_outside_frames else self.frame_events
        counts = Counter((e.origin, e.ours, e.category, e.declared, e.our_frame) for e in events)
        rows = [
            {"origin": o, "ours": ours, "category": c, "declared": d, "our_frame": of, "count": n}
            for (o, ours, c, d, of), n in counts.items()
        ]
        rows.sort(key=lambda r: (r["declared"] is not None, -r["count"], r["origin"], r["category"]))
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
            "cuda_sync_warnings_per_frame": self._mean("cuda_sync_warnings"),
            "dtoh_memcpy_per_frame": self._mean("dtoh_memcpy"),
            "totals": {"undeclared": totals["undeclared"], "declared": totals["declared"]},
            "outside_frames": {
                "undeclared": totals["outside_frames_undeclared"],
                "declared": totals["outside_frames_declared"],
            },
            "by_category": self.by_category(),
            "by_origin": self.by_origin(),
            "per_frame": [f.to_dict() for f in self.frames],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, title: str | None = None) -> str:
        from UltramotionIGTLib.tools.audit.report import runtime_markdown

        return runtime_markdown(self, title=title)


# ---------------------------------------------------------------------------------------------------
# predicates: which call counts, under which category (None: does not count)


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def _has_bool_index(index: Any) -> bool:
    if isinstance(index, tuple):
        return any(_is_bool_tensor(i) for i in index)
    return _is_bool_tensor(index)


def _to_target_is_cpu(args: tuple, kwargs: dict) -> bool:
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except Exception:
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, torch.Tensor):
            device = device.device
        if isinstance(device, (str, int)) and not isinstance(device, bool):
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                return False
    return isinstance(device, torch.device) and device.type == "cpu"


def _to_counts(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to(...)`` (``args[0]`` is the tensor) is a hop when its target device is the CPU.

    On CUDA any spelling counts (the tensor's device is checked when recording). On CPU only the
    string spelling (``"cpu"``, ``"cpu:0"``, ``device="cpu"``) counts: ``.to(self.device)`` with a
    CPU device would be an upload on a GPU, and the two cannot be told apart by value.
    """
    audit = _ACTIVE
    if audit is not None and not audit.gpu:
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(target, str) and (target == "cpu" or target.startswith("cpu:"))
    return _to_target_is_cpu(args[1:], kwargs)


def _copy_is_download(args: tuple) -> bool:
    """``host.copy_(device_tensor)``: a device-to-host copy (counted on CUDA only: on CPU it cannot be told)."""
    audit = _ACTIVE
    if audit is None or not audit.gpu or len(args) < 2:
        return False
    dst, src = args[0], args[1]
    return (
        isinstance(dst, torch.Tensor)
        and isinstance(src, torch.Tensor)
        and dst.device.type == "cpu"
        and src.device.type != "cpu"
    )


def _repeats_needs_sync(args: tuple, kwargs: dict, is_function: bool) -> bool:
    """repeat_interleave reads its output size back when ``repeats`` is a tensor and no ``output_size``.

    Spellings: ``torch.repeat_interleave(input, repeats)``, ``torch.repeat_interleave(repeats)``,
    ``t.repeat_interleave(repeats)`` (``args[0]`` is ``t`` for the method).
    """
    if kwargs.get("output_size") is not None:
        return False
    if "repeats" in kwargs:
        repeats = kwargs["repeats"]
    elif is_function and len(args) == 1:
        repeats = args[0]
    else:
        repeats = args[1] if len(args) > 1 else None
    return isinstance(repeats, torch.Tensor)


#: (owner, attribute, category, predicate on (args, kwargs) -> bool or None for "always")
_METHOD_SPECS: list[tuple[str, str, Callable[[tuple, dict], bool] | None]] = [
    ("cpu", "cpu", None),
    ("numpy", "numpy", None),
    ("item", "item", None),
    ("tolist", "tolist", None),
    ("to", "to_cpu", _to_counts),
    ("__bool__", "bool", None),
    ("__int__", "int", None),
    ("__float__", "float", None),
    ("__index__", "index", None),
    ("__complex__", "complex", None),
    ("__format__", "format", None),
    ("__repr__", "repr", None),
    ("nonzero", "nonzero", None),
    ("argwhere", "nonzero", None),
    ("masked_select", "masked_select", None),
    ("unique", "unique", None),
    ("unique_consecutive", "unique", None),
    ("repeat_interleave", "repeat_interleave", lambda a, k: _repeats_needs_sync(a, k, False)),
    ("equal", "equal", None),
    ("allclose", "equal", None),
    ("copy_", "copy_to_host", lambda a, k: _copy_is_download(a)),
    ("__getitem__", "bool_mask_index", lambda a, k: len(a) > 1 and _has_bool_index(a[1])),
    ("__setitem__", "bool_mask_index", lambda a, k: len(a) > 1 and _has_bool_index(a[1])),
]
_FUNCTION_SPECS: list[tuple[str, str, Callable[[tuple, dict], bool] | None]] = [
    ("nonzero", "nonzero", None),
    ("argwhere", "nonzero", None),
    ("masked_select", "masked_select", None),
    ("unique", "unique", None),
    ("unique_consecutive", "unique", None),
    ("repeat_interleave", "repeat_interleave", lambda a, k: _repeats_needs_sync(a, k, True)),
    ("equal", "equal", None),
    ("allclose", "equal", None),
    ("is_nonzero", "bool", None),
    ("where", "nonzero", lambda a, k: len(a) == 1 and not k),
]
#: categories that only read a tensor already on the host when chained after a hop on one line
_CHAIN_CATEGORIES = {"numpy", "tolist", "item"}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


class RuntimeTransferAudit:
    """Context manager counting host syncs and device-to-host copies per frame (see module doc).

    ``device``: the device the pipeline runs on (``"cuda"`` turns on the CUDA-only measurements).
    ``our_roots``: folders whose files count as ours (default: the UltramotionIGTLib package).
    ``cuda_profiler``: run each frame under the profiler to count ``Memcpy DtoH`` events (CUDA).
    Only one audit can be active at a time.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        our_roots: Sequence[str | Path] = (),
        cuda_profiler: bool = True,
        cuda_sync_debug: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.our_roots = [_LIB_DIR] + [str(Path(r).resolve()) for r in our_roots]
        self.cuda_profiler = cuda_profiler and self.gpu
        self.cuda_sync_debug = cuda_sync_debug and self.gpu
        self.events: list[HopEvent] = []
        self.frames: list[FrameRecord] = []
        self.notes: list[str] = []
        self._current: FrameRecord | None = None
        self._saved: list[tuple[Any, str, bool, Any]] = []
        self._host_results: dict[int, tuple[Any, str]] = {}  # id -> (weakref, origin) of counted hop results
        self._last_origin = ""
        self._warnings_cm: Any = None
        self._warning_log: list[warnings.WarningMessage] = []
        self._warnings_mark = 0
        self._prev_sync_mode: int | None = None
        self._profiler: Any = None
        self._lock = threading.Lock()
        self._result: RuntimeAuditResult | None = None
        self._file_cache: dict[str, tuple[bool, bool, str]] = {}  # co_filename -> (skip, ours, shown)

    # -- life cycle --------------------------------------------------------------------------------
    def __enter__(self) -> RuntimeTransferAudit:
        global _ACTIVE
        with _ACTIVE_LOCK:
            if _ACTIVE is not None:
                raise RuntimeError("a RuntimeTransferAudit is already active; they cannot be nested")
            _ACTIVE = self
        try:
            self._install()
            if self.cuda_sync_debug:
                self._warnings_cm = warnings.catch_warnings(record=True)
                self._warning_log = self._warnings_cm.__enter__()
                warnings.simplefilter("always")
                self._prev_sync_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
        except BaseException:
            self._uninstall()
            with _ACTIVE_LOCK:
                _ACTIVE = None
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        global _ACTIVE
        try:
            if self._current is not None:
                self._end_frame()
        finally:
            try:
                if self._prev_sync_mode is not None:
                    torch.cuda.set_sync_debug_mode(self._prev_sync_mode)
                    self._prev_sync_mode = None
                if self._warnings_cm is not None:
                    others = [w for w in self._warning_log if not self._is_sync_warning(w)]
                    self._warnings_cm.__exit__(None, None, None)
                    self._warnings_cm = None
                    for w in others:  # give back the warnings we were not looking for
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            finally:
                self._uninstall()
                with _ACTIVE_LOCK:
                    _ACTIVE = None
                self._result = self._build_result()

    @property
    def result(self) -> RuntimeAuditResult:
        """The counts so far (final after the ``with`` block)."""
        return self._result if self._result is not None else self._build_result()

    def _build_result(self) -> RuntimeAuditResult:
        if self.gpu:
            name = torch.cuda.get_device_name(self.device)
            mode = "cuda: real device-to-host copies and syncs"
        else:
            import platform

            name = platform.processor() or platform.machine() or "cpu"
            mode = "cpu: calls that would be hops or syncs on a GPU"
        return RuntimeAuditResult(
            str(self.device), name, mode, list(self.frames), list(self.events), list(self.notes)
        )

    # -- frames ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def frame(self, index: int | None = None) -> Iterator[FrameRecord]:
        """Count what happens inside the block as frame ``index`` (default: the next index)."""
        record = self._start_frame(index)
        try:
            yield record
        finally:
            self._end_frame()

    def next_frame(self, index: int | None = None) -> FrameRecord:
        """Close the open frame (if any) and start the next one; for loops without a ``with``."""
        if self._current is not None:
            self._end_frame()
        return self._start_frame(index)

    def end_frame(self) -> FrameRecord | None:
        """Close the open frame, returning its record (None when no frame was open)."""
        return self._end_frame() if self._current is not None else None

    @property
    def last_frame(self) -> FrameRecord | None:
        """The last closed frame's counts (for a per-frame KPI record)."""
        return self.frames[-1] if self.frames else None

    def _start_frame(self, index: int | None) -> FrameRecord:
        if self._current is not None:
            raise RuntimeError("audit.frame(): a frame is already open")
        if index is None:
            index = self.frames[-1].index + 1 if self.frames else 0
        record = FrameRecord(index)
        if self.gpu:
            self._quiet_synchronize()  # earlier work's copies must not land in this frame
            record.cuda_sync_warnings = 0 if self.cuda_sync_debug else None
            self._warnings_mark = len(self._warning_log)
            if self.cuda_profiler:
                try:
                    from torch.profiler import ProfilerActivity, profile

                    self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self._profiler.__enter__()
                except Exception as exc:  # profiler unavailable (no CUPTI...): say so, keep counting
                    self._profiler = None
                    self.cuda_profiler = False
                    self.notes.append(f"CUDA profiler unavailable ({type(exc).__name__}: {exc})")
        self._current = record
        return record

    def _end_frame(self) -> FrameRecord:
        record = self._current
        assert record is not None
        if self.gpu:
            self._quiet_synchronize()
            if self._profiler is not None:
                prof, self._profiler = self._profiler, None
                try:
                    prof.__exit__(None, None, None)
                    record.dtoh_memcpy = sum(
                        1 for e in prof.events() if "memcpy" in e.name.lower() and "dtoh" in e.name.lower()
                    )
                except Exception as exc:
                    self.notes.append(f"CUDA profiler failed ({type(exc).__name__}: {exc})")
            if self.cuda_sync_debug:
                new = self._warning_log[self._warnings_mark :]
                record.cuda_sync_warnings = sum(1 for w in new if self._is_sync_warning(w))
        self._current = None
        self.frames.append(record)
        return record

    def _quiet_synchronize(self) -> None:
        """Synchronize the device without counting it (sync-debug mode off meanwhile)."""
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            torch.cuda.synchronize(self.device)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    @staticmethod
    def _is_sync_warning(w: warnings.WarningMessage) -> bool:
        return "synchroniz" in str(w.message).lower()

    # -- recording ---------------------------------------------------------------------------------
    def _classify_file(self, filename: str) -> tuple[bool, bool, str]:
        """(skip, ours, shown name) for a code object's file name, cached."""
        hit = self._file_cache.get(filename)
        if hit is None:
            if filename.startswith("<"):
                hit = (filename.startswith("<frozen"), False, filename)
            else:
                resolved = str(Path(filename).resolve())
                skip = resolved == _THIS_FILE or resolved in _TORCH_PLUMBING
                ours = any(resolved == root or resolved.startswith(root + "/") for root in self.our_roots)
                hit = (skip, ours, self._display(resolved))
            self._file_cache[filename] = hit
        return hit

    def _origin(self) -> tuple[str, bool, str | None]:
        """(origin file:line, ours, first of our frames file:line or None) of the current hop."""
        frame = sys._getframe(2)
        origin: str | None = None
        while frame is not None:
            skip, ours, shown = self._classify_file(frame.f_code.co_filename)
            if not skip:
                where = f"{shown}:{frame.f_lineno}"
                if origin is None:
                    if ours:
                        return where, True, where
                    origin = where
                elif ours:
                    return origin, False, where
            frame = frame.f_back
        return origin or "<unknown>", False, None

    @staticmethod
    def _display(filename: str) -> str:
        path = Path(filename)
        try:
            return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            parts = path.parts
            if "site-packages" in parts:
                return "/".join(parts[parts.index("site-packages") + 1 :])
            return filename

    def _record(self, category: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and tensor.device.type == "meta":
            return
        if self.gpu and (tensor is None or tensor.device.type == "cpu"):
            return
        origin, ours, our_frame = self._origin()
        if not self.gpu and category in _CHAIN_CATEGORIES and tensor is not None:
            hit = self._host_results.get(id(tensor))
            if hit is not None and hit[0]() is tensor and hit[1] == origin:
                return  # x.cpu().numpy() on one line: counted once, at .cpu(), as on a GPU
        self._last_origin = origin
        event = HopEvent(
            frame=self._current.index if self._current is not None else None,
            category=category,
            origin=origin,
            ours=ours,
            our_frame=our_frame,
            declared=current_allowed_transfer(),
            tensor_device=str(tensor.device) if tensor is not None else "?",
        )
        with self._lock:
            self.events.append(event)
            rec = self._current
            if rec is not None:
                rec.by_category[category] += 1
                if event.declared is None:
                    rec.undeclared += 1
                else:
                    rec.declared += 1

    def _remember_host(self, tensor: torch.Tensor) -> None:
        if not self.gpu:
            key = id(tensor)
            table = self._host_results

            def forget(ref: Any, k: int = key) -> None:
                if k in table and table[k][0] is ref:
                    del table[k]

            table[key] = (weakref.ref(tensor, forget), self._last_origin)

    # -- patching ----------------------------------------------------------------------------------
    def _install(self) -> None:
        for name, category, pred in _METHOD_SPECS:
            self._patch(torch.Tensor, name, category, pred, method=True)
        for name, category, pred in _FUNCTION_SPECS:
            self._patch(torch, name, category, pred, method=False)

    def _patch(self, owner: Any, name: str, category: str, pred: Any, method: bool) -> None:
        had_own = name in vars(owner)
        original = getattr(owner, name)
        wrapper = _make_wrapper(original, category, pred, method)
        self._saved.append((owner, name, had_own, vars(owner).get(name)))
        setattr(owner, name, wrapper)

    def _uninstall(self) -> None:
        while self._saved:
            owner, name, had_own, original = self._saved.pop()
            if had_own:
                setattr(owner, name, original)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)


def _make_wrapper(original: Callable, category: str, pred: Any, method: bool) -> Callable:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        audit = _ACTIVE
        if audit is None or getattr(_local, "depth", 0):
            return original(*args, **kwargs)
        _local.depth = 1
        try:
            if pred is None or pred(args, kwargs):
                if category == "copy_to_host":
                    tensor = args[1]  # the device-side source
                else:
                    tensor = args[0] if method and args else _first_tensor(args, kwargs)
                audit._record(category, tensor if isinstance(tensor, torch.Tensor) else None)
                result = original(*args, **kwargs)
                if category in ("cpu", "to_cpu") and isinstance(result, torch.Tensor):
                    audit._remember_host(result)
                return result
            return original(*args, **kwargs)
        finally:
            _local.depth = 0

    return wrapper
