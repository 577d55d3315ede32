"""The ``mergeflow`` command line: engine commands here, pipeline and stack commands beside."""

from mergeflow.cli.main import main

__all__ = ["main"]
