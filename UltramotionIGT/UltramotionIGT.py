"""UltramotionIGT: real-time detection and segmentation of vessels and needles on live ultrasound.

Five parts, as in Slicer's scripted-module template: the module (metadata and help), a typed
parameter node, a thin widget (GUI binding, timer, indicators), the logic (usable without any GUI:
it never opens a dialog and holds no widget) and the self-test.

Nothing heavy is imported at module scope: torch and ``UltramotionIGTLib`` are imported inside the
logic, after a dependency check, so that Slicer starts fast and the module loads even before
PyTorch is installed (a test reads this file's syntax tree to keep it that way).
"""

import enum
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import SlicerParameterNamePropertyName, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The oldest 3D Slicer the module supports: 5.10 brings Python 3.12 (the library needs >= 3.10) and
#: the parameter-node wrapper this module is tested against (Testing/test_slicer_module.py runs it).
#: On an older Slicer the module still loads (this file keeps to Python 3.9 syntax and typing) and
#: says so instead of failing with a traceback. Also stated in CMakeLists.txt and the README.
MINIMUM_SLICER_VERSION = (5, 10)
#: Name of the 3D Slicer extension that provides torch/torchvision (its module: PyTorchUtils).
PYTORCH_EXTENSION = "PyTorch"
#: Pacing of the frame loop: the widget's timer asks the logic for pending work this often.
TIMER_INTERVAL_MS = 10
#: The KPI panel and status light are refreshed at most this often (the corner line: every frame).
INDICATOR_INTERVAL_MS = 250


def slicerVersionProblem() -> str:
    """Why this 3D Slicer cannot run the module ("" when it can): older than MINIMUM_SLICER_VERSION."""
    version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if version >= MINIMUM_SLICER_VERSION and sys.version_info >= (3, 10):
        return ""
    return _(
        "UltramotionIGT needs 3D Slicer {minimum} or later (with Python 3.12). This is 3D Slicer {version} "
        "with Python {python}. Install a current 3D Slicer from https://download.slicer.org."
    ).format(
        minimum="{}.{}".format(*MINIMUM_SLICER_VERSION),
        version="{}.{}".format(*version),
        python="{}.{}".format(*sys.version_info[:2]),
    )


#
# UltramotionIGT
#


class UltramotionIGT(ScriptedLoadableModule):
    """Module metadata. See https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Ultramotion IGT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = []
        self.parent.contributors = ["UltramotionIGT team (Ultramotion)"]
        self.parent.helpText = _("""
Real-time detection (D-FINE) and segmentation (SAM, prompted by the detected boxes) of vessels and
needles on live ultrasound, GPU-resident from frame to mask.
<ul>
<li><b>Input volume</b>: the live image (OpenIGTLink, or a sequence browser's proxy volume).</li>
<li><b>Start</b> processes frames as they arrive; frames that arrive while one is being processed
are dropped and counted (newest frame first), so the display never lags behind a queue.
<b>Replay</b> mode processes every frame of a sequence into a segmentation sequence.
<b>Remote gateway</b> mode shows the segmentation that <code>ultramotion-igt serve</code> computes on
another machine (received over OpenIGTLink: needs the SlicerOpenIGTLink extension, not PyTorch).</li>
<li><b>Apply once</b> processes the current frame.</li>
<li>The output segmentation gets one segment per tracked target (vessel-1, needle-100, ...).</li>
<li>The <b>Status</b> panel shows device, frame rate, latency per stage, dropped frames, host syncs
per frame, GPU memory and the age of the mask on screen. Green light: GPU-resident on CUDA;
yellow: CPU.</li>
<li><b>Check environment</b> tells what is missing (PyTorch, CUDA, model files) and what to do.</li>
</ul>
Without a model of your own, the shipped demo models (trained on a synthetic phantom) are used.
See the <a href="https://github.com/ultramotion-igt/SlicerUltramotionIGT">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by the UltramotionIGT team. Uses D-FINE (through Hugging Face transformers), Segment
Anything (Meta AI) and PyTorch (through the SlicerPyTorch extension).
""")
        problem = slicerVersionProblem()
        if problem:
            # Said once at start-up and on top of the help; the panel shows it instead of its controls.
            logging.error(problem)
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText


#
# Parameter node
#


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("CUDA GPU")}[self.value]


class Precision(enum.Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    def label(self):
        names = {"auto": _("Auto (fp16 on GPU, fp32 on CPU)"), "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
        return names[self.value]


class SamType(enum.Enum):
    AUTO = "auto"
    VIT_T_DEMO = "vit_t_demo"
    VIT_B = "vit_b"
    VIT_L = "vit_l"
    VIT_H = "vit_h"
    VIT_T = "vit_t"
    MEDSAM = "medsam"

    def label(self):
        names = {
            "auto": _("Auto (from checkpoint)"),
            "vit_t": "vit_t (MobileSAM)",
            "medsam": "medsam (MedSAM)",
        }
        return names.get(self.value, self.value)


class Mode(enum.Enum):
    LIVE = "live"
    REPLAY = "replay"
    REMOTE = "remote"

    def label(self):
        return {
            "live": _("Live (newest frame)"),
            "replay": _("Replay (every frame of a sequence)"),
            "remote": _("Remote gateway (OpenIGTLink, no PyTorch here)"),
        }[self.value]


class DropPolicy(enum.Enum):
    NEWEST = "newest"
    EVERY_NTH = "every_nth"

    def label(self):
        return _("Newest frame only") if self is DropPolicy.NEWEST else _("Every Nth frame")


class RunState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@parameterNodeWrapper
class UltramotionIGTParameterNode:
    """Everything the user chose, saved with the scene.

    inputVolume - the live ultrasound image (a volume with one slice).
    outputSegmentation - receives one segment per tracked target.
    detectorFolder / samCheckpoint / samType - the models (default: the shipped demo models).
    device - where the pipeline runs.
    precision - numeric precision of the models (a model that loses accuracy in it stays in fp32).
    scoreThreshold / maxTargets - which detections are segmented (per class).
    mode - live (newest frame, drops counted; the models run on a worker thread), replay (every
      frame of a sequence) or remote (label maps from ``ultramotion-igt serve``, no torch here).
    gatewayHost / gatewayPort - where the gateway serves label maps (remote mode; an empty host: use
      an OpenIGTLink connector set up in the OpenIGTLinkIF module).
    dropPolicy / everyNth - how live mode keeps up with a fast producer.
    showTargetPoints - also write each target's weighted centroid to a markups node.
    showCornerAnnotation - a one-line KPI summary in the slice view.
    runState / statusMessage - what the logic is doing (written by the logic, shown by the widget).
      runState mirrors the logic's session: a value read from a saved scene is stale, and the logic
      resets it (`UltramotionIGTLogic.getParameterNode`).

    Settings are read when processing starts, except those in PARAMETERS_APPLIED_WHILE_RUNNING; the
    widget disables the others while running, so that no control looks live and does nothing.
    """

    # A Union of node types must include None (Optional): the wrapper writes None as the default of a
    # node parameter, and a Union without None has no serializer for it (TypeError on creation).
    # typing's Optional/Union, not PEP 604: this file is still imported by Python 3.9 (Slicer < 5.10)
    # to tell the user the minimum version.
    inputVolume: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    outputSegmentation: vtkMRMLSegmentationNode
    detectorFolder: Path
    samCheckpoint: Path
    samType: SamType = SamType.AUTO
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    scoreThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.3
    maxTargets: Annotated[int, WithinRange(1, 16)] = 4
    mode: Mode = Mode.LIVE
    dropPolicy: DropPolicy = DropPolicy.NEWEST
    everyNth: Annotated[int, WithinRange(1, 100)] = 2
    showTargetPoints: bool = False
    showCornerAnnotation: bool = True
    gatewayHost: str = "localhost"
    gatewayPort: Annotated[int, WithinRange(1, 65535)] = 18945
    runState: RunState = RunState.IDLE
    statusMessage: str = ""


#: Settings that take effect while processing runs (the widget reads them on every timer tick).
PARAMETERS_APPLIED_WHILE_RUNNING = frozenset({"showCornerAnnotation"})
#: What the logic reports (shown by the widget, never edited by the user).
PARAMETERS_REPORTED_BY_THE_LOGIC = frozenset({"runState", "statusMessage"})
#: Every other parameter is read once, when processing starts: its widget is disabled while running.
PARAMETERS_READ_AT_START = (
    frozenset(UltramotionIGTParameterNode.allParameters)
    - PARAMETERS_APPLIED_WHILE_RUNNING
    - PARAMETERS_REPORTED_BY_THE_LOGIC
)


#
# Errors
#


class InstallError(RuntimeError):
    """Python packages are missing or outdated, or were just installed.

    ``missing``: what is still to install, one readable line each (``"transformers>=4.52 (4.50.0
    installed)"``). ``needsPyTorch``: torch or torchvision are among them (they come from the PyTorch
    extension, not from pip). ``restartRequired``: Slicer must restart before processing (the
    PyTorch extension was just installed, or installed packages were replaced by newer ones).
    """

    def __init__(self, message, missing=(), needsPyTorch=False, restartRequired=False):
        super().__init__(message)
        self.missing = list(missing)
        self.needsPyTorch = bool(needsPyTorch)
        self.restartRequired = bool(restartRequired)


#
# Widget
#


class UltramotionIGTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node, paces the logic with a timer, shows indicators."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._indicatorsShownAt = None  # time.monotonic() of the last panel refresh
        self._cornerViews = []
        self._kpiActors = {}  # slice view name -> (view, the module's KPI text actor in it)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = slicerVersionProblem()
        if problem:  # the panel says what to do instead of failing on the first incompatible call
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UltramotionIGT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UltramotionIGTLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(TIMER_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.startStopButton.connect("clicked(bool)", self.onStartStopButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironmentButton)
        self.ui.statusLightLabel.setStyleSheet("background-color: #8a8a8a; border-radius: 7px;")

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.stop(_("Module closed"))
        self._setCornerText("")
        for view, actor in self._kpiActors.values():  # the module leaves no actor behind in the views
            view.renderWindow().GetRenderers().GetFirstRenderer().RemoveActor2D(actor)
        self._kpiActors = {}
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:  # None: this Slicer is too old, the panel says so
            self.initializeParameterNode()

    def exit(self) -> None:
        # Processing continues in the background while another module is shown; only the GUI
        # binding is released (it is restored on enter).
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._timer.stop()
        self.logic.stop(_("Scene closed"))
        self._setCornerText("")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        # A loaded scene may hold a run state saved while processing ran: the logic resets it.
        self.logic.getParameterNode()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[UltramotionIGTParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()
            self._updateIndicators()

    def _updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = bool(node and node.runState == RunState.RUNNING)
        remote = bool(node and node.mode == Mode.REMOTE)  # receives its input from the gateway
        hasInput = bool(node and node.inputVolume)
        self.ui.startStopButton.enabled = hasInput or remote or running
        self.ui.startStopButton.text = _("Stop") if running else _("Start")
        self.ui.startStopButton.toolTip = (
            _("Stop processing")
            if running
            else _("Connect to the gateway and show its segmentation")
            if remote
            else _("Start processing frames as they arrive")
            if hasInput
            else _("Select an input volume first")
        )
        self.ui.applyButton.enabled = hasInput and not running and not remote
        # A setting read only when processing starts cannot change a running session: its control
        # is disabled while running rather than editable and ignored. The widgets are found by the
        # parameter they are bound to (the .ui's SlicerParameterName), so a new one is covered.
        for widget in vars(self.ui).values():
            if widget.property(SlicerParameterNamePropertyName) in PARAMETERS_READ_AT_START:
                widget.enabled = not running

    # -- dependencies: the widget asks, the logic installs -----------------------------------------

    def _ensureDependencies(self) -> bool:
        """True when the libraries can be used now. Asks before installing anything."""
        try:
            self.logic.dependencies.check()
            return True
        except InstallError as error:
            if not error.needsPyTorch:
                torchNote = ""
            elif self.logic.dependencies.hasPyTorchExtension():
                torchNote = _("PyTorch (torch, torchvision) is installed through the PyTorch extension.\n\n")
            else:
                torchNote = _(
                    "torch comes from the PyTorch extension, which is installed first from the Extensions "
                    "Manager. Slicer then restarts; press Start again to install torch.\n\n"
                )
            question = _(
                "UltramotionIGT needs these Python packages, which are missing or too old:\n\n{missing}\n\n"
                "{torchNote}Install them now? This downloads several hundred MB and can take minutes."
            ).format(missing="\n".join(error.missing), torchNote=torchNote)
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install dependencies")):
                self._parameterNode.statusMessage = _("Dependencies not installed: processing cannot start")
                return False
        import traceback

        failure = None
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.logic.dependencies.install()
        except Exception as error:
            failure, details = error, traceback.format_exc()
        finally:
            slicer.app.restoreOverrideCursor()
        if failure is None:
            return True
        if isinstance(failure, InstallError) and failure.restartRequired:
            if slicer.util.confirmYesNoDisplay(
                str(failure) + "\n\n" + _("Restart Slicer now?"), windowTitle=_("Restart required")
            ):
                slicer.util.restart()
        else:
            slicer.util.errorDisplay(
                _("Failed to install dependencies.") + f"\n\n{failure}", detailedText=details
            )
        return False

    # -- buttons -----------------------------------------------------------------------------------

    def onStartStopButton(self) -> None:
        node = self._parameterNode
        if node.runState == RunState.RUNNING:
            self._timer.stop()
            self.logic.stop(_("Stopped by the user"))
            self._updateIndicators(force=True)
            return
        if node.mode != Mode.REMOTE and not self._ensureDependencies():  # remote mode needs no torch
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start processing."), waitCursor=True):
            self.logic.start(node)
            self._showOutput()
            self._timer.start()
        self._updateIndicators(force=True)

    def onApplyButton(self) -> None:
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to process the frame."), waitCursor=True):
            self.logic.processOnce(self._parameterNode)
            self._showOutput()
        self._updateIndicators(force=True)

    def onCheckEnvironmentButton(self) -> None:
        self.ui.environmentCollapsibleButton.collapsed = False
        with slicer.util.tryWithErrorDisplay(_("Environment check failed."), waitCursor=True):
            report, ready = self.logic.checkEnvironment(self._parameterNode)
            self.ui.environmentReportTextEdit.plainText = report
            self.ui.environmentReportTextEdit.setStyleSheet("" if ready else "color: #b00000;")

    def onTimer(self) -> None:
        # Errors in a frame are turned into a stopped session with a status message by the logic;
        # anything escaping here is a bug, shown once, and the loop stops.
        processed = 0
        try:
            processed = self.logic.processPending()
        except Exception:
            self._timer.stop()
            self.logic.stop(_("Internal error (see the Python console)"))
            logging.exception("UltramotionIGT frame loop failed")
        if self._parameterNode is None or self._parameterNode.runState != RunState.RUNNING:
            self._timer.stop()
            self._updateIndicators(force=True)
            return
        if processed and self._parameterNode.showCornerAnnotation:
            texts = self.logic.indicatorTexts()  # per frame: names the frame the mask came from
            self._setCornerText(texts["corner"] if texts else "")
        self._updateIndicators()

    # -- indicators --------------------------------------------------------------------------------

    def _updateIndicators(self, force=False) -> None:
        now = time.monotonic()
        if not force and self._indicatorsShownAt is not None:
            if (now - self._indicatorsShownAt) * 1000.0 < INDICATOR_INTERVAL_MS:
                return
        self._indicatorsShownAt = now
        texts = self.logic.indicatorTexts()
        if texts is None:  # library not loaded yet: nothing measured
            return
        self.ui.kpiLabel.text = texts["panel"]
        self.ui.statusLightLabel.setStyleSheet(texts["lightStyleSheet"])
        self.ui.statusLightLabel.toolTip = texts["lightTooltip"]
        show = self._parameterNode is not None and self._parameterNode.showCornerAnnotation
        self._setCornerText(texts["corner"] if show else "")

    def _setCornerText(self, text) -> None:
        """Show ``text`` in the lower-right corner of the slice views showing the input volume, in a
        text actor of the module's own: DataProbe's slice annotations rewrite the views' corner
        annotation whenever the slice logic changes, so the KPI line would flicker or vanish there."""
        for view, actor in self._cornerViews:
            actor.SetVisibility(False)
            view.scheduleRender()
        self._cornerViews = []
        if not text or self._parameterNode is None or not self._parameterNode.inputVolume:
            return
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        volumeId = self._parameterNode.inputVolume.GetID()
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            composite = sliceWidget.mrmlSliceCompositeNode()
            if volumeId in (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()):
                view = sliceWidget.sliceView()
                actor = self._kpiActor(name, view)
                actor.SetInput(text)
                actor.SetVisibility(True)
                view.scheduleRender()
                self._cornerViews.append((view, actor))

    def _kpiActor(self, name, view):
        """The KPI text actor of slice view ``name`` (made once, in the view's renderer)."""
        view_and_actor = self._kpiActors.get(name)
        if view_and_actor is None:
            actor = vtk.vtkTextActor()
            actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
            actor.SetPosition(0.99, 0.01)
            props = actor.GetTextProperty()
            props.SetJustificationToRight()
            props.SetVerticalJustificationToBottom()
            props.SetFontSize(12)
            props.SetColor(1.0, 1.0, 0.6)
            props.SetShadow(True)
            view.renderWindow().GetRenderers().GetFirstRenderer().AddActor2D(actor)
            view_and_actor = self._kpiActors[name] = (view, actor)
        return view_and_actor[1]

    def _showOutput(self) -> None:
        node = self._parameterNode
        if node.inputVolume:
            slicer.util.setSliceViewerLayers(background=node.inputVolume, fit=False)
        if node.outputSegmentation and node.outputSegmentation.GetDisplayNode():
            node.outputSegmentation.GetDisplayNode().SetVisibility(True)


def isUnsetPath(path) -> bool:
    """An empty path parameter (``Path()`` reads back as ".")."""
    return path is None or str(path) in ("", ".")


#
# Dependencies
#


class DependencyInstaller:
    """Finds the library and checks or installs the Python packages it needs.

    Apart from the logic (which only maps the parameter node onto the library), as Slicer extensions
    that install their own packages keep it (e.g. SlicerMONAIAuto3DSeg's dependency handling). The
    requirement list is the library's own (``UltramotionIGTLib.requirements``, equal to
    pyproject.toml's dependencies); torch and torchvision come from the PyTorch extension
    (``PyTorchUtils``), everything else from pip. It never opens a dialog: what is missing raises
    `InstallError`, and the widget asks the user before calling `install`.
    """

    @staticmethod
    def libraryParentDir() -> Optional[Path]:
        """The folder that holds ``UltramotionIGTLib/``: the module's own folder once installed
        (both sit in qt-scripted-modules), its parent in a source checkout."""
        here = Path(__file__).resolve().parent
        for candidate in (here, here.parent):
            if (candidate / "UltramotionIGTLib" / "__init__.py").is_file():
                return candidate
        return None

    @classmethod
    def ensureLibraryImportable(cls) -> None:
        parent = cls.libraryParentDir()
        if parent is not None and str(parent) not in sys.path:
            sys.path.insert(0, str(parent))

    def unsatisfiedRequirements(self, requirements=None):
        """The requirements not met by this Python, as `UltramotionIGTLib.requirements.Unsatisfied`.

        ``requirements``: PEP 508 strings; default: the library's own list, so that the module never
        keeps a copy of its own. Installed versions are compared.
        """
        self.ensureLibraryImportable()
        from UltramotionIGTLib.requirements import REQUIREMENTS, unsatisfied

        return unsatisfied(REQUIREMENTS if requirements is None else requirements)

    def check(self) -> None:
        """Return quietly when everything is there; else raise `InstallError` saying what is missing.

        Raises RuntimeError (no install can help) when this Slicer is older than MINIMUM_SLICER_VERSION.
        """
        problem = slicerVersionProblem()
        if problem:
            raise RuntimeError(problem)
        from UltramotionIGTLib.requirements import PYTORCH_DISTRIBUTIONS

        missing = self.unsatisfiedRequirements()
        if missing:
            lines = [m.describe() for m in missing]
            raise InstallError(
                _("Missing or outdated Python packages: {0}").format(", ".join(lines)),
                missing=lines,
                needsPyTorch=any(m.name in PYTORCH_DISTRIBUTIONS for m in missing),
            )

    @staticmethod
    def hasPyTorchExtension() -> bool:
        """Whether the PyTorch extension's module (PyTorchUtils) is loaded in this Slicer session."""
        import importlib.util

        return importlib.util.find_spec("PyTorchUtils") is not None

    @staticmethod
    def installPyTorchExtension() -> None:
        """Install the PyTorch extension from the Extensions Manager, without dialogs (the caller asked).

        Uses ``qSlicerExtensionsManagerModel.downloadAndInstallExtensionByName(name,
        installDependencies, waitForCompletion)``. Its modules load only after a restart. Raises
        `InstallError` when the installation failed.
        """
        manager = slicer.app.extensionsManagerModel()
        if manager.isExtensionInstalled(PYTORCH_EXTENSION):
            return  # installed earlier in this session: only the restart is missing
        interactive = manager.interactive
        manager.interactive = False  # no confirmation dialogs of its own: the user was asked already
        try:
            manager.updateExtensionsMetadataFromServer(True, True)
            installed = manager.downloadAndInstallExtensionByName(PYTORCH_EXTENSION, True, True)
        finally:
            manager.interactive = interactive
        if not installed:
            raise InstallError(
                _(
                    "The PyTorch extension could not be installed (see the error log). Install 'PyTorch' "
                    "from the Extensions Manager, restart Slicer, and try again."
                ),
                missing=[PYTORCH_EXTENSION],
                needsPyTorch=True,
            )

    def install(self) -> None:
        """Install what `unsatisfiedRequirements` lists, without asking (the caller asked).

        torch/torchvision come from the PyTorch extension (``PyTorchUtils``; the extension itself is
        installed from the Extensions Manager first when absent), with the library's version
        requirements; everything else from pip: ``slicer.packaging.pip_ensure`` on Slicer >= 5.11,
        ``slicer.util.pip_install`` before. Raises `InstallError` when something is still missing
        afterwards, or with ``restartRequired=True`` when Slicer must restart first: the PyTorch
        extension was just installed, or packages were replaced (an older version may already be
        imported in this session).
        """
        from packaging.requirements import Requirement

        from UltramotionIGTLib.requirements import PYTORCH_DISTRIBUTIONS, REQUIREMENTS

        missing = self.unsatisfiedRequirements()
        if not missing:
            return
        packages = [m.requirement for m in missing if m.name not in PYTORCH_DISTRIBUTIONS]
        if packages:
            try:
                import slicer.packaging

                hasPipEnsure = hasattr(slicer.packaging, "pip_ensure")
            except ImportError:
                hasPipEnsure = False
            if hasPipEnsure:  # Slicer >= 5.11
                slicer.packaging.pip_ensure(
                    packages, prompt_install=False, prompt_restart=False, requester="UltramotionIGT"
                )
            else:
                slicer.util.pip_install(packages)
        if any(m.name in PYTORCH_DISTRIBUTIONS for m in missing):
            if not self.hasPyTorchExtension():
                self.installPyTorchExtension()
                raise InstallError(
                    _(
                        "The PyTorch extension was installed. Restart Slicer, then press Start again: "
                        "PyTorch itself is installed then."
                    ),
                    missing=[m.describe() for m in missing if m.name in PYTORCH_DISTRIBUTIONS],
                    needsPyTorch=True,
                    restartRequired=True,
                )
            import PyTorchUtils

            specifiers = {
                Requirement(text).name: str(Requirement(text).specifier) or None for text in REQUIREMENTS
            }
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False,
                torchVersionRequirement=specifiers.get("torch"),
                torchvisionVersionRequirement=specifiers.get("torchvision"),
            )
            if torch is None:
                raise InstallError(_("PyTorch was not installed."), missing=[], needsPyTorch=True)
        import importlib

        importlib.invalidate_caches()  # let importlib.metadata see what was just installed
        still = self.unsatisfiedRequirements()
        if still:
            raise InstallError(
                _("Installation did not complete; still missing: {0}").format(
                    ", ".join(m.describe() for m in still)
                ),
                missing=[m.describe() for m in still],
                needsPyTorch=any(m.name in PYTORCH_DISTRIBUTIONS for m in still),
            )
        replaced = [f"{m.name} {m.installed}" for m in missing if m.installed is not None]
        if replaced:
            raise InstallError(
                _("Older versions were replaced ({0}). Restart Slicer before processing.").format(
                    ", ".join(replaced)
                ),
                restartRequired=True,
            )


#
# Logic
#


class UltramotionIGTLogic(ScriptedLoadableModuleLogic):
    """Maps the parameter node onto the library's `SessionController`; usable without the widget.

    The library is imported after `DependencyInstaller.check` (remote mode needs no torch: no check).
    No dialogs: `InstallError`, the library's `UltramotionError` or ValueError say what to do.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependencies = DependencyInstaller()
        self.controller = None  # the library's SessionController, made after the dependency check
        self._parameterNode = None

    def getParameterNode(self):
        node = UltramotionIGTParameterNode(super().getParameterNode())
        self.setDefaultModelPaths(node)
        self.resetStaleRunState(node)
        return node

    def resetStaleRunState(self, parameterNode) -> None:
        """RUNNING without a session of this logic on the node (e.g. saved with the scene) -> IDLE."""
        running = self.controller is not None and self.controller.running
        mine = running and self._parameterNode.parameterNode is parameterNode.parameterNode
        if parameterNode.runState == RunState.RUNNING and not mine:
            parameterNode.runState, parameterNode.statusMessage = RunState.IDLE, ""

    def demoModelPaths(self):
        """(detector folder, SAM checkpoint) of the shipped demo models, None where absent (no torch)."""
        DependencyInstaller.ensureLibraryImportable()
        from UltramotionIGTLib.models.packs import default_models

        return tuple(map(default_models().get, ("detector", "sam")))

    def setDefaultModelPaths(self, parameterNode) -> None:
        """Point empty model paths at the shipped demo models (so the user sees what is used)."""
        for name, path in zip(("detectorFolder", "samCheckpoint"), self.demoModelPaths()):
            if isUnsetPath(getattr(parameterNode, name)) and path is not None:
                setattr(parameterNode, name, path)

    def checkEnvironment(self, parameterNode):
        """The library's pre-flight checks (``ultramotion-igt doctor``): (report text, ready)."""
        DependencyInstaller.ensureLibraryImportable()
        from UltramotionIGTLib.tools import doctor

        node, unset = parameterNode, isUnsetPath
        results = doctor.run_checks(
            device=node.device.value,
            detector_dir=None if unset(node.detectorFolder) else node.detectorFolder,
            sam_checkpoint=None if unset(node.samCheckpoint) else node.samCheckpoint,
            sam_type=node.samType.value,
        )
        return doctor.format_report(results), doctor.all_ok(results)

    def _controller(self, needsPipeline=True):
        self.dependencies.check() if needsPipeline else DependencyInstaller.ensureLibraryImportable()
        if self.controller is None:
            from UltramotionIGTLib.slicer.controller import SessionController

            # results are written with rendering paused: the views render once per frame
            self.controller = SessionController(render_pause=slicer.util.RenderBlocker)
        return self.controller

    def _pipelineSettings(self, node):
        """(`ModelSource`, `PipelineConfig`) from the node (empty model paths: the demo models)."""
        from UltramotionIGTLib.core.pipeline import PipelineConfig
        from UltramotionIGTLib.models.source import ModelSource

        models = ModelSource.from_paths(node.detectorFolder, node.samCheckpoint, node.samType.value)
        limits = {
            "score_threshold": float(node.scoreThreshold),
            "max_targets_per_class": int(node.maxTargets),
        }
        return models, PipelineConfig(device=node.device.value, precision=node.precision.value, **limits)

    def start(self, parameterNode) -> None:
        """Start as the node says (live, replay, remote gateway) into its output segmentation (created
        when none is selected); the widget's timer then calls `processPending`."""
        self._parameterNode = node = parameterNode
        remote = node.mode == Mode.REMOTE
        controller = self._controller(needsPipeline=not remote)
        if remote:
            controller.start_remote(
                slicer.mrmlScene,
                node.outputSegmentation,
                host=node.gatewayHost.strip() or None,  # empty: a connector of the user's
                port=int(node.gatewayPort),
                status_callback=self._onStatus,
            )
        else:
            node.statusMessage = _("Loading models...")
            controller.start(
                node.inputVolume,
                node.outputSegmentation,
                *self._pipelineSettings(node),
                node.mode.value,
                drop_policy=node.dropPolicy.value,
                every_nth=int(node.everyNth),
                target_points=bool(node.showTargetPoints),
                status_callback=self._onStatus,
            )
        node.outputSegmentation = controller.output_node
        self._syncRunState()

    def _onStatus(self, message) -> None:
        if self._parameterNode is not None:
            self._parameterNode.statusMessage = message

    def _syncRunState(self) -> None:
        """Copy the controller's state (running, stopped, finished, failed) into the parameter node."""
        node, controller = self._parameterNode, self.controller
        if node is None or controller is None or controller.session is None:
            return
        state = controller.state.value
        node.runState = {"running": RunState.RUNNING, "error": RunState.FAILED}.get(state, RunState.STOPPED)
        node.statusMessage = controller.status_message

    def processPending(self, wait=None) -> int:
        """The timer's work (`SessionController.step`): 1 when a result was written. ``wait``: seconds
        to wait for a frame in flight (tests). Never raises for a frame's failure."""
        written = self.controller.step(wait) if self.controller is not None else False
        self._syncRunState()
        return 1 if written else 0

    def processOnce(self, parameterNode):
        """Process the input's current frame once; returns the `HostResult` (RuntimeError if not)."""
        self._parameterNode = node = parameterNode
        controller = self._controller()
        result = controller.process_once(
            node.inputVolume, node.outputSegmentation, *self._pipelineSettings(node)
        )
        node.outputSegmentation = controller.output_node
        self._syncRunState()
        return result

    def stop(self, reason=None) -> None:
        """Stop processing (if running); ``reason`` becomes the status message."""
        if self.controller is not None:
            self.controller.stop(reason)
            self._syncRunState()

    @property
    def lastResult(self):
        return self.controller.last_result if self.controller is not None else None

    def indicatorTexts(self):
        """Panel text, status light (style sheet, tooltip) and corner line; None before any start."""
        return self.controller.indicator_texts() if self.controller is not None else None


#
# Test
#


class UltramotionIGTTest(ScriptedLoadableModuleTest):
    """The module's self-test: every ``test_*`` method, each after `setUp` (a cleared scene).

    ``test_ParameterNode`` and ``test_DependencyCheck`` need no PyTorch; ``test_LiveSyntheticStream``
    drives the logic step by step on a synthetic ultrasound stream and checks the segments (skipped
    while dependencies are missing). Outside Slicer, Testing/test_slicer_module.py runs these methods
    with Slicer's own Python layer over slicer-core.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_ParameterNode(self):
        self.delayDisplay("Parameter node: defaults, every field written and read back")
        logic = UltramotionIGTLogic()
        node = logic.getParameterNode()
        self.assertIsNone(node.inputVolume)
        self.assertIsNone(node.outputSegmentation)
        self.assertEqual(node.runState, RunState.IDLE)
        self.assertEqual(node.mode, Mode.LIVE)
        scalar = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "US image")
        vector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "US image RGB")
        for volume in (vector, scalar, None):
            node.inputVolume = volume
            self.assertIs(node.inputVolume, volume)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        node.outputSegmentation = segmentation
        self.assertIs(node.outputSegmentation, segmentation)
        node.scoreThreshold = 0.55
        self.assertAlmostEqual(node.scoreThreshold, 0.55)
        node.samType = SamType.VIT_B
        self.assertEqual(logic.getParameterNode().samType, SamType.VIT_B)  # one node per scene

        self.delayDisplay("A run state without a running session (e.g. from a saved scene) is reset")
        node.runState = RunState.RUNNING
        node.statusMessage = "Processing"
        node = logic.getParameterNode()
        self.assertEqual(node.runState, RunState.IDLE)
        self.assertEqual(node.statusMessage, "")

        self.delayDisplay("Settings read only at start are the ones disabled while running")
        self.assertEqual(
            PARAMETERS_READ_AT_START | PARAMETERS_APPLIED_WHILE_RUNNING | PARAMETERS_REPORTED_BY_THE_LOGIC,
            set(UltramotionIGTParameterNode.allParameters),
        )
        self.assertIn("inputVolume", PARAMETERS_READ_AT_START)
        self.assertNotIn("showCornerAnnotation", PARAMETERS_READ_AT_START)

    def test_DependencyCheck(self):
        self.delayDisplay("Dependency check: installed versions are compared with the requirements")
        dependencies = UltramotionIGTLogic().dependencies
        self.assertEqual(slicerVersionProblem(), "")
        from importlib.metadata import version

        installed = version("packaging")  # part of Slicer's Python; the check itself uses it
        self.assertEqual(dependencies.unsatisfiedRequirements([f"packaging>={installed}"]), [])
        (outdated,) = dependencies.unsatisfiedRequirements([f"packaging>{installed}"])
        self.assertEqual((outdated.name, outdated.installed), ("packaging", installed))
        (absent,) = dependencies.unsatisfiedRequirements(["ultramotion-igt-no-such-package>=1"])
        self.assertIsNone(absent.installed)
        self.assertIn("not installed", absent.describe())
        # The library's own list: whatever is unsatisfied is what the check reports
        unmet = dependencies.unsatisfiedRequirements()
        try:
            dependencies.check()
            self.assertEqual(unmet, [])
        except InstallError as error:
            self.assertEqual(error.missing, [m.describe() for m in unmet])

    def _models(self, logic):
        """Shipped demo models if present, else small random models written in the real formats."""
        detector, sam = logic.demoModelPaths()
        if detector is not None and sam is not None:
            return detector, sam, SamType.AUTO, True
        from UltramotionIGTLib.core.detector import write_random_detector
        from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

        folder = Path(slicer.app.temporaryPath) / "UltramotionIGTTest"
        detector = write_random_detector(folder / "detector", image_size=128, seed=0)
        sam = write_random_sam_checkpoint(folder / "sam" / "sam.safetensors", model_type="vit_t_demo", seed=0)
        return Path(detector), Path(sam), SamType.VIT_T_DEMO, False

    def test_LiveSyntheticStream(self):
        logic = UltramotionIGTLogic()
        try:
            logic.dependencies.check()
        except InstallError as error:
            self.skipTest(f"dependencies missing: {error}")
        from UltramotionIGTLib.slicer import mrml
        from UltramotionIGTLib.tools.phantom import PhantomStream

        self.delayDisplay("Synthetic stream with rotated axes, anisotropic spacing and an offset origin")
        stream = PhantomStream(seed=3, n_frames=8)
        geometry = mrml.FrameGeometry.from_spacing_origin_directions(
            (0.2, 0.3, 1.0),
            (12.0, -40.0, 7.5),
            ((0, 1, 0), (-1, 0, 0), (0, 0, 1)),
            stream.frame(0).image.shape,
        )
        volume = mrml.new_volume_node(slicer.mrmlScene, stream.frame(0).image, geometry, name="US image")
        detector, sam, samType, trained = self._models(logic)

        parameterNode = logic.getParameterNode()
        parameterNode.inputVolume = volume
        parameterNode.detectorFolder = detector
        parameterNode.samCheckpoint = sam
        parameterNode.samType = samType
        parameterNode.device = Device.CPU
        parameterNode.mode = Mode.LIVE
        parameterNode.dropPolicy = DropPolicy.NEWEST
        # random test models score low: segment whatever they propose, the geometry check still holds
        parameterNode.scoreThreshold = 0.3 if trained else 0.0

        logic.start(parameterNode)
        self.assertEqual(parameterNode.runState, RunState.RUNNING)
        segmentation = parameterNode.outputSegmentation
        self.assertIsNotNone(segmentation)

        self.delayDisplay("A producer faster than inference: two new frames per step, newest processed")
        for step in range(3):
            newest = 2 * step + 2
            for k in (newest - 1, newest):
                mrml.write_frame_to_volume(volume, stream.frame(k).image)
            # the newest frame's copy goes to the worker thread; wait for its result to be written
            self.assertEqual(logic.processPending(wait=120), 1)
            self.assertEqual(logic.lastResult.frame_index, newest)
            self._checkSegments(segmentation, volume, logic.lastResult)
            if trained:
                self._checkContent(logic.lastResult, stream.frame(newest))
        session = logic.controller.session
        self.assertEqual(session.frames_received, 7)
        self.assertEqual(session.frames_processed, 3)
        self.assertEqual(session.frames_dropped, 4)
        texts = logic.indicatorTexts()
        self.assertIn("3 processed", texts["panel"])
        self.assertIn("drop 4", texts["corner"])

        self.delayDisplay("Deleting the input stops processing with a status, no exception")
        slicer.mrmlScene.RemoveNode(volume)
        self.assertEqual(logic.processPending(), 0)
        self.assertEqual(parameterNode.runState, RunState.STOPPED)
        self.assertIn("removed", parameterNode.statusMessage)
        self.delayDisplay(
            "Test passed: newest frames processed, drops counted, segments equal the "
            "pipeline's masks voxel by voxel on the input's IJK-to-RAS grid"
        )

    def _checkSegments(self, segmentationNode, volumeNode, result):
        """Each segment of the result (one per tracked target, one per class for its untracked
        detections) has the voxels of its mask, on the volume's IJK-to-RAS grid."""
        import numpy as np

        segments = result.segments()
        names = [segment[0] for segment in segments]
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(sorted(segmentation.GetSegmentIDs()), sorted(names))
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        for name, _color, mask in segments:
            labelmap = segmentation.GetSegment(name).GetRepresentation("Binary labelmap")
            imageToWorld = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(imageToWorld)
            for i in range(4):
                for j in range(4):
                    self.assertAlmostEqual(imageToWorld.GetElement(i, j), ijkToRas.GetElement(i, j), places=6)
            voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, name)
            np.testing.assert_array_equal(voxels.reshape(mask.shape) > 0, mask)

    def _checkContent(self, result, truth):
        """With the trained demo models: every true vessel is found (mask Dice >= 0.5)."""
        import numpy as np

        from UltramotionIGTLib.tools.phantom import VESSEL_LABEL

        self.assertEqual(len(truth.labels), len(truth.masks))
        for label, mask in zip(truth.labels, truth.masks):
            if int(label) != VESSEL_LABEL:
                continue
            dice = [
                2.0 * np.logical_and(result.masks[row], mask).sum() / (result.masks[row].sum() + mask.sum())
                for row in range(len(result))
            ]
            self.assertGreaterEqual(max(dice, default=0.0), 0.5)
