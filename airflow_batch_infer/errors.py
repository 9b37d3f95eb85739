"""The package's errors that a retry cannot fix: each names what is wrong and what to do."""

from __future__ import annotations


class StagingError(ValueError):
    """The input cannot be staged; the message says what is wrong with it."""


class SourceChangedError(StagingError):
    """A file pinned by the run's snapshot changed after the stage task: its chunk cannot be scored."""
