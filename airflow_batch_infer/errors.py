"""The package's errors: :class:`BatchInferError` for all of them, and :class:`BatchInferFailure` for those
that a retry cannot fix (bad input, a mapping the model does not take, a table that does not fit, a model
that is unknown or fails to load).

A :class:`BatchInferFailure` is an ``AirflowFailException``: the task fails at once, without its retries,
so a mapped chunk does not retry the same error while the server waits. Transient errors (a server that
stays unavailable, a timeout) are plain :class:`BatchInferError` or other exceptions, and retry.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException


class BatchInferError(Exception):
    """Base of every error this package raises on purpose."""


class BatchInferFailure(BatchInferError, AirflowFailException):
    """An error that a retry cannot fix: the task fails without retrying; the message says what to do."""


class StagingError(BatchInferFailure, ValueError):
    """The input cannot be staged; the message says what is wrong with it."""


class SourceChangedError(StagingError):
    """A file pinned by the run's snapshot changed after the stage task: its chunk cannot be scored."""


class ContractError(BatchInferFailure, ValueError):
    """The declared column → tensor mapping does not fit the data or the model served."""


class UnknownModelError(BatchInferFailure, RuntimeError):
    """The model is not in the repository or not on the server; the message lists the models there."""


class ModelLoadError(BatchInferFailure, RuntimeError):
    """The server could not load the model (its config or files are wrong); the message carries the
    server's own error lines."""


#: What a failed start's message says when a model, not the server, is at fault: its load failed (the
#: server's ``failed to load 'm'``, the index's ``UNAVAILABLE`` reason), it is not in the repository, or
#: the repository cannot serve it. A port clash or a timeout says none of these, and retries.
MODEL_FAILURE_HINTS = (
    "failed to load",
    "is not in the server's model repository",
    "] are not in ",  # the local runtime's "Models [...] are not in <repository>"
    "cannot parse",
    "cannot serve model",
    "is missing from the model repository",
    "has no version folder",
)


def model_load_failure(message: str) -> ModelLoadError | None:
    """A :class:`ModelLoadError` with ``message`` when a failed start's message blames a model, else
    ``None`` (the start may succeed on a retry).

    :param message: the start failure's message, with the server's own error lines.
    """
    text = message.lower()
    return ModelLoadError(message) if any(hint in text for hint in MODEL_FAILURE_HINTS) else None
