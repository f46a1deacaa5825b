"""``ultramotion-igt bench WHAT``: dispatch to the benchmark modules in `UltramotionIGTLib.tools.benchmarks`."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

#: benchmark -> (module with ``main(argv) -> int``, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "UltramotionIGTLib.tools.benchmarks.pipeline",
        "legacy CPU-hop path vs GPU-resident path, FPS",
    ),
    "matcher": (
        "UltramotionIGTLib.tools.benchmarks.matcher",
        "torch Hungarian solver vs scipy (+ host copy)",
    ),
    "sam": ("UltramotionIGTLib.tools.benchmarks.sam", "official SamPredictor loop vs batched box prompts"),
    "mrml": ("UltramotionIGTLib.tools.benchmarks.mrml", "per-frame segmentation node update (slicer-core)"),
    "gateway": (
        "UltramotionIGTLib.tools.benchmarks.gateway",
        "OpenIGTLink gateway round trip vs in-process pipeline, throughput",
    ),
}


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHMARKS:
        print("usage: ultramotion-igt bench {" + ",".join(BENCHMARKS) + "} [options]\n")
        for name, (_, help_) in BENCHMARKS.items():
            print(f"  {name:<9} {help_}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[args[0]][0])
    return int(module.main(args[1:]) or 0)
