"""The two loop shapes the operator's handlers share.

- :class:`ChangePoller`: run an action when a change key moves (and at least every ``period``),
  with backoff after a failure — the per-job reconcile loop and the serving-status writer.
- :func:`on_active_peer`: run a loop exactly where this operator acts — the webhook sender and
  the vLLM adapter sync. Standalone, it is a task from startup to cleanup; with peering, a kopf
  daemon on the KopfPeering object, which kopf stops on a replica that peering pauses and
  respawns when it resumes (a plain task or thread would go on acting on a paused replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Final

import kopf

log = logging.getLogger(__name__)

# How often a loop looks for changes (in memory, no API call). A plain asyncio.sleep, not
# kopf's ``stopped.wait()``: that makes two tasks and a timer per call, which with hundreds of
# daemons polling was a third of a core at idle (benchmarks/operator_bench.py).
POLL_SECONDS: Final = 0.25
MAX_BACKOFF_SECONDS: Final = 60.0

Wait = Callable[[float], Awaitable[Any]]
PeerLoop = Callable[[Callable[[], bool], Wait, dict[str, Any]], Coroutine[Any, Any, None]]
"""``loop(stopped, wait, kwargs)``: runs until ``stopped()``; ``kwargs`` are kopf's (indexes)."""


def failure_logger(
    errors: Any, handler: str, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> Callable[[Exception], None]:
    """What a loop does with a failed pass: count it in ``errors`` (a Prometheus counter
    labelled by handler) and log it (a temporary failure without its traceback).
    """

    def failed(exc: Exception) -> None:
        errors.labels(handler).inc()
        if isinstance(exc, kopf.TemporaryError):
            logger.warning("%s will be retried: %s", handler, exc)
        else:
            logger.error("%s failed; retrying with backoff", handler, exc_info=exc)

    return failed


@dataclass
class ChangePoller:
    """Runs ``action`` whenever ``key()`` changes and at least every ``period`` seconds (None:
    on changes only), until ``stopped()`` or the action returns True.

    A failed action is retried after ``2**failures`` seconds (capped), or after the delay a
    ``kopf.TemporaryError`` asks for; ``on_error`` hears of each failure. After
    ``max_failures`` failures in a row (temporary ones — the apiserver away — do not count),
    ``give_up(failures, error)`` is called; the loop ends if it returns True.
    """

    period: float | None
    on_error: Callable[[Exception], None]
    poll_seconds: float = POLL_SECONDS
    max_failures: int | None = None
    give_up: Callable[[int, Exception], Awaitable[bool]] | None = None

    async def run(
        self,
        key: Callable[[], Hashable],
        action: Callable[[], Awaitable[bool]],
        stopped: Callable[[], bool],
    ) -> None:
        """Poll until stopped or done."""
        clock = asyncio.get_running_loop().time
        seen: Hashable | None = None
        due = not_before = 0.0
        failures = 0
        while not stopped():
            current, now = key(), clock()
            periodic = self.period is not None and now >= due
            if now >= not_before and (current != seen or periodic):
                try:
                    done = await action()
                except kopf.TemporaryError as exc:
                    self.on_error(exc)
                    not_before = now + (exc.delay or self.period or POLL_SECONDS)
                except Exception as exc:
                    self.on_error(exc)
                    failures += 1
                    not_before = now + min(MAX_BACKOFF_SECONDS, 2.0**failures)
                    if await self._gave_up(failures, exc):
                        return
                else:
                    if done:
                        return
                    seen, failures = current, 0
                    due = now + (self.period or 0.0)
            await asyncio.sleep(self.poll_seconds)

    async def _gave_up(self, failures: int, exc: Exception) -> bool:
        if self.give_up is None or self.max_failures is None or failures < self.max_failures:
            return False
        try:
            return await self.give_up(failures, exc)
        except Exception as error:  # giving up failed too: go on retrying
            self.on_error(error)
            return False


def on_active_peer(
    registry: kopf.OperatorRegistry,
    *,
    id: str,
    peering: str | None,
    loop: PeerLoop,
    stop_timeout: float,
) -> None:
    """Run ``loop`` where this operator acts, and nowhere else (see the module docstring)."""
    stop_key, task_key = f"{id}_stop", f"{id}_task"

    @kopf.on.startup(id=f"{id}_start", registry=registry)
    async def start(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
        """Standalone: start the loop as a task (with peering, the daemon below runs it)."""
        if not settings.peering.standalone:
            if settings.peering.name != peering:
                log.error("%s does not run: set KUBETUNE_OPERATOR__PEERING for peering", id)
            return
        stop = asyncio.Event()

        async def wait(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        memo[stop_key] = stop
        memo[task_key] = asyncio.create_task(loop(stop.is_set, wait, kwargs))

    @kopf.on.cleanup(id=f"{id}_cleanup", registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        """Stop the standalone task (what it is doing finishes within its timeout)."""
        stop, task = memo.get(stop_key), memo.get(task_key)
        if stop is not None and task is not None:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), stop_timeout)

    if peering is None:
        return

    @kopf.daemon(
        "kopf.dev",
        "v1",
        "kopfpeerings",
        id=id,
        registry=registry,
        when=lambda name, **_: name == peering,
        cancellation_timeout=stop_timeout,
    )
    async def daemon(stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
        """With peering: the loop, on the replica that acts."""
        await loop(lambda: bool(stopped), stopped.wait, kwargs)
