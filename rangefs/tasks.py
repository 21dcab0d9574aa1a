"""Background tasks: started in one place, named, each inside an error boundary.

Work that runs beside the readers of a mount (whole-object fill, cache-file preload,
digest checks, revalidation, closing idle caches, the probes at mount time) is started
with :meth:`Tasks.start`, never with a bare ``nursery.start_soon``. trio ends a nursery —
here: the whole mount — on the first exception that escapes one of its tasks; the boundary
stops that: an exception other than cancellation is logged once, with the task's name
(which names the object), handed to the task's ``on_error`` (which fails or resets what
the task was doing for its object), and goes no further. Every other file and the mount
go on.

Expected failures (``RangefsError``, ``OSError``: a full disk, EMFILE, a file removed by
an eviction) are logged as warnings in one line; anything else is a bug and is logged
with its traceback at ERROR, so that tests see it.

Trio thread only. Written here because trio has no supervisor of its own, and the few
lines that name tasks and contain their failures are this project's policy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import RangefsError

log = logging.getLogger(__name__)

ErrorHook = Callable[[BaseException], None]


class Tasks:
    """The starter of a nursery's background tasks (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        on_error: ErrorHook | None = None,
    ) -> None:
        """Run ``fn(*args)`` in the nursery as task ``name``; its failure is contained.
        No await; ``on_error`` runs on the trio thread after the failure was logged."""
        self._nursery.start_soon(self._guarded, name, fn, args, on_error, name=name)

    async def start_and_wait(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        *,
        on_error: ErrorHook | None = None,
    ) -> None:
        """Like :meth:`start` for ``fn(task_status=...)`` (``nursery.start`` style):
        returns once ``fn`` called ``task_status.started()``. ``fn`` must call it before
        anything can fail."""
        await self._nursery.start(self._guarded_started, name, fn, on_error, name=name)

    async def _guarded_started(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        on_error: ErrorHook | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await fn(task_status=task_status)
        except Exception as exc:  # the boundary: nothing but cancellation goes further
            self._failed(name, exc, on_error)

    async def _guarded(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        on_error: ErrorHook | None,
    ) -> None:
        try:
            await fn(*args)
        except Exception as exc:  # the boundary: nothing but cancellation goes further
            self._failed(name, exc, on_error)

    def _failed(self, name: str, exc: Exception, on_error: ErrorHook | None) -> None:
        contain(name, exc)
        if on_error is not None:
            try:
                on_error(exc)
            except Exception as hook_exc:
                log.error("%s: handling its failure failed", name, exc_info=hook_exc)


def contain(name: str, exc: BaseException) -> None:
    """Log the failure of background work ``name`` once: one line for an expected error,
    the traceback for a bug."""
    if isinstance(exc, RangefsError | OSError):
        log.warning("%s failed: %s", name, exc)
    else:
        log.error("BUG in background task %s", name, exc_info=exc)
