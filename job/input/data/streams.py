"""Threading and shuffle helpers of the input pipeline: a background iterator, a shuffle buffer."""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class background(Iterator[T]):  # noqa: N801 - used like the generator function it replaces
    """Iterate ``items`` in a daemon thread, ``depth`` ahead; errors reach the consumer.

    The thread starts at once, not at the first ``next()``, so an epoch can be prepared while
    the previous one is still being evaluated and checkpointed."""

    _DONE = object()

    def __init__(self, items: Iterable[T], depth: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        thread = threading.Thread(
            target=self._produce, args=(items,), daemon=True, name="finetune-data"
        )
        thread.start()

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._q.put(e)

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._q.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self._finished = True
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """A streaming shuffle: each item leaves from a random place in a ``buffer``-sized pool."""
    pool: list[T] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool
