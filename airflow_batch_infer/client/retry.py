"""Which Triton errors are worth retrying, and the retry policy (tenacity) that the client applies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tritonclient.utils import InferenceServerException

T = TypeVar("T")

# The server is away, overloaded or slow: the same request may well succeed later.
TRANSIENT_STATUSES = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}
)
# The request itself is wrong (a bad row): retrying cannot help; its rows are set aside.
BAD_INPUT_STATUSES = frozenset({"StatusCode.INVALID_ARGUMENT"})
# Triton answers UNAVAILABLE to a call of a restricted API without the server's key: no retry brings it.
RESTRICTED_API = "restricted, expecting header"


def error_status(error: BaseException) -> str | None:
    """The gRPC status of a Triton client error (``StatusCode.UNAVAILABLE``, ...), else ``None``."""
    if isinstance(error, InferenceServerException):
        return error.status()
    return None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a fault of the moment (server away, overloaded, slow); a call refused for a
    missing restricted-API key is not, though Triton answers it ``UNAVAILABLE``."""
    if error_status(error) not in TRANSIENT_STATUSES:
        return False
    return RESTRICTED_API not in (error.message() or "")


def is_bad_input(error: BaseException) -> bool:
    """Whether the server refused the request's data (the rows, not the server, are at fault)."""
    return error_status(error) in BAD_INPUT_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a request that fails with a transient error.

    :param max_attempts: attempts per request, the first included.
    :param max_delay: give up on a request after this many seconds of retrying.
    :param initial_wait: first backoff, in seconds; it doubles, with jitter.
    :param max_wait: longest single backoff, in seconds.
    """

    max_attempts: int = 6
    max_delay: float = 120.0
    initial_wait: float = 0.5
    max_wait: float = 20.0

    async def call(
        self,
        request: Callable[[], Awaitable[T]],
        logger: logging.Logger,
        what: str,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """Await ``request()``, retrying transient errors with backoff; other errors pass through at once.

        The first attempt runs outside tenacity, so that the requests that succeed (nearly all of them)
        pay nothing for the retry machinery.

        :param request: makes and awaits one attempt.
        :param logger: where each retry is logged, with its cause.
        :param what: the request, as the log should name it.
        :param on_retry: called before each retry (to count them).
        """
        try:
            return await request()
        except InferenceServerException as error:
            if not is_transient(error) or self.max_attempts <= 1:
                raise
            self._log_retry(logger, what, 1, error, self.initial_wait)
        if on_retry:
            on_retry()
        await asyncio.sleep(self.initial_wait)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self._log_retry(logger, what, state.attempt_number + 1, error, wait)
            if on_retry:
                on_retry()

        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.max_attempts - 1) | stop_after_delay(self.max_delay),
            wait=wait_exponential(multiplier=self.initial_wait * 2, max=self.max_wait)
            + wait_random(0, self.initial_wait),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(request)

    def _log_retry(
        self, logger: logging.Logger, what: str, attempt: int, error: BaseException | None, wait: float
    ) -> None:
        logger.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.1f s",
            what,
            attempt,
            self.max_attempts,
            error,
            wait,
        )
