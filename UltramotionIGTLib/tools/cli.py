"""``ultramotion-igt``: one argparse tree over every command (also ``python -m UltramotionIGTLib``).

Each command lives beside its subject as two functions in its module: ``configure(parser)`` adds the
command's options, ``run(args) -> int`` does the work and returns the exit status. A module that
serves several commands suffixes both with the command's name (``configure_verify``/``run_verify``).
`COMMANDS` wires them into the tree; options several commands share come from `tools.options`.

A command's module is imported, and its ``configure`` called, only when that command is parsed
(`CommandParser`), so ``ultramotion-igt --help`` and ``ultramotion-igt run --help`` import neither
torch nor transformers; command modules import them inside ``run``.

The error contract, decided here and nowhere else (docs/errors_and_intensity.md):

- exit 0, or 1 for a negative verdict (a failed doctor check, ``evaluate --strict`` under a bar, audit
  findings with ``--fail-on``): what the command's ``run`` returns;
- exit 2 for bad input: a usage error (argparse's message) or an `UltramotionError` (bad file,
  option combination, model file, device, output folder): ``ultramotion-igt CMD: error: <one line>``
  on stderr, no traceback. Commands raise these before any heavy work where they can (paths,
  options and model files are checked before models load);
- exit 130 on Ctrl-C (``ultramotion-igt CMD: interrupted``; a run's outputs are then marked partial);
- exit 141 when the reader of stdout went away (``audit | head -1``): quietly, as a killed pipe;
- any other exception is a bug: its traceback, then one line saying so (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "ultramotion-igt"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a C tool whose reader went away
EXIT_BUG = 1


@dataclass(frozen=True)
class Command:
    """One node of the tree: a command (``module`` with ``configure{suffix}``/``run{suffix}``) or a
    group of ``children`` (whose ``module``, if any, gives the group's own options by ``configure``)."""

    name: str
    help: str
    module: str = ""
    suffix: str = ""
    children: tuple[Command, ...] = ()

    def function(self, kind: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), f"{kind}{self.suffix}")


_LIB = "UltramotionIGTLib"
COMMANDS: tuple[Command, ...] = (
    Command("run", "run the pipeline on a recording, image or array file", f"{_LIB}.tools.run"),
    Command(
        "demo",
        "a held-out synthetic phantom sequence through the pipeline, Dice vs truth",
        f"{_LIB}.tools.demo",
    ),
    Command(
        "evaluate", "held-out phantom metrics: AP50, SAM Dice, end-to-end Dice", f"{_LIB}.tools.evaluate"
    ),
    Command(
        "evaluate-visibility",
        "visibility states vs the phantom's ground truth on sequences with events",
        f"{_LIB}.tools.visibility_eval",
    ),
    Command(
        "train",
        "train the small demo models on the synthetic phantom",
        children=(
            Command("detector", "small D-FINE (vessel, needle)", f"{_LIB}.tools.training.detector"),
            Command("sam", "small SAM (vit_t_demo), ground-truth box prompts", f"{_LIB}.tools.training.sam"),
        ),
    ),
    Command(
        "models",
        "model packs: list, verify, import, manifest, make; original D-FINE checkpoints: import-dfine",
        f"{_LIB}.models.packs",
        children=tuple(
            Command(name, help_, f"{_LIB}.models.packs", f"_{name}")
            for name, help_ in (
                ("list", "list the shipped and installed packs"),
                ("verify", "check every file of a pack against its manifest (sha256)"),
                ("import", "verify a pack (folder or .zip) and install it into the user pack folder"),
                ("manifest", "write DIR/manifest.json for the models in DIR"),
                ("make", "build a pack (folder or .zip) from a D-FINE folder and a SAM checkpoint"),
            )
        )
        + (
            Command(
                "import-dfine",
                "convert an original D-FINE checkpoint (.pt/.pth) into a detector folder",
                f"{_LIB}.models.dfine_original",
            ),
        ),
    ),
    Command(
        "bench",
        "benchmarks: side-by-side ratios from one run",
        children=(
            Command("pipeline", "legacy path vs GPU-resident path", f"{_LIB}.tools.benchmarks.pipeline"),
            Command(
                "sam", "official SamPredictor loop vs batched box prompts", f"{_LIB}.tools.benchmarks.sam"
            ),
            Command("matcher", "torch assignment solver vs scipy", f"{_LIB}.tools.benchmarks.matcher"),
            Command(
                "mrml", "per-frame segmentation node update (slicer-core)", f"{_LIB}.tools.benchmarks.mrml"
            ),
            Command(
                "gateway",
                "OpenIGTLink gateway round trip vs the in-process pipeline",
                f"{_LIB}.tools.benchmarks.gateway",
            ),
            Command(
                "slicer",
                "main-thread time of the threaded live session vs the pipeline (slicer-core)",
                f"{_LIB}.tools.benchmarks.slicer_live",
            ),
            Command(
                "soak",
                "a long phantom run through run's frame loop: memory at start vs end, every frame kept",
                f"{_LIB}.tools.benchmarks.soak",
            ),
        ),
    ),
    Command(
        "serve",
        "OpenIGTLink gateway: PLUS (or --replay FILE) in, label maps to Slicer out",
        f"{_LIB}.services.gateway",
    ),
    Command("audit", "static (AST) and runtime GPU->CPU transfer audit", f"{_LIB}.tools.audit.cli"),
    Command("doctor", "pre-flight check of torch, CUDA, the GPU and the model files", f"{_LIB}.tools.doctor"),
    Command(
        "make-test-models",
        "write small random-weight models in the real checkpoint formats",
        f"{_LIB}.tools.run",
        "_make_test_models",
    ),
)


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that adds its command's options on first use.

    ``command``: the `Command` whose ``configure`` fills this parser; ``path``: the command's words
    (``"models verify"``), stored in the namespace as ``_command`` for error messages. A command's
    parser stores its ``run`` function as ``_run``.
    """

    def __init__(self, *args: Any, command: Command | None = None, path: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node = command
        self._path = path
        self._configured = False
        if command is not None and command.children:
            sub = self.add_subparsers(title="commands", metavar="COMMAND", dest="_subcommand", required=True)
            for child in command.children:
                _add_command(sub, child, f"{path} {child.name}".strip())

    def configure(self) -> None:
        """Add the command's options (imports its module); idempotent."""
        if self._configured or self._node is None:
            return
        self._configured = True
        command = self._node
        if command.module:
            command.function("configure")(self)
        if not command.children:
            self.set_defaults(_run=command.function("run"), _command=self._path)

    def configure_all(self) -> None:
        """Configure this parser and every parser under it (the whole tree; imports every module)."""
        self.configure()
        for action in self._subparsers._group_actions if self._subparsers else ():
            for child in action.choices.values():
                child.configure_all()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.configure()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._node is not None and not self._node.children:
            # a command reports its own unknown options (argparse would leave them to the top parser,
            # whose usage line does not show the command's options)
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras

    def format_help(self) -> str:
        self.configure()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        """A usage error is ONE line on stderr and exit 2 (the error contract), pointing at ``--help``
        instead of argparse's usage block."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def format_usage(self) -> str:
        self.configure()
        return super().format_usage()


def _add_command(sub: Any, command: Command, path: str) -> None:
    sub.add_parser(
        command.name,
        help=command.help,
        description=command.help,
        command=command,
        path=path,
    )


ROOT = Command(
    PROG,
    "GPU-resident detection (D-FINE) and box-prompted segmentation (SAM) on ultrasound: the command "
    f"line of the UltramotionIGT Slicer extension's library. '{PROG} COMMAND --help' describes a command.",
    children=COMMANDS,
)


def build_parser() -> CommandParser:
    """The whole tree. Commands' options are added when a command is parsed (`CommandParser`);
    call ``configure_all()`` on the result to add them all at once."""
    from UltramotionIGTLib import __version__

    parser = CommandParser(prog=PROG, description=ROOT.help, command=ROOT)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit status (module doc)."""
    from UltramotionIGTLib.errors import UltramotionError

    command = PROG
    try:
        try:
            args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as exc:  # --help, --version (0) and argparse's usage errors (2, message printed)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        command = f"{PROG} {args._command}"
        status = int(args._run(args))
        sys.stdout.flush()  # inside the try: a reader that went away is reported here, not at exit
        return status
    except UltramotionError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - the contract: anything else is a bug, and says so
        import traceback

        traceback.print_exc()
        print(
            f"{command}: internal error ({type(exc).__name__}): this is a bug in UltramotionIGT, not a "
            "problem with your input; please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_BUG


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe
    (the recipe of Python's signal documentation, "Note on SIGPIPE")."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured in tests)
        pass
