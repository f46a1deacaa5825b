"""Render the module panel to Resources/Screenshots/UltramotionIGT_panel.png (the Extension Manager's
screenshot, EXTENSION_SCREENSHOTURLS in CMakeLists.txt).

3D Slicer cannot run here, so Qt draws the panel (PySide6, offscreen) from the module's own .ui
file, with Slicer's widgets replaced by the stock Qt widgets closest to them (`STOCK_WIDGETS`;
collapsed sections show their header only). What the panel shows is produced by the real module:
``UltramotionIGT.py`` runs on 3D Slicer's Python layer over slicer-core (Testing/slicer_layer.py),
its logic processes a synthetic ultrasound stream (`UltramotionIGTLib.tools.phantom`) on the CPU
with the shipped demo models, and the panel shows its parameter node, its run state (settings read
at start are greyed out while running) and its KPI panel and status light
(``UltramotionIGTLogic.indicatorTexts``). Model paths are shown relative to the repository.

Usage (needs the project's environment plus PySide6: ``pip install -e '.[screenshot]'``):

    QT_QPA_PLATFORM=offscreen python Resources/Screenshots/make_screenshot.py [--out PATH] [--frames N]
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "UltramotionIGT" / "Resources" / "UI" / "UltramotionIGT.ui"
DEFAULT_OUT = Path(__file__).resolve().parent / "UltramotionIGT_panel.png"
#: Slicer widget class -> the stock Qt class drawn in its place.
STOCK_WIDGETS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
}
#: Designer properties of the Slicer widgets that the stock classes do not have.
SLICER_ONLY_PROPERTIES = {
    "nodeTypes",
    "showChildNodeTypes",
    "addEnabled",
    "removeEnabled",
    "renameEnabled",
    "noneEnabled",
    "filters",
    "nameFilters",
    "collapsed",
}


def stock_ui(path: Path = UI_FILE) -> tuple[bytes, set[str]]:
    """The .ui with stock Qt widget classes, and the names of the collapsed sections."""
    root = ET.parse(path).getroot()
    collapsed = set()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls not in STOCK_WIDGETS:
            continue
        widget.set("class", STOCK_WIDGETS[cls])
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if name == "collapsed" and prop.findtext("bool") == "true":
                collapsed.add(widget.get("name"))
            if name in SLICER_ONLY_PROPERTIES:
                widget.remove(prop)
            elif cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8"), collapsed


def run_module(frames: int):
    """The real module on Slicer's Python layer, processing ``frames`` phantom frames on the CPU.

    Returns (module, parameter node, indicator texts) while the session still runs.
    """
    sys.path[:0] = [str(REPO), str(REPO / "Testing")]
    import slicer_layer

    from UltramotionIGTLib.slicer import mrml
    from UltramotionIGTLib.tools.phantom import PhantomStream

    layer_path = slicer_layer.layer_dir()
    if layer_path is None:
        sys.exit(
            "3D Slicer's Python layer not found: set ULTRAMOTION_SLICER_PYTHON (see Testing/slicer_layer.py)"
        )
    module = slicer_layer.SlicerLayer(layer_path).install().module
    import slicer

    stream = PhantomStream(seed=3, n_frames=frames + 1)
    geometry = mrml.FrameGeometry.from_spacing_origin_directions(
        (0.2, 0.2, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), stream.frame(0).image.shape
    )
    volume = mrml.new_volume_node(slicer.mrmlScene, stream.frame(0).image, geometry, name="US image")
    logic = module.UltramotionIGTLogic()
    node = logic.getParameterNode()
    node.inputVolume = volume
    node.device = module.Device.CPU
    logic.start(node)
    for k in range(1, frames + 1):
        mrml.write_frame_to_volume(volume, stream.frame(k).image)
        logic.processPending()
    return module, node, logic.indicatorTexts()


def render(module, node, texts, out: Path, width: int) -> None:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QApplication,
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QGroupBox,
        QLabel,
        QLineEdit,
        QSpinBox,
        QWidget,
    )

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    xml, collapsed = stock_ui()
    buffer = QBuffer()
    buffer.setData(QByteArray(xml))
    buffer.open(QIODevice.OpenModeFlag.ReadOnly)
    panel = QUiLoader().load(buffer)

    def shown(value) -> str:
        if value is None:
            return "None"
        if hasattr(value, "GetName"):
            return value.GetName()
        path = Path(value)
        return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(path)

    running = node.runState == module.RunState.RUNNING
    for widget in panel.findChildren(QWidget):
        name = widget.property("SlicerParameterName")
        if not name:
            continue
        value = node.getValue(name)
        if isinstance(widget, QComboBox):
            choices = list(type(value)) if hasattr(type(value), "__members__") else [value]
            widget.clear()
            widget.addItems([c.label() if hasattr(c, "label") else shown(c) for c in choices])
            widget.setCurrentIndex(choices.index(value))
        elif isinstance(widget, QLineEdit):
            widget.setText(shown(value))
        elif isinstance(widget, QDoubleSpinBox):
            widget.setValue(float(value))
        elif isinstance(widget, QSpinBox):
            widget.setValue(int(value))
        elif isinstance(widget, QCheckBox):
            widget.setChecked(bool(value))
        elif isinstance(widget, QLabel):
            widget.setText(str(value))
        widget.setEnabled(not (running and name in module.PARAMETERS_READ_AT_START))
    panel.findChild(QWidget, "startStopButton").setText("Stop" if running else "Start")
    panel.findChild(QWidget, "startStopButton").setEnabled(True)
    panel.findChild(QWidget, "applyButton").setEnabled(not running)
    panel.findChild(QLabel, "kpiLabel").setText(texts["panel"])
    panel.findChild(QLabel, "statusLightLabel").setStyleSheet(texts["lightStyleSheet"])
    for name in collapsed:
        box = panel.findChild(QGroupBox, name)
        for child in box.findChildren(QWidget):
            child.hide()
        box.setTitle("▸ " + box.title())
        box.setFlat(True)
        box.setFixedHeight(box.fontMetrics().height() + 4)
    panel.resize(width, panel.sizeHint().height())
    panel.adjustSize()
    panel.resize(width, panel.height())
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        sys.exit(f"could not write {out}")
    print(f"wrote {out} ({panel.width()}x{panel.height()})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--frames", type=int, default=12, help="phantom frames processed before the capture")
    parser.add_argument("--width", type=int, default=420, help="panel width in pixels")
    args = parser.parse_args(argv)
    from PySide6.QtWidgets import QApplication

    # Qt first: creating the QApplication after VTK/torch are loaded crashes (shared libraries)
    app = QApplication.instance() or QApplication([])  # noqa: F841 - kept alive until the capture
    module, node, texts = run_module(args.frames)
    render(module, node, texts, args.out, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
