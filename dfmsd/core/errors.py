"""The project's error types, in one module that every layer may import.

A :class:`DfmsdError` is an input or set-up problem the user can fix. Stage commands
print its message on one line and exit with :data:`EXIT_CODE`, never with a traceback
(see :mod:`dfmsd.core.cli`).
"""

from __future__ import annotations

#: Exit status of a stage command that stopped on a DfmsdError (argparse uses 2 as well).
EXIT_CODE = 2


class DfmsdError(Exception):
    """Base class: a problem with the user's input, set-up or run, worded for the user."""


class ParamsError(DfmsdError):
    """params.yaml (or a preset) is invalid: the message names the key path."""


class DatasetError(DfmsdError):
    """A dataset or annotation file is missing or malformed: the message names the file."""


class CheckpointError(DfmsdError):
    """A checkpoint cannot be loaded or does not match its config: the message names the file."""


class DistillError(DfmsdError):
    """A distillation set-up or run that cannot give a meaningful result."""


class DownloadError(DfmsdError):
    """A download failed, or a file did not match its expected SHA-256."""


class TrainingDiverged(DistillError):
    """Training stopped: the loss or the gradient norm stayed non-finite."""
