"""GUI tests of the UltramotionIGT module inside Slicer: the .ui binds to the parameter node both
ways, buttons follow the run state, and "Check environment" reports. Run by ctest
(``py_UltramotionIGTWidgetTest``) or from the Python console:
``import UltramotionIGTWidgetTest; UltramotionIGTWidgetTest.runTests()``."""

import unittest

import slicer


class UltramotionIGTWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("UltramotionIGT")
        self.widget = slicer.modules.UltramotionIGTWidget
        self.node = self.widget.logic.getParameterNode()
        self.module = __import__("UltramotionIGT")

    def test_every_bound_widget_follows_the_parameter_node(self):
        ui = self.widget.ui
        node = self.node
        # parameter node -> widgets
        node.maxTargets = 7
        self.assertEqual(ui.maxTargetsSpinBox.value, 7)
        node.scoreThreshold = 0.55
        self.assertAlmostEqual(ui.scoreThresholdSliderWidget.value, 0.55, places=2)
        node.device = self.module.Device.CPU
        self.assertEqual(ui.deviceComboBox.currentText, self.module.Device.CPU.label())
        node.statusMessage = "hello"
        self.assertEqual(ui.statusLabel.text, "hello")
        # widgets -> parameter node
        ui.everyNthSpinBox.value = 5
        self.assertEqual(node.everyNth, 5)
        ui.modeComboBox.currentIndex = list(self.module.Mode).index(self.module.Mode.REPLAY)
        self.assertEqual(node.mode, self.module.Mode.REPLAY)
        ui.showTargetPointsCheckBox.checked = True
        self.assertTrue(node.showTargetPoints)
        # enum combo boxes list every choice, with labels
        self.assertEqual(ui.samTypeComboBox.count, len(self.module.SamType))
        self.assertEqual(ui.dropPolicyComboBox.count, len(self.module.DropPolicy))

    def test_buttons_follow_input_and_run_state(self):
        ui = self.widget.ui
        self.node.inputVolume = None
        self.assertFalse(ui.startStopButton.enabled)
        self.assertFalse(ui.applyButton.enabled)
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        self.node.inputVolume = volume
        self.assertTrue(ui.startStopButton.enabled)
        self.assertTrue(ui.applyButton.enabled)
        self.node.runState = self.module.RunState.RUNNING
        self.assertEqual(ui.startStopButton.text, "Stop")
        self.assertFalse(ui.applyButton.enabled)
        # settings read when processing starts are disabled, the live ones and the status are not
        for widget in (
            ui.inputSelector,
            ui.detectorPathLineEdit,
            ui.scoreThresholdSliderWidget,
            ui.everyNthSpinBox,
        ):
            self.assertFalse(widget.enabled, widget.name)
        self.assertTrue(ui.cornerAnnotationCheckBox.enabled)
        self.node.runState = self.module.RunState.STOPPED
        self.assertEqual(ui.startStopButton.text, "Start")
        self.assertTrue(ui.scoreThresholdSliderWidget.enabled)

    def test_default_models_point_at_the_shipped_demo_models(self):
        detector, sam = self.widget.logic.demoModelPaths()
        if detector is None or sam is None:
            self.skipTest("demo models not shipped in this build")
        self.assertEqual(str(self.node.detectorFolder), str(detector))
        self.assertEqual(str(self.node.samCheckpoint), str(sam))

    def test_check_environment_button_fills_the_report(self):
        try:
            self.widget.logic.dependencies.check()
        except self.module.InstallError as error:
            self.skipTest(f"dependencies missing: {error}")
        self.node.device = self.module.Device.CPU
        self.widget.ui.checkEnvironmentButton.click()
        report = self.widget.ui.environmentReportTextEdit.plainText
        self.assertIn("torch", report)
        self.assertIn("detector files", report)
        self.assertTrue(report.splitlines()[-1].startswith(("READY", "NOT READY")))


def runTests():
    suite = unittest.TestLoader().loadTestsFromTestCase(UltramotionIGTWidgetTest)
    return unittest.TextTestRunner(verbosity=2).run(suite)
