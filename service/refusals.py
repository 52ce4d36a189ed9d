"""Why a request was not run: the batcher's and admission's own errors.

They know nothing of HTTP or gRPC (the batcher and admission may live in another
process than the protocols one day): each carries a ``reason`` (the
``kiln_rejected_requests`` label) and, where retrying later can help, the
estimated seconds until the engine's backlog drains (``retry_after_s``).
``service/errors.py`` maps them to a status, a ``Retry-After`` header and a gRPC
code, in one table with every other error.
"""

from __future__ import annotations


class Refused(Exception):
    """The request was not run, and nothing about it failed for good: the engine is
    overloaded or stopping. Retrying after ``retry_after_s`` (or on another replica)
    may succeed."""

    reason = "refused"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:  # keyword arguments survive pickling
        return (_rebuild, (type(self), self.message, self.retry_after_s))


def _rebuild(cls: type[Refused], message: str, retry_after_s: float) -> Refused:
    return cls(message, retry_after_s=retry_after_s)


class QueueFull(Refused):
    """The queue holds ``max_queue_size`` requests of this priority or higher."""

    reason = "queue_full"


class DeadlineUnmeetable(Refused):
    """Refused on arrival: the work queued ahead would finish after the request's deadline."""

    reason = "deadline_unmeetable"


class QueueTimeout(Refused):
    """The queue has not drained for a while (a standing queue), so its wait budget
    shrank to the target, and this request would wait (or waited) longer."""

    reason = "queue_timeout"


class Shed(Refused):
    """A queued lower-priority request dropped to make room for higher-priority work."""

    reason = "shed"


class Stopping(Refused):
    """The engine is being unloaded or the server is draining."""

    reason = "stopping"


class DeadlinePassed(Exception):
    """The request's own deadline passed, or would pass before its run ends, so it
    was dropped before it ran (never a partial or late answer)."""

    reason = "deadline"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
