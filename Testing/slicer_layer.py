"""3D Slicer's own Python layer over slicer-core, so that tests import and run the real scripted module.

Real 3D Slicer cannot run here, and slicer-core (PyPI) carries MRML and the module logics but not the
pure-Python layer a scripted module is built on. ``../shared/slicer-python/v5.10.0`` holds that layer,
unmodified, from the 3D Slicer repository (``Base/Python/slicer/``: ``parameterNodeWrapper/``,
``ScriptedLoadableModule.py``, ``i18n.py``, ``testing.py``, ``util.py``). `SlicerLayer.install` puts
those modules over the ``slicer`` package of slicer-core (``slicer.util`` replaces slicer-core's
copy) and imports ``UltramotionIGT/UltramotionIGT.py`` as Slicer does (module name
``UltramotionIGT``); `SlicerLayer.uninstall` puts everything back, so other tests see plain
slicer-core. The layer is located like the PLUS recordings: ``$ULTRAMOTION_SLICER_PYTHON``, else
``../shared/slicer-python/v5.10.0`` beside the repository; `layer_dir` is None when it is absent.

What the layer needs from Qt/CTK and the Slicer application does not exist outside Slicer. Only the
names that importing the layer and the module, or the code under test, touch are supplied:

- ``qt``, ``ctk``: modules holding one class per widget class name that
  ``parameterNodeWrapper/*.py`` mentions (``qt.QColor``, ``qt.QWidget``, ``qt.QComboBox``,
  ``ctk.ctkPathLineEdit``, ...; read from its source): the wrapper evaluates them at import
  (annotations of its functions; ``ObservedQColor`` subclasses ``qt.QColor``) and its GUI connectors
  compare ``type(widget)`` with them in ``canRepresent``. No other Qt name exists: the widget's
  Qt-bound code (``setup``, timers, dialogs) does not run here; ``_updateButtons``, which touches
  only the .ui's widgets, does.
- The classes of the widgets in the module's .ui file carry the state and signals that Slicer's GUI
  connectors use (``value``/``valueChanged``, ``currentIndex``/``currentIndexChanged``, ``checked``/
  ``stateChanged``, ``text``/``textChanged``, ``currentPath``/``currentPathChanged``,
  ``currentNode()``/``currentNodeChanged``,
  ``nodeTypes``, ``enabled``, ``text``, ``property(name)`` for dynamic properties, ``children()``
  and ``name`` for ``slicer.util.childWidgetVariables``). Setters emit their signal when the value
  changes, as Qt's do; slots are called without arguments, as PythonQt allows.
  `load_ui` builds such widgets from the .ui XML; a .ui class that the wrapper does not name
  (``qMRMLWidget``, ``QPlainTextEdit``) becomes a plain `Widget` there, not a ``qt``/``ctk`` name.
- ``qt.QIcon`` (keeps the path): ``ScriptedLoadableModule.__init__`` sets the module's icon.
- ``slicer.qMRMLNodeComboBox``, ``slicer.qMRMLSliderWidget``, ... (the ``slicer.q*`` names the
  wrapper mentions): widget classes, as above.
- ``slicer.app``: ``translate`` (``slicer.i18n``; returns the text: no translations loaded),
  ``testingEnabled()`` (True, as in Slicer's ctest runs: message boxes are not shown),
  ``processEvents()`` (``delayDisplay`` with a short delay), ``pauseRender()``/``resumeRender()``
  (``slicer.util.RenderBlocker``, around each result's write; counted), ``temporaryPath``, ``majorVersion``/
  ``minorVersion`` (the layer's version, 5.10), ``applicationName``.
- ``slicer.mrmlScene``: a real ``vtkMRMLScene`` of slicer-core with the module logics registered as
  Slicer's application does (`UltramotionIGTLib.slicer.mrml.create_standalone_context`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import tempfile
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "UltramotionIGT" / "UltramotionIGT.py"
UI_FILE = REPO / "UltramotionIGT" / "Resources" / "UI" / "UltramotionIGT.ui"
LAYER_VERSION = (5, 10)
#: Modules of the layer, in import order (``slicer.util`` first: the others use it).
LAYER_MODULES = (
    "slicer.util",
    "slicer.i18n",
    "slicer.testing",
    "slicer.parameterNodeWrapper",
    "slicer.ScriptedLoadableModule",
)


def layer_dir() -> Path | None:
    """Slicer's Python layer: ``$ULTRAMOTION_SLICER_PYTHON``, else ``../shared/slicer-python/v5.10.0``.

    The folder holds ``slicer/ScriptedLoadableModule.py`` etc.; None when it is not there.
    """
    env = os.environ.get("ULTRAMOTION_SLICER_PYTHON")
    path = Path(env) if env else REPO.parent / "shared" / "slicer-python" / "v5.10.0"
    return path if (path / "slicer" / "ScriptedLoadableModule.py").is_file() else None


# -- widgets ----------------------------------------------------------------------------------------


class Signal:
    """A Qt signal: ``connect``/``disconnect`` a slot; ``emit`` calls the slots (without arguments)."""

    def __init__(self) -> None:
        self._slots: list[Any] = []

    def connect(self, slot) -> None:
        self._slots.append(slot)

    def disconnect(self, slot) -> None:
        self._slots.remove(slot)

    def emit(self) -> None:
        for slot in list(self._slots):
            slot()


class Widget:
    """What every widget has: ``name``, ``enabled``, ``text``, ``toolTip``, dynamic properties, children."""

    def __init__(self, name: str = "", properties: dict[str, Any] | None = None) -> None:
        self.name = name
        self.enabled = True
        self.text = ""
        self.toolTip = ""
        self._properties = dict(properties or {})
        self._children: list[Widget] = []

    def property(self, name: str):
        return self._properties.get(name)

    def children(self) -> list[Widget]:
        return list(self._children)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _value_property(attribute: str, signal: str, clamp: bool = False) -> property:
    """A Qt property whose setter emits ``signal`` when the value changes (clamped to the range)."""

    def get(self):
        return getattr(self, "_" + attribute)

    def set(self, value):
        if clamp:
            value = min(max(value, self.minimum), self.maximum)
        if value != getattr(self, "_" + attribute):
            setattr(self, "_" + attribute, value)
            getattr(self, signal).emit()

    return property(get, set)


class QCheckBox(Widget):
    checked = _value_property("checked", "stateChanged")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._checked = False
        self.stateChanged = Signal()


class QSpinBox(Widget):
    value = _value_property("value", "valueChanged", clamp=True)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.minimum, self.maximum, self._value = 0, 99, 0
        self.singleStep = 1
        self.valueChanged = Signal()

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.value = self._value

    def setMinimum(self, minimum) -> None:
        self.setRange(minimum, max(minimum, self.maximum))

    def setMaximum(self, maximum) -> None:
        self.setRange(min(self.minimum, maximum), maximum)


class ctkSliderWidget(QSpinBox):  # noqa: N801 - CTK's class name
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.minimum, self.maximum, self._value = 0.0, 99.0, 0.0
        self.decimals = 2


class QComboBox(Widget):
    currentIndex = _value_property("currentIndex", "currentIndexChanged")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._items: list[str] = []
        self._currentIndex = -1
        self.currentIndexChanged = Signal()

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentText(self) -> str:
        return self._items[self._currentIndex] if self._currentIndex >= 0 else ""

    def addItem(self, text: str) -> None:
        self._items.append(text)
        if self._currentIndex < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self._items.clear()
        self.currentIndex = -1


class QLineEdit(Widget):
    text = _value_property("text", "textChanged")

    def __init__(self, *args, **kwargs) -> None:
        self._text = ""
        self.textChanged = Signal()
        super().__init__(*args, **kwargs)


class ctkPathLineEdit(Widget):  # noqa: N801 - CTK's class name
    currentPath = _value_property("currentPath", "currentPathChanged")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._currentPath = ""
        self.currentPathChanged = Signal()


class qMRMLNodeComboBox(Widget):  # noqa: N801 - Slicer's class name
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nodeTypes = tuple(self.property("nodeTypes") or ())
        self._node = None
        self.currentNodeChanged = Signal()

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit()


class QIcon:
    """``qt.QIcon``: ``ScriptedLoadableModule.__init__`` makes the module icon from Resources/Icons."""

    def __init__(self, path: str = "") -> None:
        self.path = path


#: The widget classes of the module's .ui that the GUI connectors or the widget code use.
WIDGET_CLASSES = {
    cls.__name__: cls
    for cls in (
        QCheckBox,
        QSpinBox,
        ctkSliderWidget,
        QComboBox,
        QLineEdit,
        ctkPathLineEdit,
        qMRMLNodeComboBox,
    )
}


def _layer_widget_names(layer: Path) -> dict[str, set[str]]:
    """``{"qt": {...}, "ctk": {...}, "slicer": {...}}``: the widget class names the wrapper mentions."""
    names: dict[str, set[str]] = {"qt": set(), "ctk": set(), "slicer": set()}
    for path in sorted((layer / "slicer" / "parameterNodeWrapper").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for module, name in re.findall(r"\b(qt|ctk|slicer)\.((?:Q|ctk|q[A-Z])\w*|Widget)\b", text):
            names[module].add(name)
    return names


def load_ui(path: Path = UI_FILE) -> Widget:
    """The top-level widget of a Qt Designer .ui file, with its child widgets (see the module doc).

    Each ``<widget class=C name=N>`` becomes an instance of ``qt.C``, ``ctk.C`` or ``slicer.C`` (the
    stub classes) carrying its dynamic properties (``stdset="0"``, e.g. ``SlicerParameterName``) and
    ``nodeTypes``; other designer properties are not applied. Layouts are skipped: a widget's
    children are the widgets nested in it, through any layouts.
    """
    import ctk
    import qt
    import slicer

    root = ET.parse(path).getroot().find("widget")
    children: dict[ET.Element, list[ET.Element]] = {}
    for parent in root.iter("widget"):
        stack = list(parent)
        while stack:
            item = stack.pop(0)
            if item.tag == "widget":
                children.setdefault(parent, []).append(item)
            else:
                stack.extend(item)

    def build(element: ET.Element) -> Widget:
        class_name = element.get("class")
        cls = (
            getattr(qt, class_name, None)
            or getattr(ctk, class_name, None)
            or getattr(slicer, class_name, None)
            or type(class_name, (Widget,), {})  # a container or display widget no connector names
        )
        properties = {}
        for prop in element.findall("property"):
            if prop.get("stdset") == "0":
                properties[prop.get("name")] = prop.findtext("string")
            elif prop.get("name") == "nodeTypes":
                properties["nodeTypes"] = [s.text for s in prop.iter("string")]
        widget = cls(element.get("name"), properties)
        widget._children = [build(child) for child in children.get(element, [])]
        return widget

    return build(root)


# -- the layer --------------------------------------------------------------------------------------


class App:
    """``slicer.app``: the members the layer and the module touch (see the module docstring)."""

    applicationName = "3D Slicer"
    majorVersion, minorVersion = LAYER_VERSION

    def __init__(self, temporary_path: str) -> None:
        self.temporaryPath = temporary_path
        self.events_processed = 0
        self.render_paused = 0  # pauseRender() calls not yet resumed
        self.render_pauses = 0  # pauseRender() calls in all

    @staticmethod
    def translate(context: str, text: str) -> str:
        return text

    @staticmethod
    def testingEnabled() -> bool:
        return True

    def processEvents(self) -> None:
        self.events_processed += 1

    def pauseRender(self) -> None:
        self.render_paused += 1
        self.render_pauses += 1

    def resumeRender(self) -> None:
        self.render_paused -= 1


class SlicerLayer:
    """Installs Slicer's Python layer and the stubs over slicer-core; `uninstall` restores everything.

    After `install`: ``self.module`` is the imported ``UltramotionIGT`` module, ``self.scene`` the
    MRML scene (also ``slicer.mrmlScene``), ``self.app`` the ``slicer.app`` stub.
    """

    def __init__(self, layer: Path) -> None:
        self.layer = layer
        self.module: types.ModuleType | None = None
        self.context = None
        self.app: App | None = None
        self._saved_modules: dict[str, Any] = {}
        self._saved_attributes: dict[str, Any] = {}
        self._tmp = None

    @property
    def scene(self):
        return self.context.scene

    def install(self) -> SlicerLayer:
        import slicer

        from UltramotionIGTLib.slicer import mrml

        widget_names = _layer_widget_names(self.layer)
        managed = ["qt", "ctk", "UltramotionIGT", *LAYER_MODULES]
        managed += [name for name in sys.modules if name.startswith("slicer.parameterNodeWrapper.")]
        self._saved_modules = {name: sys.modules.get(name) for name in managed}
        for name in managed:
            sys.modules.pop(name, None)
        slicer_names = widget_names["slicer"] | {"app", "mrmlScene", "selfTests"}
        slicer_names |= {name.split(".")[1] for name in LAYER_MODULES}
        self._saved_attributes = {name: getattr(slicer, name, _MISSING) for name in slicer_names}
        self._saved_path = list(slicer.__path__)

        for module_name in ("qt", "ctk"):
            module = types.ModuleType(
                module_name, f"Stub of {module_name} for tests (Testing/slicer_layer.py)"
            )
            for class_name in sorted(widget_names[module_name]):
                setattr(module, class_name, WIDGET_CLASSES.get(class_name) or type(class_name, (Widget,), {}))
            sys.modules[module_name] = module
        sys.modules["qt"].QIcon = QIcon
        for class_name in sorted(widget_names["slicer"]):
            setattr(slicer, class_name, WIDGET_CLASSES.get(class_name) or type(class_name, (Widget,), {}))

        self._tmp = tempfile.TemporaryDirectory(prefix="slicer_layer_")
        self.app = App(self._tmp.name)
        self.context = mrml.create_standalone_context()
        slicer.app = self.app
        slicer.mrmlScene = self.context.scene
        slicer.__path__.insert(0, str(self.layer / "slicer"))
        for name in LAYER_MODULES:
            importlib.import_module(name)
        assert Path(slicer.util.__file__).is_relative_to(self.layer), slicer.util.__file__

        spec = importlib.util.spec_from_file_location("UltramotionIGT", MODULE_FILE)
        self.module = importlib.util.module_from_spec(spec)
        sys.modules["UltramotionIGT"] = self.module
        spec.loader.exec_module(self.module)
        return self

    def uninstall(self) -> None:
        import slicer

        if self.context is not None:
            self.context.close()
        for name in [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper.")]:
            sys.modules.pop(name)
        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self._saved_attributes.items():
            if value is _MISSING:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        slicer.__path__[:] = self._saved_path
        if self._tmp is not None:
            self._tmp.cleanup()


_MISSING = object()
