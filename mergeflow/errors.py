"""Errors a user can act on. The CLI prints them as one line and exits 2."""

from __future__ import annotations


class MergeflowError(Exception):
    """Base class for every error caused by bad input or configuration."""


class CheckpointError(MergeflowError):
    """A checkpoint (or the base) cannot be read or does not fit the base."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"checkpoint {source}: {problem}")


class CheckpointChanged(CheckpointError):
    """A checkpoint's files changed between listing and reading. Not a bad checkpoint: it is
    skipped, and listed again with its new digest."""


class StateError(MergeflowError):
    """A saved merge state is missing, corrupt or does not fit the request."""


class ConfigError(MergeflowError):
    """A method, parameter or lineage setting is invalid."""


class ServiceUnavailable(ConfigError):
    """A service (S3, MLflow, Prefect) did not answer. Maybe a wrong endpoint, maybe a restart:
    IO tasks retry it (``tasks/retry.py``), and it fails with the same message after that."""


class LearningError(MergeflowError):
    """A method that learns from calibration data diverged (a non-finite loss or coefficient).

    The fold turns it into a :class:`CheckpointError` of the checkpoint being folded, so a
    lineage registers that checkpoint as rejected with this reason."""
