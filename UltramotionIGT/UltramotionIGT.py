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
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Python packages the library needs besides torch/torchvision (those come from the PyTorch extension).
REQUIREMENTS = (
    ("transformers", "transformers>=4.50"),
    ("safetensors", "safetensors>=0.4"),
    ("segment_anything", "segment-anything==1.0"),
    ("scipy", "scipy>=1.10"),
    ("nrrd", "pynrrd>=1.0"),
)
TORCH_REQUIREMENT = ">=2.1"
#: Pacing of the frame loop: the widget's timer asks the logic for pending work this often.
TIMER_INTERVAL_MS = 10
#: The KPI panel and status light are refreshed at most this often (the corner line: every frame).
INDICATOR_INTERVAL_MS = 250


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
        self.parent.contributors = ["UltramotionIGT team"]
        self.parent.helpText = _("""
Real-time detection (D-FINE) and segmentation (SAM, prompted by the detected boxes) of vessels and
needles on live ultrasound, GPU-resident from frame to mask.
<ul>
<li><b>Input volume</b>: the live image (OpenIGTLink, or a sequence browser's proxy volume).</li>
<li><b>Start</b> processes frames as they arrive; frames that arrive while one is being processed
are dropped and counted (newest frame first), so the display never lags behind a queue.
<b>Replay</b> mode processes every frame of a sequence into a segmentation sequence.</li>
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

    def label(self):
        return _("Live (newest frame)") if self is Mode.LIVE else _("Replay (every frame of a sequence)")


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
    mode - live (newest frame, drops counted) or replay (every frame of a sequence).
    dropPolicy / everyNth - how live mode keeps up with a fast producer.
    showTargetPoints - also write each target's weighted centroid to a markups node.
    showCornerAnnotation - a one-line KPI summary in the slice view.
    runState / statusMessage - what the logic is doing (written by the logic, shown by the widget).
    """

    # typing.Union: parameterNodeWrapper before Slicer 5.10 does not accept PEP 604 unions
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]  # noqa: UP007
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
    runState: RunState = RunState.IDLE
    statusMessage: str = ""


#
# Errors
#


class InstallError(RuntimeError):
    """Python packages are missing or were just installed.

    ``missing``: pip requirement strings still to install (``"torch"`` stands for the PyTorch
    extension's install). ``restartRequired``: packages were updated that this Slicer session had
    already imported; restart before use.
    """

    def __init__(self, message, missing=(), restartRequired=False):
        super().__init__(message)
        self.missing = list(missing)
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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
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
        self.removeObservers()

    def enter(self) -> None:
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

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: UltramotionIGTParameterNode | None) -> None:
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
        hasInput = bool(node and node.inputVolume)
        self.ui.startStopButton.enabled = hasInput or running
        self.ui.startStopButton.text = _("Stop") if running else _("Start")
        self.ui.startStopButton.toolTip = (
            _("Stop processing")
            if running
            else _("Start processing frames as they arrive")
            if hasInput
            else _("Select an input volume first")
        )
        self.ui.applyButton.enabled = hasInput and not running
        for widget in (
            self.ui.inputSelector,
            self.ui.modeComboBox,
            self.ui.detectorPathLineEdit,
            self.ui.samPathLineEdit,
            self.ui.samTypeComboBox,
            self.ui.deviceComboBox,
        ):
            widget.enabled = not running

    # -- dependencies: the widget asks, the logic installs -----------------------------------------

    def _ensureDependencies(self) -> bool:
        """True when the libraries can be used now. Asks before installing anything."""
        try:
            self.logic.checkDependencies()
            return True
        except InstallError as error:
            question = _(
                "UltramotionIGT needs these Python packages, which are not installed yet:\n\n{missing}\n\n"
                "{torchNote}Install them now? This downloads several hundred MB and can take minutes."
            ).format(
                missing="\n".join(error.missing),
                torchNote=_("PyTorch is installed through the PyTorch extension.\n\n")
                if "torch" in error.missing
                else "",
            )
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install dependencies")):
                self._parameterNode.statusMessage = _("Dependencies not installed: processing cannot start")
                return False
        import traceback

        failure = None
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            self.logic.installDependencies()
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
        if not self._ensureDependencies():
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
        """Write ``text`` in the lower-right corner of the slice views showing the input volume."""
        for view in self._cornerViews:
            view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.LowerRight, "")
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
                view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.LowerRight, text)
                view.scheduleRender()
                self._cornerViews.append(view)

    def _showOutput(self) -> None:
        node = self._parameterNode
        if node.inputVolume:
            slicer.util.setSliceViewerLayers(background=node.inputVolume, fit=False)
        if node.outputSegmentation and node.outputSegmentation.GetDisplayNode():
            node.outputSegmentation.GetDisplayNode().SetVisibility(True)


#
# Logic
#


class UltramotionIGTLogic(ScriptedLoadableModuleLogic):
    """The computation, usable from the Python console or another module without the widget.

    It imports torch and the library only when a method needs them, after `checkDependencies`. It
    never opens a dialog: missing packages raise `InstallError` (the caller decides whether to
    install), problems with inputs raise the library's `UltramotionError` types with a message
    that says what to do.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.controller = None  # the library's SessionController, made after the dependency check
        self._parameterNode = None

    def getParameterNode(self):
        node = UltramotionIGTParameterNode(super().getParameterNode())
        self.setDefaultModelPaths(node)
        return node

    # -- where things are --------------------------------------------------------------------------

    @staticmethod
    def moduleDir() -> Path:
        return Path(__file__).resolve().parent

    @staticmethod
    def libraryParentDir() -> Path | None:
        """The folder that holds ``UltramotionIGTLib/``: the module's own folder once installed
        (both sit in qt-scripted-modules), its parent in a source checkout."""
        here = UltramotionIGTLogic.moduleDir()
        for candidate in (here, here.parent):
            if (candidate / "UltramotionIGTLib" / "__init__.py").is_file():
                return candidate
        return None

    def demoModelPaths(self):
        """(detector folder, SAM checkpoint file) of the shipped demo models; None where absent.

        One place knows where they live, installed or in a checkout: the library's
        ``models.default_models`` (it imports no torch, so this works before the dependency check).
        """
        self.ensureLibraryImportable()
        from UltramotionIGTLib.models.packs import default_models

        found = default_models()
        return found["detector"], found["sam"]

    @staticmethod
    def _isUnset(path) -> bool:
        return path is None or str(path) in ("", ".")

    def setDefaultModelPaths(self, parameterNode) -> None:
        """Point empty model paths at the shipped demo models (so the user sees what is used)."""
        detector, sam = self.demoModelPaths()
        if self._isUnset(parameterNode.detectorFolder) and detector is not None:
            parameterNode.detectorFolder = detector
        if self._isUnset(parameterNode.samCheckpoint) and sam is not None:
            parameterNode.samCheckpoint = sam

    def ensureLibraryImportable(self) -> None:
        parent = self.libraryParentDir()
        if parent is not None and str(parent) not in sys.path:
            sys.path.insert(0, str(parent))

    # -- dependencies ------------------------------------------------------------------------------

    @staticmethod
    def _installed(importName) -> bool:
        import importlib.util

        return importlib.util.find_spec(importName) is not None

    def missingDependencies(self):
        """Requirement strings not satisfied now; ``"torch"`` means: install through PyTorch extension."""
        missing = []
        if not (self._installed("torch") and self._installed("torchvision")):
            missing.append("torch")
        missing += [
            requirement for importName, requirement in REQUIREMENTS if not self._installed(importName)
        ]
        return missing

    def checkDependencies(self) -> None:
        """Raise `InstallError` listing what is missing; return quietly when all is there."""
        self.ensureLibraryImportable()
        missing = self.missingDependencies()
        if missing:
            raise InstallError(_("Missing Python packages: {0}").format(", ".join(missing)), missing=missing)

    def installDependencies(self) -> None:
        """Install what is missing, without asking (the caller asked).

        torch/torchvision come from the PyTorch extension (``PyTorchUtils``), the rest from pip:
        ``slicer.packaging.pip_ensure`` on Slicer >= 5.11, ``slicer.util.pip_install`` before.
        Raises `InstallError` when something is still missing afterwards, or with
        ``restartRequired=True`` when an already imported package was replaced.
        """
        missing = self.missingDependencies()
        if not missing:
            return
        alreadyImported = [name for name, _req in REQUIREMENTS if name in sys.modules]
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise InstallError(
                    _(
                        "The PyTorch extension is not installed. Install 'PyTorch' from the Extension Manager, "
                        "restart Slicer, and try again."
                    ),
                    missing=missing,
                ) from error
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if (
                torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                is None
            ):
                raise InstallError(_("PyTorch was not installed."), missing=missing)
        packages = [requirement for requirement in missing if requirement != "torch"]
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
        still = self.missingDependencies()
        if still:
            raise InstallError(
                _("Installation did not complete; still missing: {0}").format(", ".join(still)), missing=still
            )
        if alreadyImported:
            raise InstallError(
                _(
                    "Packages that were already in use were updated ({0}). Restart Slicer before processing."
                ).format(", ".join(alreadyImported)),
                restartRequired=True,
            )

    # -- environment check -------------------------------------------------------------------------

    def checkEnvironment(self, parameterNode):
        """Run the library's pre-flight checks (same as ``ultramotion-igt doctor``).

        Returns (report text, ready). Works before torch is installed: it then says so.
        """
        self.ensureLibraryImportable()
        from UltramotionIGTLib.tools import doctor

        results = doctor.run_checks(
            device=parameterNode.device.value,
            detector_dir=None
            if self._isUnset(parameterNode.detectorFolder)
            else parameterNode.detectorFolder,
            sam_checkpoint=None
            if self._isUnset(parameterNode.samCheckpoint)
            else parameterNode.samCheckpoint,
            sam_type=parameterNode.samType.value,
        )
        return doctor.format_report(results), doctor.all_ok(results)

    # -- processing: the library's controller does the work ---------------------------------------

    def _controller(self):
        if self.controller is None:
            self.checkDependencies()
            from UltramotionIGTLib.slicer.controller import SessionController

            self.controller = SessionController()
        return self.controller

    def modelSource(self, parameterNode):
        """The node's models (empty paths: the shipped demo models) as a `ModelSource`."""
        from UltramotionIGTLib.models.source import ModelSource

        return ModelSource.from_paths(
            parameterNode.detectorFolder, parameterNode.samCheckpoint, parameterNode.samType.value
        )

    def pipelineConfig(self, parameterNode):
        from UltramotionIGTLib.core.pipeline import PipelineConfig

        return PipelineConfig(
            device=parameterNode.device.value,
            precision=parameterNode.precision.value,
            score_threshold=float(parameterNode.scoreThreshold),
            max_targets_per_class=int(parameterNode.maxTargets),
        )

    def start(self, parameterNode) -> None:
        """Start processing the node's input (live or replay) into its output segmentation (created
        when none is selected). The widget's timer (or a test's loop) then calls `processPending`."""
        controller = self._controller()
        self._parameterNode = parameterNode
        parameterNode.statusMessage = _("Loading models...")
        controller.start(
            parameterNode.inputVolume,
            parameterNode.outputSegmentation,
            self.modelSource(parameterNode),
            self.pipelineConfig(parameterNode),
            parameterNode.mode.value,
            drop_policy=parameterNode.dropPolicy.value,
            every_nth=int(parameterNode.everyNth),
            target_points=bool(parameterNode.showTargetPoints),
            status_callback=self._onStatus,
        )
        parameterNode.outputSegmentation = controller.output_node
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

    def processPending(self) -> int:
        """Process the pending frame (live: the newest that arrived; replay: the next). Returns 0 or 1;
        never raises for a frame's failure (runState FAILED and statusMessage say why)."""
        if self.controller is None:
            return 0
        processed = self.controller.step()
        self._syncRunState()
        return 1 if processed else 0

    def processOnce(self, parameterNode):
        """Process the input's current frame once; returns the `HostResult` (RuntimeError if not)."""
        controller = self._controller()
        self._parameterNode = parameterNode
        result = controller.process_once(
            parameterNode.inputVolume,
            parameterNode.outputSegmentation,
            self.modelSource(parameterNode),
            self.pipelineConfig(parameterNode),
        )
        parameterNode.outputSegmentation = controller.output_node
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
    """Drives the logic step by step on a synthetic ultrasound stream and checks the segments.

    The same scenario runs in pytest against slicer-core (Testing/test_module_scenario.py).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LiveSyntheticStream()

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
            logic.checkDependencies()
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
            self.assertEqual(logic.processPending(), 1)
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
        """Each target has a segment whose voxels are its mask, on the volume's IJK-to-RAS grid."""
        import numpy as np

        from UltramotionIGTLib.slicer.mrml import unique_segment_names

        names = unique_segment_names(result)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(sorted(segmentation.GetSegmentIDs()), sorted(names))
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        for row, name in enumerate(names):
            labelmap = segmentation.GetSegment(name).GetRepresentation("Binary labelmap")
            imageToWorld = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(imageToWorld)
            for i in range(4):
                for j in range(4):
                    self.assertAlmostEqual(imageToWorld.GetElement(i, j), ijkToRas.GetElement(i, j), places=6)
            voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, name)
            np.testing.assert_array_equal(voxels.reshape(result.masks[row].shape) > 0, result.masks[row])

    def _checkContent(self, result, truth):
        """With the trained demo models: every true vessel is found (mask Dice >= 0.5)."""
        import numpy as np

        from UltramotionIGTLib.tools.phantom import VESSEL_LABEL

        for label, mask in zip(truth.labels, truth.masks, strict=True):
            if int(label) != VESSEL_LABEL:
                continue
            dice = [
                2.0 * np.logical_and(result.masks[row], mask).sum() / (result.masks[row].sum() + mask.sum())
                for row in range(len(result))
            ]
            self.assertGreaterEqual(max(dice, default=0.0), 0.5)
