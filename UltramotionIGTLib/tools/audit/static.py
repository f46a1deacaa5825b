"""Static GPU->CPU transfer audit on the Python AST.

What it finds, per category (see `CATEGORIES` for the labels shown in reports):

* explicit hops: ``.cpu()``, ``.numpy()``, ``.item()``, ``.tolist()``, ``.to(<cpu>)`` in every
  spelling (``"cpu"``, ``"cpu:0"``, ``device="cpu"``, ``torch.device("cpu")``, a name bound to one
  of those in the same function or at module level, any extra arguments such as ``non_blocking``),
  and ``np.asarray/np.array/np.asanyarray/np.ascontiguousarray`` of a tensor expression that is not
  already an explicit hop (``np.asarray(t.cpu())`` counts once, as ``.cpu()``).
* implicit syncs: ``bool/int/float/complex(tensor)``, ``range(tensor)``, ``operator.index(tensor)``,
  ``torch.equal/allclose/is_nonzero``; a tensor used as a condition (``if``, ``elif``, ``while``,
  ``assert``, ternary, comprehension ``if``; each operand of ``and``/``or``/``not``, ``x in tensor``);
  ``torch.nonzero/argwhere``, ``.nonzero()/.argwhere()``, one-argument ``torch.where(cond)``;
  ``masked_select``; boolean-mask indexing (reads and writes) with a mask known to be boolean;
  ``torch.unique/unique_consecutive`` and the methods; ``repeat_interleave`` with a tensor
  ``repeats`` (or the one-argument ``torch.repeat_interleave(repeats)``) and no ``output_size=``; printing or formatting a tensor
  (``print``, f-string, ``str/repr/format/ascii``, ``"...".format``, ``"..." % t``, logging calls):
  one finding per tensor operand.
* round trips: an upload (``.cuda()``, ``.to(<device that is not provably cpu>)``,
  ``torch.tensor/as_tensor/from_numpy(..., device=...)``) of an expression that contains an explicit
  hop, or of a name assigned (in the same function) from such an expression or from another such
  name. One finding per upload, at the upload.
* ``.detach()`` is listed apart as "not a transfer" (it only cuts the autograd graph).

A chain counts each hop in it: ``x.detach().cpu().numpy()`` is one ``.cpu()``, one ``.numpy()`` and
one ``.detach()`` (apart). Method-name hops (``.cpu()``, ``.numpy()``, ``.item()``, ``.tolist()``,
``.nonzero()``, ``.unique()``...) count on any receiver not known to be host data (a numpy result).

"Tensor expression" without types (a heuristic, flow-sensitive in source order within a function):
parameters annotated ``torch.Tensor``; names assigned from a torch call (``torch.*``,
``torch.nn.functional.*``, ``torchvision.ops.*``), from a tensor method on a tensor, from arithmetic,
comparison, indexing of a tensor; loop variables over a tensor; names unpacked from a call whose
function is annotated ``-> tuple[torch.Tensor, ...]`` (or ``-> torch.Tensor``), or, without an
annotation, whose docstring's "Returns" sentence speaks of tensors; ``self.x`` attributes assigned a
tensor anywhere in the class (also ``setattr(self, "x", t)`` and ``for name, t in self.m().items():
setattr(self, name, t)`` over a method returning a dict of tensors), registered as buffers or
annotated ``torch.Tensor`` in the class body (also ``obj.x`` when ``obj``'s class is known from an
annotation, a constructor or a return annotation). ``.shape/.ndim/.dtype/.device``,
``.dim()/.size()/.numel()`` are not tensors. A boolean mask is a comparison of a tensor,
``~``/``&``/``|`` of masks, ``.bool()``, ``isnan``-like and ``logical_*`` functions,
``.any()/.all()``, ``to(torch.bool)``, ``dtype=torch.bool`` factories, or a name assigned from one of
those. An integer tensor (indices: ``arange``, ``argmax``, ``topk``/``sort`` indices, integer
dtypes, ``torch.LongTensor`` annotations, a mask's ``sum``/``cumsum``) is not a mask. Indexing with a
tensor typed only by an annotation without a dtype (a ``valid: torch.Tensor`` parameter, an element of
an annotated return) is reported as a possible boolean-mask index. Anything else is unknown and is not
reported as an implicit sync. Calls and syncs inside keyword arguments (``f(x=t.cpu())``) count
like positional ones.

Severity: ``critical`` in the per-frame hot path (functions reachable through the call graph from
the entry points, default `DEFAULT_ENTRIES`: ``Pipeline.run``, ``Pipeline.process_frame``,
``ResultPacket.to_host``; or from functions matching ``--hot-path`` globs on ``file:function``),
``medium`` elsewhere in inference code, ``minor`` in training/test/benchmark code (by path),
``declared`` inside ``with allowed_host_transfer(...)``, ``info`` for ``.detach()``. The call graph
is a heuristic too: calls through ``self``, module functions, imports, classes, attributes whose class
is known (``self.x = Cls(...)``, annotations), and, for a method name called on an object of unknown
type, every method of that name in the scanned files unless the name is generic (``update``,
``forward``, tensor method names...). Functions named in the not-hot list (default `DEFAULT_NOT_HOT`,
each ``file:function``: the legacy path kept for side-by-side measurement, the opt-in runtime
audit) are not entered; no name pattern exempts anything.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: category -> (kind, label shown in reports, one-line explanation)
CATEGORIES: dict[str, tuple[str, str, str]] = {
    "cpu": ("hop", ".cpu()", "explicit device-to-host copy"),
    "numpy": ("hop", ".numpy()", "tensor to numpy (host memory)"),
    "item": ("hop", ".item()", "one scalar to the host: a sync per call"),
    "tolist": ("hop", ".tolist()", "whole tensor to Python objects on the host"),
    "to_cpu": ("hop", '.to("cpu")', "explicit device-to-host copy, any spelling"),
    "np_array": ("hop", "np.asarray(tensor)", "numpy conversion of a tensor (implicit .numpy())"),
    "scalar_cast": ("sync", "bool/int/float(tensor)", "Python scalar from a tensor: host sync"),
    "tensor_condition": ("sync", "if/while/assert on tensor", "truth value of a tensor: host sync"),
    "nonzero": ("sync", "nonzero/argwhere", "output size depends on data: host sync"),
    "masked_select": ("sync", "masked_select", "output size depends on data: host sync"),
    "bool_mask_index": ("sync", "t[mask]", "boolean-mask indexing runs nonzero: host sync"),
    "unique": ("sync", "torch.unique", "output size depends on data: host sync"),
    "repeat_interleave": ("sync", "repeat_interleave w/o output_size", "output size read back: host sync"),
    "format_tensor": ("sync", "print/format tensor", "printing or formatting reads the values"),
    "round_trip": ("round_trip", "GPU->CPU->GPU", "data hopped to the host is uploaded again"),
    "detach": ("not_transfer", ".detach()", "not a transfer: cuts the autograd graph only"),
}
SEVERITIES = ("critical", "medium", "minor", "declared", "info")
#: every per-frame entry point (``file:function``): the frame loop, one frame, the host copy at the edge
DEFAULT_ENTRIES = (
    "UltramotionIGTLib/core/pipeline.py:Pipeline.run",
    "UltramotionIGTLib/core/pipeline.py:Pipeline.process_frame",
    "UltramotionIGTLib/core/packet.py:ResultPacket.to_host",
)
#: functions the hot path reaches in the call graph but never runs per frame in the resident path,
#: each named (``file:function``; a ``*`` stands for every function of a file): the numpy edge of the
#: SAM predictor (``predict_boxes(as_numpy=True)``, which the pipeline never asks for), the Pillow
#: resize-order probe (once per process, on host arrays), the warm-up (once per stream, before the
#: first frame: its reduced-precision check compares results on the host, declared at run time) and
#: the opt-in runtime audit itself. (The in-house legacy path lives in tools/benchmarks/legacy.py,
#: outside the core's call graph.)
DEFAULT_NOT_HOT = (
    "UltramotionIGTLib/core/sam/segmenter.py:SamOutput.to_numpy",
    "UltramotionIGTLib/core/sam/resize.py:_pillow_uses_order_rule",
    "UltramotionIGTLib/core/pipeline.py:Pipeline.warmup",
    "UltramotionIGTLib/tools/audit/runtime.py:*",
)
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "node_modules", "site-packages", ".tox"}

TENSOR, BOOL, INT, HOST, CPUDEV = "tensor", "bool", "int", "host", "cpudev"
#: kinds that are tensors (TENSOR: dtype unknown; BOOL: a boolean mask; INT: an integer tensor)
TENSORISH = (TENSOR, BOOL, INT)

_NUMPY_MODULES = {"numpy"}
_TORCH_NON_TENSOR_SUBMODULES = {
    "cuda",
    "backends",
    "jit",
    "profiler",
    "distributed",
    "utils",
    "hub",
    "onnx",
    "testing",
    "compiler",
    "ao",
    "fx",
    "library",
    "_dynamo",
    "multiprocessing",
    "optim",
    "amp",
    "mps",
    "xpu",
    "overrides",
}
_TORCH_NON_TENSOR_FUNCS = {
    "device",
    "dtype",
    "Size",
    "no_grad",
    "inference_mode",
    "enable_grad",
    "set_grad_enabled",
    "is_tensor",
    "is_floating_point",
    "is_complex",
    "numel",
    "get_default_dtype",
    "set_default_dtype",
    "manual_seed",
    "compile",
    "finfo",
    "iinfo",
    "Generator",
    "Stream",
    "Event",
    "set_printoptions",
    "is_grad_enabled",
    "get_num_threads",
    "set_num_threads",
    "use_deterministic_algorithms",
    "load",
    "save",
    "typename",
    "is_storage",
    "equal",
    "allclose",
    "is_nonzero",
    "autocast",
    "Module",
    "Parameter",
    "Sequential",
    "ModuleList",
    "ModuleDict",
    "Linear",
    "Conv2d",
}
_BOOL_TORCH_FUNCS = {
    "isnan",
    "isinf",
    "isfinite",
    "isneginf",
    "isposinf",
    "isin",
    "logical_and",
    "logical_or",
    "logical_not",
    "logical_xor",
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "greater",
    "less",
    "greater_equal",
    "less_equal",
    "not_equal",
    "isclose",
    "signbit",
}
_BOOL_METHODS = _BOOL_TORCH_FUNCS | {"bool"}
_NON_TENSOR_METHODS = {
    "dim",
    "size",
    "numel",
    "nelement",
    "element_size",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "data_ptr",
    "get_device",
    "stride",
    "storage_offset",
    "__len__",
    "untyped_storage",
    "register_hook",
    "backward",
    "is_pinned",
    "is_shared",
    "ndimension",
    "is_set_to",
    "tolist",
    "item",
    "numpy",
    "equal",
    "allclose",
    "is_nonzero",
    "type",
}
_NON_TENSOR_ATTRS = {
    "shape",
    "ndim",
    "dtype",
    "device",
    "is_cuda",
    "requires_grad",
    "layout",
    "names",
    "is_leaf",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "grad_fn",
    "itemsize",
    "nbytes",
}
_TENSOR_ATTRS = {"T", "mT", "H", "mH", "data", "grad", "real", "imag"}
_TUPLE_TENSOR_METHODS = {
    "max",
    "min",
    "sort",
    "topk",
    "kthvalue",
    "median",
    "mode",
    "split",
    "chunk",
    "unbind",
    "unique",
    "split_with_sizes",
    "tensor_split",
    "meshgrid",
    "broadcast_tensors",
    "aminmax",
    "std_mean",
    "var_mean",
    "cummax",
    "cummin",
    "where",
    "frexp",
    "lu",
    "qr",
    "svd",
    "eig",
    "slogdet",
}
#: torch functions that return integer tensors (indices)
_INT_TORCH_FUNCS = {
    "argmax",
    "argmin",
    "argsort",
    "randperm",
    "randint",
    "randint_like",
    "nonzero",
    "argwhere",
    "searchsorted",
    "bucketize",
    "tril_indices",
    "triu_indices",
    "multinomial",
    "bincount",
}
_INT_DTYPES = {"int64", "long", "int32", "int", "int16", "short", "int8"}
#: tensor methods that return integer tensors
_INT_METHODS = {"argmax", "argmin", "argsort", "nonzero", "argwhere", "long", "int", "short", "bincount"}
#: tensor methods whose result keeps the receiver's dtype (so a mask stays a mask, indices stay indices)
_DTYPE_KEEPING_METHODS = {
    "clone",
    "detach",
    "contiguous",
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "permute",
    "transpose",
    "t",
    "cuda",
    "__getitem__",
    "scatter",
    "scatter_",
    "gather",
    "index_select",
    "masked_fill",
    "masked_fill_",
    "flip",
    "roll",
    "repeat",
    "narrow",
    "select",
    "diagonal",
    "tril",
    "triu",
    "cummax",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "fill_",
    "zero_",
    "copy_",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
}
#: (values, indices) tuple results
_VALUES_INDICES_METHODS = {"max", "min", "sort", "topk", "kthvalue", "median", "mode", "cummax", "cummin"}
_PASSTHROUGH_BUILTINS = {
    "float",
    "int",
    "bool",
    "complex",
    "list",
    "tuple",
    "sorted",
    "zip",
    "enumerate",
    "map",
    "reversed",
    "iter",
    "next",
    "min",
    "max",
    "sum",
    "abs",
    "round",
    "dict",
    "set",
}
_LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
#: method names too generic to resolve by name on an object of unknown type
_GENERIC_METHODS = {
    "update",
    "get",
    "set",
    "append",
    "extend",
    "pop",
    "items",
    "keys",
    "values",
    "add",
    "remove",
    "clear",
    "copy",
    "sort",
    "reset",
    "run",
    "start",
    "stop",
    "close",
    "open",
    "read",
    "write",
    "load",
    "save",
    "to",
    "cpu",
    "cuda",
    "numpy",
    "item",
    "tolist",
    "forward",
    "step",
    "format",
    "join",
    "split",
    "strip",
    "replace",
    "encode",
    "decode",
    "mean",
    "sum",
    "max",
    "min",
    "view",
    "reshape",
    "float",
    "int",
    "long",
    "half",
    "bool",
    "detach",
    "clone",
    "size",
    "dim",
    "any",
    "all",
    "where",
    "index",
    "count",
    "apply",
    "eval",
    "train",
    "state_dict",
    "parameters",
    "unsqueeze",
    "squeeze",
    "permute",
    "contiguous",
    "expand",
    "repeat",
    "flatten",
    "sigmoid",
    "softmax",
    "topk",
    "argmax",
    "argmin",
    "gather",
    "scatter",
    "stack",
    "cat",
    "transpose",
    "clamp",
    "round",
    "abs",
    "exp",
    "log",
    "sqrt",
    "pow",
    "matmul",
    "t",
    "type",
    "tensor",
    "info",
    "debug",
    "warning",
    "error",
    "exception",
    "critical",
    "put",
    "send",
    "recv",
    "next",
    "flush",
    "main",
    "setdefault",
    "lower",
    "upper",
    "startswith",
    "endswith",
    "fill_",
    "zero_",
    "copy_",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "new_tensor",
    "float_",
    "nonzero",
    "unique",
    "register_buffer",
    "named_parameters",
    "modules",
    "children",
    "requires_grad_",
    "half_",
    "mul",
    "div",
    "sub",
    "norm",
    "prod",
    "exists",
    "mkdir",
    "is_file",
    "is_dir",
    "resolve",
    "with_suffix",
    "elapsed_ms",
}


@dataclass(frozen=True)
class Finding:
    """One finding. ``file`` is relative to the scan root (POSIX), ``line``/``col`` 1-based/0-based."""

    file: str
    line: int
    col: int
    function: str
    category: str
    severity: str
    code: str
    hot_path: bool
    declared: bool
    declared_reason: str | None = None

    @property
    def kind(self) -> str:
        return CATEGORIES[self.category][0]

    @property
    def label(self) -> str:
        return CATEGORIES[self.category][1]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = self.kind
        out["label"] = self.label
        return out


@dataclass
class StaticAuditResult:
    """All findings of one scan plus what the hot path was computed from."""

    paths: list[str]
    files_scanned: int
    entries: list[str]
    hot_patterns: list[str]
    not_hot_patterns: list[str]
    hot_functions: list[str]
    findings: list[Finding] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)
    unresolved_entries: list[str] = field(default_factory=list)
    unmatched_not_hot: list[str] = field(default_factory=list)

    @property
    def transfers(self) -> list[Finding]:
        """Everything except ``.detach()`` (which is not a transfer)."""
        return [f for f in self.findings if f.category != "detach"]

    def by_severity(self) -> dict[str, int]:
        counts = Counter(f.severity for f in self.findings)
        return {s: counts.get(s, 0) for s in SEVERITIES}

    def by_category(self) -> dict[str, int]:
        counts = Counter(f.category for f in self.findings)
        return {c: counts.get(c, 0) for c in CATEGORIES}

    def by_kind(self) -> dict[str, int]:
        counts = Counter(f.kind for f in self.findings)
        return {k: counts.get(k, 0) for k in ("hop", "sync", "round_trip", "not_transfer")}

    def by_file(self) -> dict[str, int]:
        """Findings per file (transfers only, ``.detach()`` excluded), most first."""
        counts = Counter(f.file for f in self.transfers)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def critical(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "critical"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "paths": self.paths,
            "files_scanned": self.files_scanned,
            "entries": self.entries,
            "unresolved_entries": self.unresolved_entries,
            "unmatched_not_hot": self.unmatched_not_hot,
            "hot_path_patterns": self.hot_patterns,
            "not_hot_patterns": self.not_hot_patterns,
            "hot_path_functions": self.hot_functions,
            "totals": {
                "findings": len(self.transfers),
                "declared": sum(1 for f in self.findings if f.declared),
                "critical": len(self.critical()),
                "not_transfers_detach": self.by_category()["detach"],
                **{k: v for k, v in self.by_kind().items() if k != "not_transfer"},
            },
            "by_severity": self.by_severity(),
            "by_category": self.by_category(),
            "by_file": self.by_file(),
            "parse_errors": self.parse_errors,
            "findings": [f.to_dict() for f in self.findings],
        }


# ---------------------------------------------------------------------------------------------------
# helpers on AST nodes


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for Name/Attribute chains, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_torch_function_path(path: list[str]) -> bool:
    """``torch.cat``, ``torch.linalg.norm``, ``torch.nn.functional.relu``, ``torchvision.ops.box_iou``...

    Attribute chains through anything else (``torch.__version__.split``, ``torch.cuda.*``,
    ``torchvision.tv_tensors.*``) are not tensor-returning functions.
    """
    if any(part.startswith("__") for part in path):
        return False
    if path[-1].startswith(("_", "is_", "are_", "get_", "set_", "use_", "enable_", "disable_", "manual_")):
        return False  # private helpers and flags (torch.is_autocast_enabled(), torch.get_default_dtype())
    if path[0] == "torch":
        if len(path) == 2:
            return True
        if len(path) == 3 and path[1] in ("linalg", "fft", "special", "nested", "sparse", "masked"):
            return True
        return len(path) == 4 and path[1:3] == ["nn", "functional"]
    if path[0] == "torchvision":
        if len(path) == 3 and path[1] == "ops":
            return True
        return len(path) >= 4 and path[1] == "transforms" and path[-2] == "functional"
    return False


def _annotation_kind(node: ast.AST | None) -> str | None:
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    else:
        try:
            text = ast.unparse(node)
        except Exception:  # pragma: no cover - unparse handles every expression
            return None
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text).replace("|None", "").replace("None|", "")
    if text in ("torch.Tensor", "Tensor", "th.Tensor", "torch.nn.Parameter", "nn.Parameter"):
        return TENSOR
    if text in ("torch.LongTensor", "torch.IntTensor", "LongTensor", "IntTensor"):
        return INT
    if text in ("torch.BoolTensor", "BoolTensor"):
        return BOOL
    if text in ("np.ndarray", "numpy.ndarray", "ndarray", "int", "float", "bool", "str"):
        return HOST
    return None


def _return_kinds(
    fn: ast.FunctionDef | ast.AsyncFunctionDef,
) -> tuple[str | None, tuple[str | None, ...] | None]:
    """(kind of the returned value, kinds of a returned tuple's elements) from the return
    annotation (``-> torch.Tensor``, ``-> tuple[torch.Tensor, torch.Tensor]``, ``-> tuple[Tensor, ...]``)
    or, without one, from the docstring: a "Returns" sentence that speaks of tensors makes every
    returned value (and tuple element) a tensor of unknown dtype."""
    ann = fn.returns
    if ann is not None:
        single = _annotation_kind(ann)
        if single is not None:
            return single, None
        if isinstance(ann, ast.Subscript) and (_dotted(ann.value) or "").split(".")[-1] in ("tuple", "Tuple"):
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            if len(elts) == 2 and isinstance(elts[1], ast.Constant) and elts[1].value is Ellipsis:
                return None, (_annotation_kind(elts[0]),) * 64
            return None, tuple(_annotation_kind(e) for e in elts)
        return None, None
    doc = ast.get_docstring(fn) or ""
    match = re.search(r"\bReturns?\b", doc)
    if match:
        sentence = doc[match.start() :].split("\n\n", 1)[0]
        if re.search(r"\btensors?\b", sentence, re.IGNORECASE):
            return TENSOR, (TENSOR,) * 64
    return None, None


def _annotation_class(node: ast.AST | None) -> str | None:
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    else:
        text = ast.unparse(node)
    text = re.sub(r"\s+", "", text).replace("|None", "").replace("None|", "")
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    return text.split(".")[-1] if re.fullmatch(r"[A-Za-z_][\w.]*", text) else None


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


# ---------------------------------------------------------------------------------------------------
# per-file model


@dataclass
class _FuncInfo:
    file: str
    qualname: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    class_name: str | None
    returns_tensor: bool
    returns: str | None = None  # kind of the returned value (TENSOR, BOOL, INT) or None
    returns_tuple: tuple[str | None, ...] | None = None  # kinds of a returned tuple's elements
    returns_class: str | None = None  # class name of the returned object (``-> Detections``)


@dataclass
class _ClassInfo:
    name: str
    file: str
    bases: list[str]
    methods: dict[str, str]  # method name -> qualname
    tensor_attrs: dict[str, str] = field(default_factory=dict)  # self.x -> TENSOR / BOOL / INT
    dict_tensor_keys: dict[str, set[str]] = field(
        default_factory=dict
    )  # method -> keys of its dict of tensors
    attr_types: dict[str, str] = field(default_factory=dict)  # self.x -> class name


@dataclass
class _FileInfo:
    path: Path
    rel: str
    module: str
    tree: ast.Module
    lines: list[str]
    minor: bool
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> dotted import target
    functions: dict[str, _FuncInfo] = field(default_factory=dict)  # qualname -> info
    classes: dict[str, _ClassInfo] = field(default_factory=dict)
    module_env: dict[str, str] = field(default_factory=dict)


def _is_minor_path(rel: str) -> bool:
    parts = rel.split("/")
    name = parts[-1]
    for part in parts[:-1]:
        low = part.lower()
        if low in ("testing", "tests", "test", "benchmarks", "benchmark") or low.startswith("train"):
            return True
    return (
        name.startswith("test_")
        or name.endswith("_test.py")
        or name == "conftest.py"
        or name.startswith("train")
        or name.startswith("bench")
    )


def _module_name(rel: str) -> str:
    mod = rel[:-3] if rel.endswith(".py") else rel
    parts = [p for p in mod.split("/") if p]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _collect_imports(info: _FileInfo) -> None:
    package = info.module.rsplit(".", 1)[0] if "." in info.module else ""
    if info.rel.endswith("__init__.py"):
        package = info.module
    for node in ast.walk(info.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    info.aliases[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    info.aliases[root] = root
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg_parts = package.split(".") if package else []
                pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                base = ".".join([*pkg_parts, base] if base else pkg_parts)
            for alias in node.names:
                info.aliases[alias.asname or alias.name] = f"{base}.{alias.name}" if base else alias.name


def _collect_defs(info: _FileInfo) -> None:
    def visit(body: list[ast.stmt], prefix: str, class_name: str | None, cls: _ClassInfo | None) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{node.name}"
                single, elements = _return_kinds(node)
                info.functions[qual] = _FuncInfo(
                    info.rel,
                    qual,
                    node,
                    class_name,
                    single in TENSORISH,
                    single,
                    elements,
                    _annotation_class(node.returns) if single is None and elements is None else None,
                )
                if cls is not None:
                    cls.methods[node.name] = qual
                visit(node.body, qual + ".", None, None)
            elif isinstance(node, ast.ClassDef):
                qual = f"{prefix}{node.name}"
                bases = [b for b in (_dotted(base) for base in node.bases) if b]
                new = _ClassInfo(node.name, info.rel, [b.split(".")[-1] for b in bases], {})
                if not prefix:
                    info.classes[node.name] = new
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        ann = _annotation_kind(stmt.annotation)
                        if ann in TENSORISH:
                            new.tensor_attrs[stmt.target.id] = ann
                        else:
                            cname = _annotation_class(stmt.annotation)
                            if cname:
                                new.attr_types[stmt.target.id] = cname
                visit(node.body, qual + ".", node.name, new)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for sub in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, sub, None) or []
                    if sub == "handlers":
                        for handler in children:
                            visit(handler.body, prefix, class_name, cls)
                    else:
                        visit(children, prefix, class_name, cls)

    visit(info.tree.body, "", None, None)


# ---------------------------------------------------------------------------------------------------
# the scanner


class _Scanner:
    def __init__(self, files: list[_FileInfo]) -> None:
        self.files = files
        self.by_module = {f.module: f for f in files}
        self._module_cache: dict[str, _FileInfo | None] = {}
        self.classes: dict[str, list[_ClassInfo]] = defaultdict(list)
        self.methods_by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.func_index: dict[tuple[str, str], _FuncInfo] = {}
        for f in files:
            for cls in f.classes.values():
                self.classes[cls.name].append(cls)
        for f in files:
            for qual, fn in f.functions.items():
                if fn.class_name is not None:
                    self.methods_by_name[fn.node.name].append((f.rel, qual))
                self.func_index[(f.rel, qual)] = fn
        self.findings: list[Finding] = []
        self.edges: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        self._collect_class_attrs()

    # -- class attributes --------------------------------------------------------------------------
    def _collect_class_attrs(self) -> None:
        self._collect_dict_returns()
        for f in self.files:
            for fn in f.functions.values():
                if fn.class_name is None or fn.class_name not in f.classes:
                    continue
                cls = f.classes[fn.class_name]
                params = self._param_env(fn.node, f)
                local_types: dict[str, str] = {}
                in_source_order = sorted(
                    (n for n in ast.walk(fn.node) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.Call))),
                    key=lambda n: (n.lineno, n.col_offset),
                )
                for node in in_source_order:
                    if isinstance(node, ast.Assign) and len(node.targets) == 1:
                        target, value = node.targets[0], node.value
                    elif isinstance(node, ast.AnnAssign) and node.value is not None:
                        target, value = node.target, node.value
                        ann = _annotation_kind(node.annotation)
                        if ann in TENSORISH and self._is_self_attr(target):
                            cls.tensor_attrs[target.attr] = ann
                    else:
                        if isinstance(node, ast.Call) and _dotted(node.func) == "self.register_buffer":
                            if node.args and isinstance(node.args[0], ast.Constant):
                                cls.tensor_attrs[str(node.args[0].value)] = TENSOR
                        elif isinstance(node, ast.Call):
                            self._setattr(node, fn, f, cls, params)
                        continue
                    cname = self._constructed_class(value, f)
                    if isinstance(target, ast.Name) and cname:
                        local_types[target.id] = cname
                    if not self._is_self_attr(target):
                        continue
                    kind = self._expr_kind_simple(value, f, params)
                    if kind in TENSORISH:
                        cls.tensor_attrs[target.attr] = kind
                    if cname:
                        cls.attr_types[target.attr] = cname
                    elif isinstance(value, ast.Name):
                        if value.id in local_types:
                            cls.attr_types[target.attr] = local_types[value.id]
                        else:
                            ann = self._param_annotation(fn.node, value.id)
                            cname = _annotation_class(ann)
                            if cname and cname in self.classes:
                                cls.attr_types[target.attr] = cname

    def _collect_dict_returns(self) -> None:
        """Methods that return a dict literal of tensors: ``{"boxes": torch.zeros(...), ...}``."""
        for f in self.files:
            for fn in f.functions.values():
                if fn.class_name is None or fn.class_name not in f.classes:
                    continue
                params = self._param_env(fn.node, f)
                for node in ast.walk(fn.node):
                    if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                        keys = {}
                        for k, v in zip(node.value.keys, node.value.values, strict=True):
                            kind = self._expr_kind_simple(v, f, params)
                            if isinstance(k, ast.Constant) and isinstance(k.value, str) and kind in TENSORISH:
                                keys[k.value] = kind
                        if keys:
                            f.classes[fn.class_name].dict_tensor_keys[fn.node.name] = keys

    def _setattr(self, call: ast.Call, fn: _FuncInfo, f: _FileInfo, cls: _ClassInfo, params: dict) -> None:
        """``setattr(self, "x", t)`` / ``object.__setattr__(self, "x", t)``, and the loop
        ``for name, t in self.fresh().items(): setattr(self, name, t)`` over a method's dict of tensors."""
        name = _dotted(call.func)
        if name not in ("setattr", "object.__setattr__") or len(call.args) != 3:
            return
        owner, attr, value = call.args
        if not (isinstance(owner, ast.Name) and owner.id == "self"):
            return
        if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
            kind = self._expr_kind_simple(value, f, params)
            if kind in TENSORISH:
                cls.tensor_attrs[attr.value] = kind
            return
        if not isinstance(attr, ast.Name):
            return
        for loop in ast.walk(fn.node):
            if not (isinstance(loop, ast.For) and any(call is n for n in ast.walk(loop))):
                continue
            target, it = loop.target, loop.iter
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            if not (names and isinstance(names[0], ast.Name) and names[0].id == attr.id):
                continue
            # for name, t in self.method().items()  |  for name in self.method()
            src = (
                it.func.value
                if isinstance(it, ast.Call)
                and isinstance(it.func, ast.Attribute)
                and it.func.attr in ("items", "keys")
                else it
            )
            if isinstance(src, ast.Call) and self._is_self_attr(src.func):
                for other in [cls, *self.classes.get(cls.name, [])]:
                    keys = other.dict_tensor_keys.get(src.func.attr)
                    if keys:
                        cls.tensor_attrs.update(keys)
                        return

    @staticmethod
    def _is_self_attr(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        )

    @staticmethod
    def _param_annotation(fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> ast.AST | None:
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if a.arg == name:
                return a.annotation
        return None

    def _constructed_class(self, value: ast.AST, f: _FileInfo) -> str | None:
        if isinstance(value, ast.Call):
            name = _dotted(value.func)
            if name:
                last = name.split(".")[-1]
                if last in self.classes:
                    return last
                if last in ("from_pretrained", "from_checkpoint", "from_paths") and "." in name:
                    owner = name.split(".")[-2]
                    if owner in self.classes:
                        return owner
        return None

    def _param_env(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, f: _FileInfo) -> dict[str, str]:
        env: dict[str, str] = {}
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            kind = _annotation_kind(a.annotation)
            if kind:
                env[a.arg] = kind
            else:
                cname = _annotation_class(a.annotation)
                if cname and cname in self.classes:
                    env[a.arg] = "obj:" + cname
        return env

    def _expr_kind_simple(self, value: ast.AST, f: _FileInfo, env: dict[str, str]) -> str | None:
        return _ExprClassifier(self, f, env, None).kind(value)

    # -- scanning ----------------------------------------------------------------------------------
    def scan(self) -> None:
        for f in self.files:
            module_visitor = _FunctionVisitor(self, f, "<module>", None, {}, module_level=True)
            module_visitor.run(f.tree.body)
            f.module_env = module_visitor.env
        for f in self.files:
            nested: dict[str, list[str]] = defaultdict(list)
            for qual in f.functions:
                parent = qual.rpartition(".")[0]
                if parent in f.functions:
                    nested[parent].append(qual)
            for qual, fn in f.functions.items():
                env = dict(f.module_env)
                env.update(self._param_env(fn.node, f))
                visitor = _FunctionVisitor(self, f, qual, fn.class_name, env)
                args = fn.node.args
                visitor.annotated = {
                    a.arg
                    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]
                    if _annotation_kind(a.annotation) == TENSOR
                }
                visitor.run(fn.node.body)
                # nested functions run when their parent runs (an approximation)
                for child in nested.get(qual, ()):
                    self.edges[(f.rel, qual)].add((f.rel, child))

    def add(self, f: _FileInfo, node: ast.AST, function: str, category: str, declared: str | None) -> None:
        line = getattr(node, "lineno", 0)
        code = f.lines[line - 1].strip() if 0 < line <= len(f.lines) else ""
        self.findings.append(
            Finding(
                file=f.rel,
                line=line,
                col=getattr(node, "col_offset", 0),
                function=function,
                category=category,
                severity="",
                code=code,
                hot_path=False,
                declared=declared is not None,
                declared_reason=declared,
            )
        )

    # -- call resolution ---------------------------------------------------------------------------
    def _resolve_module(self, dotted: str) -> _FileInfo | None:
        """The scanned file of an imported module (exact name, else a suffix match), memoized."""
        if dotted in self.by_module:
            return self.by_module[dotted]
        if dotted not in self._module_cache:
            found = None
            for mod, info in self.by_module.items():
                if mod.endswith("." + dotted) or dotted.endswith("." + mod):
                    found = info
                    break
            self._module_cache[dotted] = found
        return self._module_cache[dotted]

    def _class_methods(self, cname: str, method: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        todo = [cname]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for cls in self.classes.get(name, []):
                if method in cls.methods:
                    out.append((cls.file, cls.methods[method]))
                todo.extend(cls.bases)
        return out

    def resolve_call(
        self, f: _FileInfo, func: ast.AST, class_name: str | None, env: dict[str, str]
    ) -> list[tuple[str, str]]:
        if isinstance(func, ast.Name):
            name = func.id
            if name in f.functions and f.functions[name].class_name is None:
                return [(f.rel, name)]
            if name in f.classes:
                return self._class_methods(name, "__init__")
            target = f.aliases.get(name)
            if target and "." in target:
                mod, sym = target.rsplit(".", 1)
                info = self._resolve_module(mod)
                if info is not None:
                    if sym in info.functions:
                        return [(info.rel, sym)]
                    if sym in info.classes:
                        return self._class_methods(sym, "__init__")
            return []
        if not isinstance(func, ast.Attribute):
            return []
        method = func.attr
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id == "self" and class_name:
            found = self._class_methods(class_name, method)
            if found:
                return found
            for cls in self.classes.get(class_name, []):
                if method in cls.attr_types:
                    t = cls.attr_types[method]
                    return self._class_methods(t, "__call__") + self._class_methods(t, "forward")
            return []
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            out: list[tuple[str, str]] = []
            for cls in self.classes.get(class_name or "", []):
                for base in cls.bases:
                    out += self._class_methods(base, method)
            return out
        # self.attr.method(...)
        if self._is_self_attr(owner) and class_name:
            for cls in self.classes.get(class_name, []):
                t = cls.attr_types.get(owner.attr)
                if t:
                    found = self._class_methods(t, method)
                    if found:
                        return found
        if isinstance(owner, ast.Name):
            kind = env.get(owner.id, "")
            if kind.startswith("obj:"):
                found = self._class_methods(kind[4:], method)
                if found:
                    return found
            if owner.id in f.classes or owner.id in self.classes:
                found = self._class_methods(owner.id, method)
                if found:
                    return found
            target = f.aliases.get(owner.id)
            if target:
                info = self._resolve_module(target)
                if info is not None:
                    if method in info.functions:
                        return [(info.rel, method)]
                    if method in info.classes:
                        return self._class_methods(method, "__init__")
                    return []
                if "." in target:
                    sym = target.rsplit(".", 1)[1]
                    if sym in self.classes:
                        return self._class_methods(sym, method)
                return []  # a third-party module
        if method.startswith("__") or method in _GENERIC_METHODS:
            return []
        return list(self.methods_by_name.get(method, []))


class _ExprClassifier:
    """Kind of an expression: TENSOR, BOOL (boolean tensor), HOST, CPUDEV (a cpu device) or None."""

    def __init__(self, scanner: _Scanner, f: _FileInfo, env: dict[str, str], class_name: str | None) -> None:
        self.s = scanner
        self.f = f
        self.env = env
        self.class_name = class_name
        self._returns_cache: dict[int, _FuncInfo | None] = {}

    def _module_of(self, name: str) -> str | None:
        return self.f.aliases.get(name)

    def torch_path(self, node: ast.AST) -> list[str] | None:
        """['torch', 'nn', 'functional', 'relu'] for any alias spelling of a torch(-vision) attribute."""
        dotted = _dotted(node)
        if not dotted:
            return None
        head, *rest = dotted.split(".")
        target = self._module_of(head)
        if target is None:
            return None
        full = target.split(".") + rest
        if full[0] in ("torch", "torchvision"):
            return full
        return None

    def numpy_path(self, node: ast.AST) -> list[str] | None:
        dotted = _dotted(node)
        if not dotted:
            return None
        head, *rest = dotted.split(".")
        target = self._module_of(head)
        if target is None:
            return None
        full = target.split(".") + rest
        return full if full[0] in _NUMPY_MODULES else None

    def is_cpu_device(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value == "cpu" or node.value.startswith("cpu:")
        if isinstance(node, ast.Name):
            return self.env.get(node.id) == CPUDEV
        if isinstance(node, ast.Call):
            path = self.torch_path(node.func)
            if path == ["torch", "device"]:
                arg = node.args[0] if node.args else _kw(node, "type")
                return arg is not None and self.is_cpu_device(arg)
        return False

    def is_dtype(self, node: ast.AST) -> bool:
        path = self.torch_path(node)
        if path and len(path) == 2 and path[1] not in ("device",) and path[1][0].islower():
            return True
        dotted = _dotted(node) or ""
        return "dtype" in dotted.split(".")[-1].lower()

    def is_device_like(self, node: ast.AST) -> bool:
        """An upload target: a non-cpu device constant, torch.device(...), or a name that says device."""
        if self.is_cpu_device(node):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.startswith(("cuda", "mps", "xpu"))
        if isinstance(node, ast.Call):
            return self.torch_path(node.func) == ["torch", "device"]
        dotted = _dotted(node)
        if dotted:
            last = dotted.split(".")[-1].lower()
            return "device" in last or last in ("dev", "cuda", "gpu")
        return False

    def to_target_is_cpu(self, call: ast.Call) -> bool:
        dev = _kw(call, "device")
        if dev is not None:
            return self.is_cpu_device(dev)
        return bool(call.args) and self.is_cpu_device(call.args[0])

    def to_is_upload(self, call: ast.Call) -> bool:
        dev = _kw(call, "device")
        if dev is not None:
            return self.is_device_like(dev)
        if call.args and not self.is_dtype(call.args[0]):
            return self.is_device_like(call.args[0])
        return False

    def kind(self, node: ast.AST) -> str | None:  # noqa: C901 - one dispatch table
        if isinstance(node, ast.Name):
            k = self.env.get(node.id)
            return k if k in (*TENSORISH, HOST, CPUDEV) else None
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and (node.value == "cpu" or node.value.startswith("cpu:")):
                return CPUDEV
            return HOST
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict, ast.JoinedStr, ast.ListComp)):
            return HOST if not isinstance(node, ast.Tuple) else None
        if isinstance(node, ast.Compare):
            if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                return HOST
            if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                return HOST
            kinds = [self.kind(node.left), *(self.kind(c) for c in node.comparators)]
            return BOOL if any(k in TENSORISH for k in kinds) else None
        if isinstance(node, ast.BinOp):
            left, right = self.kind(node.left), self.kind(node.right)
            if isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)) and BOOL in (left, right):
                return BOOL
            if INT in (left, right) and {left, right} <= {INT, HOST} and not isinstance(node.op, ast.Div):
                return INT
            if any(k in TENSORISH for k in (left, right)):
                if isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                    return HOST  # "%s" % t is a string
                return TENSOR
            return HOST if left == HOST and right == HOST else None
        if isinstance(node, ast.UnaryOp):
            inner = self.kind(node.operand)
            if isinstance(node.op, ast.Not):
                return HOST
            return inner if inner in TENSORISH else (HOST if inner == HOST else None)
        if isinstance(node, ast.IfExp):
            a, b = self.kind(node.body), self.kind(node.orelse)
            return a if a == b else (TENSOR if TENSOR in (a, b) else None)
        if isinstance(node, ast.Subscript):
            base = self.kind(node.value)
            if base == INT:
                return INT
            return TENSOR if base in TENSORISH else (HOST if base == HOST else None)
        if isinstance(node, ast.Attribute):
            if node.attr in _NON_TENSOR_ATTRS:
                return HOST if node.attr != "device" else None
            base = self.kind(node.value)
            if node.attr in _TENSOR_ATTRS and base in TENSORISH:
                return base
            if isinstance(node.value, ast.Name):
                owner = node.value.id
                if owner == "self" and self.class_name:
                    for cls in self.s.classes.get(self.class_name, []):
                        if node.attr in cls.tensor_attrs:
                            return cls.tensor_attrs[node.attr]
                k = self.env.get(owner, "")
                if k.startswith("obj:"):
                    for cls in self.s.classes.get(k[4:], []):
                        if node.attr in cls.tensor_attrs:
                            return cls.tensor_attrs[node.attr]
            path = self.torch_path(node)
            if path and len(path) == 2 and path[1] in ("bool",):
                return None
            return None
        if isinstance(node, ast.Call):
            return self.call_kind(node)
        if isinstance(node, ast.Starred):
            return self.kind(node.value)
        if isinstance(node, ast.NamedExpr):
            return self.kind(node.value)
        return None

    def returned(self, func: ast.AST) -> _FuncInfo | None:
        """The scanned function a call resolves to (call graph) that says what it returns, or None."""
        key = id(func)
        if key not in self._returns_cache:
            targets = self.s.resolve_call(self.f, func, self.class_name, self.env)
            infos = [self.s.func_index[t] for t in targets if t in self.s.func_index]
            known = [i for i in infos if i.returns or i.returns_tuple or i.returns_class]
            self._returns_cache[key] = known[0] if known else None
        return self._returns_cache[key]

    def dtype_kind(self, node: ast.AST | None) -> str | None:
        """BOOL / INT for a ``torch.bool`` / integer dtype expression, else None."""
        if node is None:
            return None
        last = (self.torch_path(node) or [""])[-1]
        if last == "bool":
            return BOOL
        if last in _INT_DTYPES:
            return INT
        return None

    def call_kind(self, node: ast.Call) -> str | None:  # noqa: C901 - one dispatch table
        func = node.func
        tpath = self.torch_path(func)
        if tpath is not None:
            if not _is_torch_function_path(tpath):
                return None
            last = tpath[-1]
            if last == "device":
                return CPUDEV if self.is_cpu_device(node) else None
            if last in ("equal", "allclose", "is_nonzero", "is_tensor", "numel"):
                return HOST
            if last in _TORCH_NON_TENSOR_FUNCS or (last[:1].isupper() and tpath[1] != "tensor"):
                return None
            if last in _BOOL_TORCH_FUNCS:
                return BOOL
            if last in ("any", "all") and (len(node.args) > 1 or _kw(node, "dim") is not None):
                return BOOL
            dtype = self.dtype_kind(_kw(node, "dtype"))
            if dtype is not None:
                return dtype
            if last in _INT_TORCH_FUNCS:
                return INT
            # where(cond, a, b) and cat/stack keep the dtype their tensors share (a mask, indices)
            if last == "where" and len(node.args) == 3:
                return self._shared_kind(node.args[1:])
            if last in ("cat", "concat", "concatenate", "stack", "hstack", "vstack") and node.args:
                if isinstance(node.args[0], (ast.Tuple, ast.List)):
                    return self._shared_kind(node.args[0].elts)
            if (
                last in ("sum", "cumsum", "count_nonzero")
                and node.args
                and self.kind(node.args[0]) in (BOOL, INT)
            ):
                return INT
            if last == "arange" and not any(
                isinstance(a, ast.Constant) and isinstance(a.value, float) for a in node.args
            ):
                return INT
            return TENSOR
        npath = self.numpy_path(func)
        if npath is not None:
            return HOST
        if isinstance(func, ast.Name):
            if func.id in ("len", "int", "float", "bool", "str", "repr", "range", "format", "list", "tuple"):
                return HOST
            info = self.returned(func)
            return info.returns if info is not None and info.returns in TENSORISH else None
        if isinstance(func, ast.Attribute):
            method = func.attr
            recv = self.kind(func.value)
            if method in ("numpy", "tolist", "item"):
                return HOST
            if method in ("cpu",):
                return recv if recv in TENSORISH else TENSOR
            if recv in TENSORISH:
                if method in _NON_TENSOR_METHODS:
                    return HOST
                if method in _BOOL_METHODS or method in ("any", "all"):
                    return BOOL
                if method in _INT_METHODS:
                    return INT
                if method in ("sum", "cumsum", "count_nonzero") and recv in (BOOL, INT):
                    return INT  # counting a mask, summing indices
                if method in ("to", "type"):
                    args = [*node.args, *(kw.value for kw in node.keywords if kw.arg == "dtype")]
                    for a in args:
                        kind = self.dtype_kind(a)
                        if kind is not None:
                            return kind
                    if any(self.torch_path(a) for a in args):
                        return TENSOR  # another dtype
                    return recv
                if method in _DTYPE_KEEPING_METHODS:
                    return recv
                return TENSOR
            if recv == HOST:
                return HOST
            info = self.returned(func)
            if info is not None and info.returns in TENSORISH:
                return info.returns
        return None

    def _shared_kind(self, nodes: Sequence[ast.AST]) -> str:
        """INT / BOOL when every tensor among ``nodes`` is one (Python numbers go along), else TENSOR."""
        kinds = [self.kind(n) for n in nodes]
        tensors = [k for k in kinds if k in TENSORISH]
        others_host = all(k in TENSORISH or k == HOST for k in kinds)
        if tensors and others_host and all(k == INT for k in tensors):
            return INT
        if tensors and all(k == BOOL for k in kinds):
            return BOOL
        return TENSOR

    def call_class(self, node: ast.Call) -> str | None:
        """Class name of the object a call returns: a constructor, or a function annotated ``-> Cls``."""
        cname = self.s._constructed_class(node, self.f)
        if cname:
            return cname
        info = self.returned(node.func)
        if info is not None and info.returns_class in self.s.classes:
            return info.returns_class
        return None

    def tuple_kinds(self, node: ast.Call, n: int) -> list[str | None]:
        """Kinds of the elements of a call's returned tuple (``a, b, valid = f(...)``)."""
        func = node.func
        last = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        tpath = self.torch_path(func)
        on_tensor = isinstance(func, ast.Attribute) and self.kind(func.value) in TENSORISH
        if (tpath and last in _TUPLE_TENSOR_METHODS) or (on_tensor and last in _TUPLE_TENSOR_METHODS):
            if last in _VALUES_INDICES_METHODS and n == 2:
                value = (
                    self.kind(func.value) if on_tensor else (self.kind(node.args[0]) if node.args else TENSOR)
                )
                return [value if value in TENSORISH else TENSOR, INT]
            return [TENSOR] * n
        if tpath is not None and self.call_kind(node) in TENSORISH:
            return [TENSOR] * n
        info = self.returned(func)
        if info is not None and info.returns_tuple is not None:
            kinds = list(info.returns_tuple[:n])
            return kinds + [None] * (n - len(kinds))
        if info is not None and info.returns in TENSORISH:
            return [TENSOR] * n
        return [None] * n


class _FunctionVisitor:
    """Walks one function body in source order, keeping the kinds of local names."""

    def __init__(
        self,
        scanner: _Scanner,
        f: _FileInfo,
        function: str,
        class_name: str | None,
        env: dict[str, str],
        module_level: bool = False,
    ) -> None:
        self.s = scanner
        self.f = f
        self.function = function
        self.class_name = class_name
        self.env = env
        self.module_level = module_level
        self.cls = _ExprClassifier(scanner, f, env, class_name)
        self.declared: list[str] = []
        self.hostcopy: set[str] = set()
        #: names typed only by an annotation that says Tensor without a dtype (parameters, elements of
        #: an annotated return): used as an index, such a tensor may be a boolean mask
        self.annotated: set[str] = set()

    # -- statements --------------------------------------------------------------------------------
    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:  # noqa: C901 - one dispatch table
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if isinstance(node, ast.ClassDef) and self.module_level:
                for sub in node.body:
                    if not isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        self.stmt(sub)
            for deco in getattr(node, "decorator_list", []):
                self.expr(deco)
            return
        if isinstance(node, ast.Assign):
            self.expr(node.value)
            for target in node.targets:
                self.store(target)
                self.bind(target, node.value)
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.expr(node.value)
                self.bind(node.target, node.value)
            ann = _annotation_kind(node.annotation)
            if ann and isinstance(node.target, ast.Name):
                self.env[node.target.id] = ann
                (self.annotated.add if ann == TENSOR else self.annotated.discard)(node.target.id)
            self.store(node.target)
            return
        if isinstance(node, ast.AugAssign):
            self.expr(node.value)
            self.store(node.target)
            if isinstance(node.target, ast.Subscript):
                self.expr(node.target.value)
            return
        if isinstance(node, (ast.If, ast.While)):
            self.condition(node.test)
            self.expr(node.test)
            self.run(node.body)
            self.run(node.orelse)
            return
        if isinstance(node, ast.Assert):
            self.condition(node.test)
            self.expr(node.test)
            if node.msg is not None:
                self.expr(node.msg)
            return
        if isinstance(node, (ast.For, ast.AsyncFor)):
            self.expr(node.iter)
            self.bind_iter(node.target, node.iter)
            self.run(node.body)
            self.run(node.orelse)
            return
        if isinstance(node, (ast.With, ast.AsyncWith)):
            pushed = 0
            for item in node.items:
                self.expr(item.context_expr)
                reason = self.declaration(item.context_expr)
                if reason is not None:
                    self.declared.append(reason)
                    pushed += 1
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, None)
            self.run(node.body)
            for _ in range(pushed):
                self.declared.pop()
            return
        if isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            self.run(node.body)
            for handler in node.handlers:
                self.run(handler.body)
            self.run(node.orelse)
            self.run(node.finalbody)
            return
        if isinstance(node, ast.Match):
            self.expr(node.subject)
            for case in node.cases:
                if case.guard is not None:
                    self.condition(case.guard)
                    self.expr(case.guard)
                self.run(case.body)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child)

    def declaration(self, node: ast.AST) -> str | None:
        if not isinstance(node, ast.Call):
            return None
        name = _dotted(node.func) or ""
        if name.split(".")[-1] != "allowed_host_transfer":
            return None
        arg = node.args[0] if node.args else _kw(node, "reason")
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        return ast.unparse(arg) if arg is not None else ""

    # -- bindings ----------------------------------------------------------------------------------
    def _contains_hop(self, node: ast.AST) -> bool:
        """Does this expression carry data hopped to the host (an explicit hop, or a name holding one)?

        Calls of our own or third-party functions are opaque (their result may be back on the
        device); methods on host data, torch/numpy functions and builtins pass data through.
        """
        if isinstance(node, ast.Name):
            return node.id in self.hostcopy
        if isinstance(node, ast.Lambda):
            return False
        if isinstance(node, ast.Call):
            if self.hop_category(node) is not None:
                return True
            func = node.func
            if isinstance(func, ast.Attribute) and not self.is_module_ref(func.value):
                if self._contains_hop(func.value):
                    return True
            passthrough = (
                self.cls.torch_path(func) is not None
                or self.cls.numpy_path(func) is not None
                or (isinstance(func, ast.Name) and func.id in _PASSTHROUGH_BUILTINS)
            )
            if not passthrough:
                return False
            return any(self._contains_hop(a) for a in [*node.args, *(kw.value for kw in node.keywords)])
        return any(self._contains_hop(child) for child in ast.iter_child_nodes(node))

    def bind(self, target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Name):
            # judge the value with the kinds from before this assignment
            hop = value is not None and self._contains_hop(value) and not self.is_upload(value)
            kind = self.cls.kind(value) if value is not None else None
            if kind is None and isinstance(value, ast.Call):
                cname = self.cls.call_class(value)
                if cname:
                    kind = "obj:" + cname
            if kind is None:
                self.env.pop(target.id, None)
            else:
                self.env[target.id] = kind
            self.annotated.discard(target.id)
            if hop:
                self.hostcopy.add(target.id)
            else:
                self.hostcopy.discard(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts, strict=True):
                    self.bind(t, v)
                return
            kinds = (
                self.cls.tuple_kinds(value, len(target.elts))
                if isinstance(value, ast.Call)
                else [None] * len(target.elts)
            )
            hop = value is not None and self._contains_hop(value)
            info = self.cls.returned(value.func) if isinstance(value, ast.Call) else None
            from_annotation = info is not None and info.returns_tuple is not None
            for elt, kind in zip(target.elts, kinds, strict=True):
                inner = elt.value if isinstance(elt, ast.Starred) else elt
                if isinstance(inner, ast.Name):
                    if kind:
                        self.env[inner.id] = kind
                    else:
                        self.env.pop(inner.id, None)
                    if from_annotation and kind == TENSOR:
                        self.annotated.add(inner.id)
                    else:
                        self.annotated.discard(inner.id)
                    (self.hostcopy.add if hop else self.hostcopy.discard)(inner.id)
                else:
                    self.bind(inner, None)

    def bind_iter(self, target: ast.AST, iterable: ast.AST) -> None:
        kind = self.cls.kind(iterable)
        names = [n for n in ast.walk(target) if isinstance(n, ast.Name)]
        for n in names:
            self.annotated.discard(n.id)
            if kind in TENSORISH and isinstance(target, ast.Name):
                self.env[n.id] = kind
            elif kind == HOST:
                self.env[n.id] = HOST
            else:
                self.env.pop(n.id, None)
            if self._contains_hop(iterable):
                self.hostcopy.add(n.id)
            else:
                self.hostcopy.discard(n.id)

    def store(self, target: ast.AST) -> None:
        """Writes: ``t[mask] = v`` is a boolean-mask write (may sync); visit sub-expressions."""
        if isinstance(target, ast.Subscript):
            self.subscript(target)
            self.expr(target.slice)
        elif isinstance(target, ast.Attribute):
            self.expr(target.value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.store(elt)
        elif isinstance(target, ast.Starred):
            self.store(target.value)

    # -- expressions -------------------------------------------------------------------------------
    def report(self, node: ast.AST, category: str) -> None:
        declared = self.declared[-1] if self.declared and category != "detach" else None
        self.s.add(self.f, node, self.function, category, declared)

    def is_module_ref(self, node: ast.AST) -> bool:
        """``np`` in ``np.unique(x)``, ``torch.cuda``: an imported module or symbol, not a value."""
        dotted = _dotted(node)
        return (
            bool(dotted) and dotted.split(".")[0] in self.f.aliases and dotted.split(".")[0] not in self.env
        )

    def is_tensorish(self, node: ast.AST) -> bool:
        return self.cls.kind(node) in TENSORISH

    def condition(self, test: ast.AST) -> None:
        """Report each tensor-valued operand whose truth value is taken."""
        if isinstance(test, ast.BoolOp):
            for value in test.values:
                self.condition(value)
        elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            self.condition(test.operand)
        elif isinstance(test, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in test.ops):
            if any(self.is_tensorish(c) for c in test.comparators):
                self.report(test, "tensor_condition")
        elif self.is_tensorish(test):
            self.report(test, "tensor_condition")

    def hop_category(self, call: ast.Call) -> str | None:
        func = call.func
        if isinstance(func, ast.Attribute):
            method = func.attr
            recv_kind = self.cls.kind(func.value)
            if not self.is_module_ref(func.value) and recv_kind != HOST:
                if method in ("cpu", "numpy", "item", "tolist"):
                    return method
                if method == "to" and self.cls.to_target_is_cpu(call):
                    return "to_cpu"
        npath = self.cls.numpy_path(func)
        if npath and npath[-1] in ("asarray", "array", "asanyarray", "ascontiguousarray") and call.args:
            arg = call.args[0]
            if self.is_tensorish(arg):
                if isinstance(arg, ast.Call) and self.hop_category(arg) is not None:
                    return None
                return "np_array"
        return None

    def is_upload(self, node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cuda":
            return True
        if isinstance(func, ast.Attribute) and func.attr == "to" and self.cls.to_is_upload(node):
            return True
        tpath = self.cls.torch_path(func)
        if tpath and tpath[-1] in ("tensor", "as_tensor", "from_numpy", "asarray"):
            dev = _kw(node, "device")
            return dev is not None and self.cls.is_device_like(dev)
        return False

    def round_trip(self, call: ast.Call) -> None:
        if not self.is_upload(call):
            return
        func = call.func
        payload: ast.AST | None
        if isinstance(func, ast.Attribute) and func.attr in ("cuda", "to"):
            payload = func.value
        else:
            payload = call.args[0] if call.args else None
        if payload is not None and self._contains_hop(payload):
            self.report(call, "round_trip")

    def subscript(self, node: ast.Subscript) -> None:
        if self.cls.kind(node.value) == HOST:
            return
        index = node.slice
        parts = index.elts if isinstance(index, ast.Tuple) else [index]
        # a boolean mask, or a tensor typed only by an annotation without a dtype (a ``valid: Tensor``
        # parameter may well be a mask); integer index tensors are known as such (INT)
        if any(
            self.cls.kind(p) == BOOL
            or (isinstance(p, ast.Name) and p.id in self.annotated and self.cls.kind(p) == TENSOR)
            for p in parts
        ):
            self.report(node, "bool_mask_index")

    def format_args(self, args: Iterable[ast.AST]) -> None:
        for arg in args:
            inner = arg.value if isinstance(arg, ast.Starred) else arg
            if self.is_tensorish(inner):
                self.report(inner, "format_tensor")

    def call(self, node: ast.Call) -> None:  # noqa: C901 - one dispatch table
        func = node.func
        hop = self.hop_category(node)
        if hop is not None:
            self.report(node, hop)
        self.round_trip(node)
        tpath = self.cls.torch_path(func)
        method = func.attr if isinstance(func, ast.Attribute) else None
        recv_kind = self.cls.kind(func.value) if isinstance(func, ast.Attribute) else None
        is_method = (
            method is not None and tpath is None and recv_kind != HOST and not self.is_module_ref(func.value)
        )
        last = tpath[-1] if tpath else None
        if method == "detach" and is_method:
            self.report(node, "detach")
        if isinstance(func, ast.Name):
            if func.id in ("bool", "int", "float", "complex", "range") and any(
                self.is_tensorish(a) for a in node.args
            ):
                self.report(node, "scalar_cast")
            if func.id in ("print", "str", "repr", "format", "ascii"):
                self.format_args(node.args if func.id != "format" else node.args[:1])
        if (_dotted(func) or "") in ("operator.index",) and node.args and self.is_tensorish(node.args[0]):
            self.report(node, "scalar_cast")
        if last in ("equal", "allclose", "is_nonzero") or (
            method in ("equal", "allclose", "is_nonzero") and recv_kind in TENSORISH
        ):
            self.report(node, "scalar_cast")
        if last in ("nonzero", "argwhere") or (is_method and method in ("nonzero", "argwhere")):
            self.report(node, "nonzero")
        if last == "where" and len(node.args) == 1 and not node.keywords:
            self.report(node, "nonzero")
        if last == "masked_select" or (is_method and method == "masked_select"):
            self.report(node, "masked_select")
        if last in ("unique", "unique_consecutive") or (
            is_method and method in ("unique", "unique_consecutive")
        ):
            self.report(node, "unique")
        if last == "repeat_interleave" or (is_method and method == "repeat_interleave"):
            # torch.repeat_interleave(input, repeats) | torch.repeat_interleave(repeats) | t.repeat_interleave(repeats)
            positional = node.args[1:2] if last and len(node.args) > 1 else node.args[:1]
            repeats = _kw(node, "repeats") or (positional[0] if positional else None)
            one_arg_form = bool(last) and len(node.args) == 1 and _kw(node, "repeats") is None
            if _kw(node, "output_size") is None and (
                one_arg_form or (repeats is not None and self.is_tensorish(repeats))
            ):
                self.report(node, "repeat_interleave")
        if isinstance(func, ast.Attribute):
            if (
                method == "format"
                and isinstance(func.value, ast.Constant)
                and isinstance(func.value.value, str)
            ):
                self.format_args([*node.args, *(kw.value for kw in node.keywords)])
            elif method in _LOG_METHODS and tpath is None:
                owner = (_dotted(func.value) or "").lower()
                if "log" in owner:
                    self.format_args(node.args[1:] if method != "log" else node.args[2:])

    def expr(self, node: ast.AST) -> None:
        """Visit an expression tree (not into lambdas' own scope rules, which share ours)."""
        if isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            self.subscript(node)
        elif isinstance(node, ast.JoinedStr):
            for value in node.values:
                if isinstance(value, ast.FormattedValue) and self.is_tensorish(value.value):
                    self.report(value.value, "format_tensor")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                right = node.right.elts if isinstance(node.right, ast.Tuple) else [node.right]
                self.format_args(right)
        elif isinstance(node, ast.IfExp):
            self.condition(node.test)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for gen in node.generators:
                self.expr(gen.iter)
                self.bind_iter(gen.target, gen.iter)
                for cond in gen.ifs:
                    self.condition(cond)
            if isinstance(node, ast.DictComp):
                self.expr(node.key)
                self.expr(node.value)
            else:
                self.expr(node.elt)
            for gen in node.generators:
                for cond in gen.ifs:
                    self.expr(cond)
            return
        elif isinstance(node, ast.Lambda):
            self.expr(node.body)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child)
            elif isinstance(child, ast.keyword):  # f(x=t.cpu()): not an ast.expr node itself
                self.expr(child.value)
        if isinstance(node, ast.Call) and not self.module_level:
            for target in self.s.resolve_call(self.f, node.func, self.class_name, self.env):
                self.s.edges[(self.f.rel, self.function)].add(target)


# ---------------------------------------------------------------------------------------------------
# public entry point


def discover(paths: Sequence[str | Path]) -> list[Path]:
    """Every ``.py`` file under the given files/folders (skipping venvs, caches, build output)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            for file in sorted(path.rglob("*.py")):
                rel_parts = file.relative_to(path).parts
                if any(part in SKIP_DIRS or part.startswith(".") for part in rel_parts[:-1]):
                    continue
                out.append(file)
        else:
            raise FileNotFoundError(f"audit: no such file or folder: {path}")
    seen: set[Path] = set()
    unique: list[Path] = []
    for p in out:
        rp = p.resolve()
        if rp not in seen:
            seen.add(rp)
            unique.append(p)
    return unique


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _match(pattern: str, key: str) -> bool:
    if fnmatch.fnmatchcase(key, pattern):
        return True
    return not pattern.startswith(("*", "/")) and fnmatch.fnmatchcase(key, "*/" + pattern)


def scan_paths(
    paths: Sequence[str | Path],
    *,
    root: str | Path | None = None,
    entries: Sequence[str] = DEFAULT_ENTRIES,
    hot_path: Sequence[str] = (),
    not_hot: Sequence[str] = DEFAULT_NOT_HOT,
) -> StaticAuditResult:
    """Scan ``.py`` files under ``paths``; return findings with severities.

    ``root``: what reported file names are relative to (default: the current directory when every
    path lies under it, else the common parent). ``entries``: ``file:function`` of the per-frame
    entry points (file matched as a path suffix). ``hot_path``: extra globs on ``file:function``
    whose functions (and what they call) are hot too. ``not_hot``: globs the hot path does not enter.
    """
    files = discover(paths)
    if root is None:
        cwd = Path.cwd().resolve()
        resolved = [Path(p).resolve() for p in paths]
        if all(cwd == r or cwd in r.parents for r in resolved):
            root_path = cwd
        else:
            bases = [r if r.is_dir() else r.parent for r in resolved]
            common = Path(*Path(bases[0]).parts)
            for b in bases[1:]:
                while common != b and common not in b.parents:
                    common = common.parent
            root_path = common
    else:
        root_path = Path(root)
    infos: list[_FileInfo] = []
    errors: list[str] = []
    for file in files:
        rel = _rel(file, root_path)
        try:
            source = file.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(file))
        except (SyntaxError, UnicodeDecodeError, OSError) as exc:
            errors.append(f"{rel}: {type(exc).__name__}: {exc}")
            continue
        info = _FileInfo(file, rel, _module_name(rel), tree, source.splitlines(), _is_minor_path(rel))
        _collect_imports(info)
        _collect_defs(info)
        infos.append(info)
    scanner = _Scanner(infos)
    scanner.scan()

    # hot path: reachability from the entries and --hot-path globs, not entering not-hot functions
    all_funcs = [(f.rel, q) for f in infos for q in f.functions]
    roots: set[tuple[str, str]] = set()
    unresolved: list[str] = []
    for entry in entries:
        file_part, _, func_part = entry.rpartition(":")
        hits = [
            (rel, q)
            for rel, q in all_funcs
            if (rel == file_part or rel.endswith("/" + file_part)) and fnmatch.fnmatchcase(q, func_part)
        ]
        if not hits:
            unresolved.append(entry)
        roots.update(hits)
    for pattern in hot_path:
        roots.update((rel, q) for rel, q in all_funcs if _match(pattern, f"{rel}:{q}"))

    def cold(key: tuple[str, str]) -> bool:
        return any(_match(p, f"{key[0]}:{key[1]}") for p in not_hot)

    unmatched_not_hot = [p for p in not_hot if not any(_match(p, f"{rel}:{q}") for rel, q in all_funcs)]

    hot: set[tuple[str, str]] = set()
    todo = [r for r in roots if not cold(r)]
    while todo:
        key = todo.pop()
        if key in hot:
            continue
        hot.add(key)
        todo.extend(t for t in scanner.edges.get(key, ()) if t not in hot and not cold(t))

    minor_files = {f.rel for f in infos if f.minor}
    findings: list[Finding] = []
    for fd in scanner.findings:
        is_hot = (fd.file, fd.function) in hot
        if fd.category == "detach":
            severity = "info"
        elif fd.declared:
            severity = "declared"
        elif fd.file in minor_files:
            severity = "minor"
        elif is_hot:
            severity = "critical"
        else:
            severity = "medium"
        findings.append(
            Finding(
                fd.file,
                fd.line,
                fd.col,
                fd.function,
                fd.category,
                severity,
                fd.code,
                is_hot,
                fd.declared,
                fd.declared_reason,
            )
        )
    findings.sort(key=lambda x: (x.file, x.line, x.col, x.category))
    return StaticAuditResult(
        paths=[str(p) for p in paths],
        files_scanned=len(infos),
        entries=list(entries),
        hot_patterns=list(hot_path),
        not_hot_patterns=list(not_hot),
        hot_functions=sorted(f"{rel}:{q}" for rel, q in hot),
        findings=findings,
        parse_errors=errors,
        unresolved_entries=unresolved,
        unmatched_not_hot=unmatched_not_hot,
    )
