"""The real Slicer module (UltramotionIGT/UltramotionIGT.py) on 3D Slicer's own Python layer.

Slicer's ``parameterNodeWrapper``, ``ScriptedLoadableModule``, ``util``, ``i18n`` and ``testing``
(v5.10.0, unmodified, from ../shared/slicer-python) run over slicer-core's MRML; only the Qt/CTK
names they touch are stubbed (Testing/slicer_layer.py says which and why). Here:

- the parameter node is created with its defaults, every field is written and read back, and a
  scene holding it is saved to a .mrml file and loaded again (a run state saved while running does
  not come back as "running");
- every ``SlicerParameterName`` of the .ui names a field whose type Slicer's GUI connectors can show
  in that widget class, and the binding works both ways;
- while running, the widgets of settings read only at start are disabled, the others are not;
- the module's self-test methods (``UltramotionIGTTest``) run through Slicer's
  ``ScriptedLoadableModuleTest`` with the real logic (the torch-free ones on every machine).
"""

from __future__ import annotations

import ast
import enum
import types
import unittest
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")

from slicer_layer import MODULE_FILE, UI_FILE, SlicerLayer, layer_dir, load_ui  # noqa: E402

SELF_TEST_METHODS = [
    f.name
    for cls in ast.parse(MODULE_FILE.read_text(encoding="utf-8")).body
    if isinstance(cls, ast.ClassDef) and cls.name == "UltramotionIGTTest"
    for f in cls.body
    if isinstance(f, ast.FunctionDef) and f.name.startswith("test")
]


@pytest.fixture(scope="module")
def layer():
    path = layer_dir()
    if path is None:
        pytest.skip(
            "3D Slicer's Python layer not found: set ULTRAMOTION_SLICER_PYTHON or provide "
            "../shared/slicer-python/v5.10.0 (see its README)"
        )
    installed = SlicerLayer(path).install()
    yield installed
    installed.uninstall()


@pytest.fixture()
def module(layer):
    layer.scene.Clear(1)  # also the singletons: the parameter node starts anew in each test
    return layer.module


def bound_parameters() -> dict[str, str]:
    """``SlicerParameterName`` -> widget class, from the .ui file."""
    import xml.etree.ElementTree as ET

    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    return bound


# -- the parameter node -----------------------------------------------------------------------------


def test_parameter_node_is_created_with_its_defaults(module, layer):
    logic = module.UltramotionIGTLogic()
    node = logic.getParameterNode()
    raw = layer.scene.GetSingletonNode("UltramotionIGT", "vtkMRMLScriptedModuleNode")
    assert raw is node.parameterNode
    assert raw.GetAttribute("ModuleName") == "UltramotionIGT"
    detector, sam = logic.demoModelPaths()
    for name in module.UltramotionIGTParameterNode.allParameters:
        expected = node.default(name).value
        if name == "detectorFolder" and detector is not None:
            expected = detector  # empty model paths point at the shipped demo models
        if name == "samCheckpoint" and sam is not None:
            expected = sam
        assert node.getValue(name) == expected, name
    assert node.inputVolume is None and node.outputSegmentation is None
    assert logic.getParameterNode().parameterNode is raw, "one parameter node per scene"


def values_to_write(module, scene) -> dict[str, list]:
    """For every field, values other than its default (nodes, None, each enum member, bounds...)."""
    scalar = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "US image")
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "US image RGB")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "US segmentation")
    node_class = module.UltramotionIGTParameterNode
    values = {
        "inputVolume": [vector, scalar, None],
        "outputSegmentation": [segmentation, None],
        "detectorFolder": [Path("/data/models/dfine"), Path()],
        "samCheckpoint": [Path("/data/models/sam_vit_b_01ec64.pth")],
        "scoreThreshold": [0.0, 1.0, 0.55],
        "maxTargets": [1, 16, 7],
        "everyNth": [1, 100, 5],
        "gatewayHost": ["gpu-box.example.org", "127.0.0.1"],
        "gatewayPort": [1, 65535, 18946],
        "statusMessage": ["Processing frame 12", ""],
    }
    for name, info in node_class.allParameters.items():
        kind = info.unalteredType
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            values[name] = list(kind)
        elif kind is bool:
            values[name] = [True, False]
    return values


def test_every_field_is_written_and_read_back(module, layer):
    node = module.UltramotionIGTLogic().getParameterNode()
    values = values_to_write(module, layer.scene)
    assert set(values) == set(module.UltramotionIGTParameterNode.allParameters)
    for name, candidates in values.items():
        for value in candidates:
            node.setValue(name, value)
            got = node.getValue(name)
            assert got is value if value is None or hasattr(value, "GetID") else got == value, (name, value)
            # read through a fresh wrapper too: the value is in the MRML node, not only in a cache
            fresh = module.UltramotionIGTParameterNode(node.parameterNode).getValue(name)
            assert fresh is value if value is None or hasattr(value, "GetID") else fresh == value, name
    with pytest.raises(ValueError):
        node.scoreThreshold = 1.5  # WithinRange(0, 1)
    with pytest.raises(TypeError):
        node.outputSegmentation = layer.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")


def test_a_scene_holding_the_parameter_node_saves_and_loads(module, layer, tmp_path):
    scene = layer.scene
    logic = module.UltramotionIGTLogic()
    node = logic.getParameterNode()
    values = {name: candidates[0] for name, candidates in values_to_write(module, scene).items()}
    values["runState"] = module.RunState.RUNNING  # as when the scene is saved while processing runs
    values["statusMessage"] = "Processing frame 12"
    for name, value in values.items():
        node.setValue(name, value)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    assert "UltramotionIGT" in (tmp_path / "scene.mrml").read_text(encoding="utf-8")

    for merge in (False, True):  # into an empty scene, and over the scene's own parameter node
        if not merge:
            scene.Clear(1)
            assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 0
        else:
            logic.getParameterNode()
        scene.SetURL(str(tmp_path / "scene.mrml"))
        assert scene.Import()
        loaded = module.UltramotionIGTParameterNode(
            scene.GetSingletonNode("UltramotionIGT", "vtkMRMLScriptedModuleNode")
        )
        for name, value in values.items():
            got = loaded.getValue(name)
            if hasattr(value, "GetID"):  # a node: the reference resolves to the loaded node
                assert (got.GetClassName(), got.GetName()) == (value.GetClassName(), value.GetName()), name
            else:
                assert got == value, name
        # nothing runs in this session: the logic resets the stale run state (the widget asks on
        # the scene's EndImportEvent and on enter)
        reloaded = logic.getParameterNode()
        assert reloaded.runState == module.RunState.IDLE
        assert reloaded.statusMessage == ""
        assert reloaded.inputVolume.GetName() == values["inputVolume"].GetName()


# -- the .ui and the GUI connectors -----------------------------------------------------------------


def test_every_bound_widget_has_a_slicer_gui_connector_for_its_field(module, layer):
    from slicer.parameterNodeWrapper import createGuiConnector

    node_class = module.UltramotionIGTParameterNode
    bound = bound_parameters()
    assert bound, "the .ui binds widgets to parameters"
    assert set(bound) <= set(node_class.allParameters), set(bound) - set(node_class.allParameters)
    widgets = {w.property("SlicerParameterName"): w for w in _all_widgets(load_ui())}
    for name, widget_class in bound.items():
        widget = widgets[name]
        assert type(widget).__name__ == widget_class
        connector = createGuiConnector(widget, node_class.dataType(name))  # raises if none fits
        assert connector.widget() is widget
    # the node selector lists exactly the node types the parameter accepts (set by the connector)
    ui_node_types = {
        w.property("SlicerParameterName"): tuple(w.property("nodeTypes"))
        for w in _all_widgets(load_ui())
        if w.property("nodeTypes")
    }
    for name, node_types in ui_node_types.items():
        widget = widgets[name]
        createGuiConnector(widget, node_class.dataType(name))
        assert tuple(widget.nodeTypes) == node_types, name


def _all_widgets(root):
    stack = [root]
    while stack:
        widget = stack.pop()
        yield widget
        stack.extend(widget.children())


def test_the_gui_binding_works_both_ways(module, layer):
    import slicer

    node = module.UltramotionIGTLogic().getParameterNode()
    ui = slicer.util.childWidgetVariables(load_ui())
    tag = node.connectGui(ui)
    try:
        # parameter node -> widgets
        volume = layer.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "US image RGB")
        node.inputVolume = volume
        assert ui.inputSelector.currentNode() is volume
        node.maxTargets = 7
        assert ui.maxTargetsSpinBox.value == 7
        node.scoreThreshold = 0.55
        assert ui.scoreThresholdSliderWidget.value == pytest.approx(0.55)
        node.device = module.Device.CPU
        assert ui.deviceComboBox.currentText == module.Device.CPU.label()
        assert ui.samTypeComboBox.count == len(module.SamType)
        node.statusMessage = "hello"
        assert ui.statusLabel.text == "hello"
        node.detectorFolder = Path("/data/dfine")
        assert Path(ui.detectorPathLineEdit.currentPath) == Path("/data/dfine")
        # widgets -> parameter node
        ui.everyNthSpinBox.value = 5
        assert node.everyNth == 5
        ui.modeComboBox.currentIndex = list(module.Mode).index(module.Mode.REPLAY)
        assert node.mode == module.Mode.REPLAY
        ui.cornerAnnotationCheckBox.checked = False
        assert node.showCornerAnnotation is False
        ui.inputSelector.setCurrentNode(None)
        assert node.inputVolume is None
        ui.samPathLineEdit.currentPath = "/data/sam.pth"
        assert node.samCheckpoint == Path("/data/sam.pth")
    finally:
        node.disconnectGui(tag)


def test_settings_read_at_start_are_disabled_while_running(module):
    import slicer

    node = module.UltramotionIGTLogic().getParameterNode()
    ui = slicer.util.childWidgetVariables(load_ui())
    widget = types.SimpleNamespace(ui=ui, _parameterNode=node)
    bound = {
        w.property("SlicerParameterName"): w for w in vars(ui).values() if w.property("SlicerParameterName")
    }
    live = module.PARAMETERS_APPLIED_WHILE_RUNNING | module.PARAMETERS_REPORTED_BY_THE_LOGIC
    assert module.PARAMETERS_READ_AT_START == set(module.UltramotionIGTParameterNode.allParameters) - live
    assert {"inputVolume", "mode", "detectorFolder", "scoreThreshold", "dropPolicy"} <= set(bound) - live
    node.inputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    for state, running in ((module.RunState.RUNNING, True), (module.RunState.STOPPED, False)):
        node.runState = state
        module.UltramotionIGTWidget._updateButtons(widget)
        disabled = {name for name, w in bound.items() if not w.enabled}
        assert disabled == (set(bound) - live if running else set()), state
        assert ui.startStopButton.enabled
        assert ui.startStopButton.text == ("Stop" if running else "Start")
        assert ui.applyButton.enabled is not running


# -- the self-test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SELF_TEST_METHODS)
def test_module_self_test(module, layer, method):
    """``UltramotionIGTTest.<method>`` as Slicer's ctest runs it (unittest, setUp before the method)."""
    events = layer.app.events_processed
    result = unittest.TestResult()
    module.UltramotionIGTTest(method).run(result)
    problems = [text for _case, text in result.errors + result.failures]
    assert not problems, "\n".join(problems)
    if result.skipped:
        pytest.skip(result.skipped[0][1])
    assert result.testsRun == 1
    assert layer.app.events_processed > events, "delayDisplay went through Slicer's testing layer"


def test_torch_free_self_test_methods_exist():
    """A machine without PyTorch still runs part of the self-test (the rest skips itself)."""
    assert {"test_ParameterNode", "test_DependencyCheck"} <= set(SELF_TEST_METHODS)
    assert "test_LiveSyntheticStream" in SELF_TEST_METHODS


def test_module_metadata_and_self_test_registration(module, layer):
    import slicer

    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    instance = module.UltramotionIGT(parent)
    assert parent.title == "Ultramotion IGT"
    assert parent.categories == ["Ultrasound"]
    assert all(" (" in c and c.endswith(")") for c in parent.contributors), "Name (Affiliation)"
    assert "Check environment" in parent.helpText
    assert parent.icon.path == str(MODULE_FILE.parent / "Resources" / "Icons" / "UltramotionIGT.png")
    assert slicer.selfTests["UltramotionIGT"] == instance.runTest


def test_an_older_slicer_is_told_the_minimum_version(module, layer):
    layer.app.minorVersion = 8
    try:
        problem = module.slicerVersionProblem()
        assert "5.10" in problem and "5.8" in problem
        parent = types.SimpleNamespace(path=str(MODULE_FILE))
        module.UltramotionIGT(parent)
        assert parent.helpText.startswith(f"<p><b>{problem}</b></p>")
        with pytest.raises(RuntimeError, match="5.10"):
            module.DependencyInstaller().check()
    finally:
        layer.app.minorVersion = 10
    assert module.slicerVersionProblem() == ""
