"""Error types. Every error a user can cause derives from `UltramotionError`.

The CLI turns these into one clear message and a non-zero exit code (no traceback); the Slicer
module shows them through `slicer.util.tryWithErrorDisplay`.
"""


class UltramotionError(Exception):
    """Base class for errors caused by input, environment or configuration (not by a bug)."""


class UsageError(UltramotionError, ValueError):
    """Command-line options that do not go together (e.g. ``--sam`` without ``--detector``)."""


class InputFileError(UltramotionError, ValueError):
    """An input file is missing, of the wrong kind, truncated or corrupt. The message names the file."""


class UnsupportedImageTypeError(UltramotionError, ValueError):
    """The data is not an image we segment (e.g. RF ultrasound data, wrong pixel type)."""


class SettingsError(UltramotionError, ValueError):
    """A pipeline setting is out of range for the models loaded (e.g. more prompts than detector queries)."""


class CheckpointError(UltramotionError, ValueError):
    """A model checkpoint is missing, corrupt, of the wrong format or does not match its config."""


class DeviceUnavailableError(UltramotionError, RuntimeError):
    """A device was asked for (e.g. CUDA) but is not available on this machine."""


class MissingExtensionError(UltramotionError, RuntimeError):
    """A 3D Slicer extension that the chosen mode needs is not installed (the message names it)."""
