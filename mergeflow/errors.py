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


class StateError(MergeflowError):
    """A saved merge state is missing, corrupt or does not fit the request."""


class ConfigError(MergeflowError):
    """A method, parameter or lineage setting is invalid."""
