"""``ultramotion-igt train {detector,sam}``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

TRAINERS = {
    "detector": ("UltramotionIGTLib.tools.training.detector", "small D-FINE on the phantom (vessel, needle)"),
    "sam": (
        "UltramotionIGTLib.tools.training.sam",
        "small SAM on the phantom, box prompts from ground truth",
    ),
}


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] not in TRAINERS:
        print("usage: ultramotion-igt train {detector,sam} --out DIR [options]\n")
        for name, (_, help_) in TRAINERS.items():
            print(f"  {name:<9} {help_}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    return int(importlib.import_module(TRAINERS[args[0]][0]).main(args[1:]) or 0)
