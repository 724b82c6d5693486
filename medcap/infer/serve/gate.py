"""The service's decode budget: how many large images are decoded at once, and how much memory all
the decodes in flight may take together.

Each upload's cost is estimated from its header before any pixel is decoded
(``ImageHeader.decode_peak_bytes``). A decode starts only when the costs in flight plus its own stay
within the budget; a costly one (over ``CHEAP_DECODE_BYTES``) also needs one of the ``slots``
decoding threads. Cheap images have their own threads and go first in the waiting line, so a flood
of large images neither holds ordinary requests behind it nor takes more than ``slots`` cores. A
request whose client has gone is taken out of the waiting line.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: Images whose estimated decode cost is at most this are served first (a 2,000 x 2,000 8-bit image
#: is about 60 MiB by the estimate; a 6,000 x 6,000 one several hundred).
CHEAP_DECODE_BYTES = 64 * 1024 * 1024


@dataclass(order=True)
class _Waiter:
    priority: tuple[int, int]
    cost: int = field(compare=False)
    future: asyncio.Future = field(compare=False)


def default_decode_slots() -> int:
    """Half the cores (at least one) decode large images; the rest serve the model and the requests."""
    return max(1, (os.cpu_count() or 2) // 2)


class DecodeGate:
    """At most ``slots`` costly decodes at once, and at most ``budget`` estimated bytes in flight
    together (cheap and costly).

    ``run(cost, fn, *args)`` waits for its turn, runs ``fn`` in the gate's own threads and holds the
    cost until the thread has finished (also when the waiting request is cancelled meanwhile: the
    memory is in use until the decoder returns).
    """

    def __init__(self, slots: int, budget: int, cheap_threads: int | None = None) -> None:
        if slots < 1 or budget < 1:
            raise ValueError(f"DecodeGate needs slots >= 1 and budget >= 1, got {slots}, {budget}")
        self.slots = slots
        self.budget = budget
        self.active = 0
        """Costly decodes running (each holds a slot)."""
        self.in_flight = 0
        self.peak_in_flight = 0
        self._waiting: list[_Waiter] = []
        self._order = itertools.count()
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="medcap-decode")
        self._cheap_threads = ThreadPoolExecutor(
            max_workers=cheap_threads or max(2, os.cpu_count() or 2), thread_name_prefix="medcap-decode-small"
        )

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, cost: int) -> bool:
        if self.in_flight + cost > self.budget:
            return False
        return cost <= CHEAP_DECODE_BYTES or self.active < self.slots

    def _take(self, cost: int) -> None:
        self.active += cost > CHEAP_DECODE_BYTES
        self.in_flight += cost
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _release(self, cost: int) -> None:
        self.active -= cost > CHEAP_DECODE_BYTES
        self.in_flight -= cost
        self._grant()

    def _grant(self) -> None:
        """Admit waiters in order (cheap first, then by arrival) while the next one fits."""
        self._waiting.sort()
        while self._waiting and self._fits(self._waiting[0].cost):
            waiter = self._waiting.pop(0)
            if waiter.future.done():  # cancelled while waiting
                continue
            self._take(waiter.cost)
            waiter.future.set_result(None)

    @asynccontextmanager
    async def _admitted(self, cost: int) -> AsyncIterator[Callable[[], None]]:
        """Wait for a slot and ``cost`` bytes of budget; yields the function that gives them back."""
        rank = 0 if cost <= CHEAP_DECODE_BYTES else 1
        if not any(w.priority[0] <= rank for w in self._waiting) and self._fits(cost):
            self._take(cost)  # nobody it should wait behind
        else:
            loop = asyncio.get_running_loop()
            waiter = _Waiter((rank, next(self._order)), cost, loop.create_future())
            self._waiting.append(waiter)
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(cost)  # admitted just as the request went away
                else:
                    self._waiting = [w for w in self._waiting if w is not waiter]
                    self._grant()  # it may have been the one the others waited behind
                raise
        released = False

        def give_back() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(cost)

        yield give_back

    async def run(self, cost: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a decoding thread once admitted; the cost is held until it returns."""
        if cost > self.budget:
            raise ValueError(f"a decode of {cost} bytes can never fit the budget of {self.budget}")
        loop = asyncio.get_running_loop()
        async with self._admitted(cost) as give_back:
            threads = self._threads if cost > CHEAP_DECODE_BYTES else self._cheap_threads
            try:
                done: Future = threads.submit(fn, *args)
            except BaseException:
                give_back()
                raise

            def finished(_: Future) -> None:
                try:
                    loop.call_soon_threadsafe(give_back)
                except RuntimeError:  # the event loop has closed (shutdown): nothing to give back to
                    pass

            done.add_done_callback(finished)
            return await asyncio.wrap_future(done)

    def as_dict(self) -> dict[str, int]:
        return {
            "slots": self.slots,
            "budget_bytes": self.budget,
            "active": self.active,
            "waiting": self.waiting,
            "in_flight_bytes": self.in_flight,
            "peak_in_flight_bytes": self.peak_in_flight,
        }

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._cheap_threads.shutdown(wait=False, cancel_futures=True)


__all__ = ["CHEAP_DECODE_BYTES", "DecodeGate", "default_decode_slots"]
