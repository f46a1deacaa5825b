"""UltramotionIGTLib: the Qt-free library under the UltramotionIGT Slicer extension.

GPU-resident real-time pipeline for live ultrasound:
frame -> D-FINE detector -> GPU Hungarian matcher / tracker -> SAM box-prompted segmentation
-> ResultPacket (device tensors) -> one device-to-host copy at the edge.

Submodules are imported lazily so that `import UltramotionIGTLib` stays cheap (no torch import).
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("vessel", "needle", "bone")
