"""One retry helper for work that can lose a race to another process: a first write, creating shared tables,
reading a file another process is creating, switching a new SQLite file to WAL. (`autotune/` uses it too: `db/`
is the lower layer, so the helper lives here.)"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def retry(work: Callable[[], T], *, retry_on: Callable[[BaseException], bool], delay_s: Callable[[int], float],
          attempts: int | None = None, give_up_after_s: float | None = None) -> T:
    """`work()`, run again after `delay_s(attempt)` seconds while it raises an error `retry_on` accepts, at most
    `attempts` times in all and no later than `give_up_after_s` seconds from the start; the last error (or one
    `retry_on` refuses) is raised unchanged."""
    if attempts is None and give_up_after_s is None:
        raise ValueError("retry needs attempts or give_up_after_s, or it could retry for ever")
    deadline = None if give_up_after_s is None else time.monotonic() + give_up_after_s
    attempt = 0
    while True:
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - retry_on decides; the rest is re-raised as it was
            last = attempts is not None and attempt >= attempts - 1
            late = deadline is not None and time.monotonic() > deadline
            if last or late or not retry_on(exc):
                raise
        time.sleep(delay_s(attempt))
        attempt += 1
