"""The Slicer module file, read as source (Slicer itself is not needed).

- It compiles, and imports no torch or library code at module scope (Slicer starts fast and the
  module loads before PyTorch is installed; the logic imports them after a dependency check).
- It has the template's five parts and a typed parameter node.
- The logic never opens a dialog or touches the widget.
- The .ui file is valid Qt Designer XML and agrees with the code: every ``SlicerParameterName``
  names a parameter, every ``self.ui.<name>`` the code uses exists in the .ui.
- Every library name the module imports (lazily) exists in the library.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "UltramotionIGT" / "UltramotionIGT.py"
UI = REPO / "UltramotionIGT" / "Resources" / "UI" / "UltramotionIGT.ui"
HEAVY = (
    "torch",
    "torchvision",
    "UltramotionIGTLib",
    "transformers",
    "segment_anything",
    "scipy",
    "safetensors",
    "nrrd",
)
DIALOGS = {
    "confirmOkCancelDisplay",
    "confirmYesNoDisplay",
    "confirmRetryCloseDisplay",
    "errorDisplay",
    "infoDisplay",
    "warningDisplay",
    "messageBox",
    "delayDisplay",
    "tryWithErrorDisplay",
}


@pytest.fixture(scope="module")
def source() -> str:
    return MODULE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(source) -> ast.Module:
    return ast.parse(source, filename=str(MODULE))


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def module_scope_nodes(tree: ast.Module):
    """Every node executed at import time: module body and class bodies, not function bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # decorators and default values run at import time, the body does not
            stack.extend(node.decorator_list)
            stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            return [str(node.args[0].value)]
    return []


def test_module_compiles(source):
    compile(source, str(MODULE), "exec")


def test_module_imports_on_python_3_9(source, tree):
    """Slicer < 5.10 runs Python 3.9: the file must import there, to show the minimum-version message.

    Python 3.9 grammar; no PEP 604 ``X | Y`` in annotations (evaluated when a function or the
    parameter node class is defined: TypeError on 3.9); no ``zip(strict=)`` (3.10).
    """
    ast.parse(source, feature_version=(3, 9))
    problems = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        for annotation in annotations:
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                problems.append(f"line {annotation.lineno}: {ast.unparse(annotation)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "zip":
            if any(k.arg == "strict" for k in node.keywords):
                problems.append(f"line {node.lineno}: zip(strict=)")
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            problems.append(f"line {node.lineno}: from __future__ (the parameter node's hints are evaluated)")
    assert not problems, "not Python 3.9: " + ", ".join(problems)
    assert "MINIMUM_SLICER_VERSION = (5, 10)" in source


def test_no_heavy_import_at_module_scope(tree):
    offenders = []
    for node in module_scope_nodes(tree):
        for name in imported_modules(node):
            if name.split(".")[0] in HEAVY:
                offenders.append(f"line {node.lineno}: {name}")
    assert not offenders, "imported at module scope (move into a logic method): " + ", ".join(offenders)


def test_the_scan_sees_module_scope_imports():
    """The scan above is not vacuous: it finds imports hidden in try/if/class bodies."""
    sample = ast.parse(
        "try:\n import torch\nexcept ImportError:\n pass\n"
        "class A:\n from UltramotionIGTLib.tools import doctor\n"
        "def f():\n import scipy\n"
        "import importlib\nx = importlib.import_module('transformers')\n"
    )
    found = sorted(n for node in module_scope_nodes(sample) for n in imported_modules(node))
    assert found == ["UltramotionIGTLib.tools", "importlib", "torch", "transformers"]


def test_heavy_modules_are_imported_lazily_somewhere(tree):
    """The logic does use the library (inside functions), so the scan is about *where*, not *whether*."""
    inside = {n.split(".")[0] for node in ast.walk(tree) for n in imported_modules(node)}
    assert "UltramotionIGTLib" in inside


def test_template_parts(tree):
    found = classes(tree)
    bases = {name: [ast.unparse(b) for b in cls.bases] for name, cls in found.items()}
    assert "ScriptedLoadableModule" in bases["UltramotionIGT"]
    assert "ScriptedLoadableModuleWidget" in bases["UltramotionIGTWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["UltramotionIGTLogic"]
    assert "ScriptedLoadableModuleTest" in bases["UltramotionIGTTest"]
    decorators = [ast.unparse(d) for d in found["UltramotionIGTParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    test_methods = [f.name for f in found["UltramotionIGTTest"].body if isinstance(f, ast.FunctionDef)]
    assert any(name.startswith("test_") for name in test_methods)
    module_init = next(
        f for f in found["UltramotionIGT"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__"
    )
    text = ast.unparse(module_init)
    for key in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{key}" in text


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    cls = classes(tree)["UltramotionIGTParameterNode"]
    return {
        stmt.target.id: ast.unparse(stmt.annotation)
        for stmt in cls.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    }


def enum_classes(tree: ast.Module) -> set[str]:
    return {
        name for name, cls in classes(tree).items() if any(ast.unparse(b) == "enum.Enum" for b in cls.bases)
    }


def test_parameter_node_is_typed(tree):
    fields = parameter_fields(tree)
    enums = enum_classes(tree)
    for name in (
        "inputVolume",
        "outputSegmentation",
        "detectorFolder",
        "samCheckpoint",
        "samType",
        "device",
        "scoreThreshold",
        "maxTargets",
        "mode",
        "dropPolicy",
        "runState",
    ):
        assert name in fields, f"parameter {name} missing"
    assert fields["scoreThreshold"] == "Annotated[float, WithinRange(0.0, 1.0)]"
    assert fields["maxTargets"].startswith("Annotated[int, WithinRange(")
    for name in ("samType", "device", "mode", "dropPolicy", "runState"):
        assert fields[name] in enums, f"{name} should be an Enum, is {fields[name]}"
    assert fields["detectorFolder"] == "Path" and fields["samCheckpoint"] == "Path"
    assert "vtkMRMLSegmentationNode" in fields["outputSegmentation"]
    # a Union of node types must admit None: the wrapper writes None as a node parameter's default
    for name, annotation in fields.items():
        if "Union[" in annotation or "|" in annotation:
            assert annotation.startswith("Optional[") or "None" in annotation, f"{name}: {annotation}"


@pytest.mark.parametrize("name", ["UltramotionIGTLogic", "DependencyInstaller"])
def test_logic_never_opens_dialogs_or_holds_the_widget(tree, name):
    problems = []
    for node in ast.walk(classes(tree)[name]):
        if isinstance(node, ast.Attribute) and node.attr in DIALOGS:
            problems.append(f"line {node.lineno}: {node.attr}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("ui", "widget")
            and ast.unparse(node.value) == "self"
        ):
            problems.append(f"line {node.lineno}: self.{node.attr}")
        if isinstance(node, ast.Name) and node.id == "qt":
            problems.append(f"line {node.lineno}: qt")
    assert not problems, f"{name} must stay GUI-free: " + ", ".join(problems)


def test_the_logic_only_maps_the_parameter_node(tree):
    """The logic stays thin (under 150 lines): installing dependencies is `DependencyInstaller`'s job,
    everything that decides anything is the library's `SessionController`."""
    logic = classes(tree)["UltramotionIGTLogic"]
    assert logic.end_lineno - logic.lineno + 1 < 150
    methods = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert not methods & {
        "install",
        "installDependencies",
        "unsatisfiedRequirements",
        "installPyTorchExtension",
    }
    assert "SessionController" in ast.unparse(logic)


def test_installs_go_through_the_pytorch_extension_and_slicer_packaging(source, tree):
    logic_src = ast.unparse(classes(tree)["DependencyInstaller"])
    assert "PyTorchUtils.PyTorchUtilsLogic()" in logic_src
    assert "installTorch(askConfirmation=False" in logic_src
    assert "pip_ensure(" in logic_src and "pip_install(" in logic_src
    assert "downloadAndInstallExtensionByName(" in logic_src, "a missing PyTorch extension is installed"
    # never pip-install torch itself: no torch requirement string here (they come from the library's
    # list, and the torch ones go to PyTorchUtils)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not re.match(r"torch(vision)?\s*[<>=!~]", node.value), node.value
    assert "PYTORCH_DISTRIBUTIONS" in logic_src
    widget_src = ast.unparse(classes(tree)["UltramotionIGTWidget"])
    assert "confirmOkCancelDisplay" in widget_src, "the widget asks before installing"
    install_error = classes(tree)["InstallError"]
    assert "restartRequired" in ast.unparse(install_error)


# -- the .ui file ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI).getroot()


def test_ui_is_designer_xml_with_slicer_widgets(ui_root):
    assert ui_root.tag == "ui" and ui_root.get("version") == "4.0"
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    used = {w.get("class") for w in ui_root.iter("widget")}
    declared = {c.findtext("class") for c in ui_root.iter("customwidget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"custom widgets used but not declared: {sorted(custom - declared)}"
    assert {"qMRMLNodeComboBox", "ctkPathLineEdit", "ctkCollapsibleButton", "qMRMLWidget"} <= used
    for c in ui_root.iter("customwidget"):
        assert c.findtext("header") == f"{c.findtext('class')}.h"
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    # node selectors get the scene from the top-level qMRMLWidget
    combos = {w.get("name") for w in ui_root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in ui_root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert combos <= connected


def test_ui_parameter_names_match_the_parameter_node(tree, ui_root):
    fields = parameter_fields(tree)
    bound = {}
    for widget in ui_root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
                bound[prop.findtext("string")] = widget.get("class")
    assert set(bound) <= set(fields), f"bound to unknown parameters: {sorted(set(bound) - set(fields))}"
    for name in (
        "inputVolume",
        "outputSegmentation",
        "detectorFolder",
        "samCheckpoint",
        "device",
        "scoreThreshold",
    ):
        assert name in bound, f"{name} is not bound to a widget"
    assert bound["detectorFolder"] == bound["samCheckpoint"] == "ctkPathLineEdit"
    assert bound["inputVolume"] == bound["outputSegmentation"] == "qMRMLNodeComboBox"
    enums = enum_classes(tree)
    for name, cls in bound.items():
        if fields[name] in enums:
            assert cls in ("QComboBox", "ctkComboBox"), f"enum {name} needs a combo box, has {cls}"


def test_widget_uses_only_widgets_that_exist_in_the_ui(tree, ui_root):
    names = {w.get("name") for w in ui_root.iter("widget")}
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("self.ui", "self.widget.ui", "ui")
    }
    assert used, "the widget uses the .ui"
    assert used <= names, f"self.ui.<name> not in the .ui: {sorted(used - names)}"
    for required in (
        "startStopButton",
        "applyButton",
        "checkEnvironmentButton",
        "kpiLabel",
        "statusLightLabel",
    ):
        assert required in used


def test_library_names_imported_by_the_module_exist(tree):
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("UltramotionIGTLib"):
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                missing.append(f"{node.module} ({exc})")
                continue
            for alias in node.names:
                if (
                    not hasattr(module, alias.name)
                    and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
                ):
                    missing.append(f"{node.module}.{alias.name}")
    assert not missing, f"the module imports names the library does not have: {missing}"
