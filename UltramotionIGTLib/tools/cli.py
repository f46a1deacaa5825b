"""``ultramotion-igt`` command line: one dispatcher, each command implemented beside its subject.

Every command is a ``main(argv) -> int`` in its own module, imported only when used, so that
``ultramotion-igt --help`` is instant. Errors caused by the user (`UltramotionError`) print one
clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("UltramotionIGTLib.tools.run:main", "run the pipeline on a recording, image or array file"),
    "make-test-models": (
        "UltramotionIGTLib.tools.run:make_test_models_main",
        "write small random-weight models in the real checkpoint formats",
    ),
    "train": (
        "UltramotionIGTLib.tools.training.cli:main",
        "train the small demo models on the synthetic phantom",
    ),
    "evaluate": (
        "UltramotionIGTLib.tools.evaluate:main",
        "held-out phantom metrics: AP50, SAM Dice, end-to-end Dice",
    ),
    "evaluate-visibility": (
        "UltramotionIGTLib.tools.visibility_eval:main",
        "visibility states vs the phantom's ground truth on sequences with events",
    ),
    "models": ("UltramotionIGTLib.models.packs:main", "model packs: list | verify | import PACK"),
    "demo": (
        "UltramotionIGTLib.tools.demo:main",
        "run a synthetic sequence through the pipeline with the demo models",
    ),
    "bench": ("UltramotionIGTLib.tools.bench:main", "benchmarks: side-by-side ratios from one run"),
    "audit": ("UltramotionIGTLib.tools.audit.cli:main", "static (AST) and runtime GPU->CPU transfer audit"),
    "doctor": ("UltramotionIGTLib.tools.doctor:main", "pre-flight check of torch, CUDA and model files"),
}

EXIT_USER_ERROR = 2


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ultramotion-igt COMMAND [options]   (ultramotion-igt COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_USER_ERROR
    if args[0] == "--version":
        from UltramotionIGTLib import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ultramotion-igt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    from UltramotionIGTLib.errors import UltramotionError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UltramotionError as exc:
        print(f"ultramotion-igt {name}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"ultramotion-igt {name}: interrupted", file=sys.stderr)
        return 130
