"""One background thread that does a piece of work every interval, and at once when kicked.

Every heartbeat uses it: the beat of the trials a search worker is evaluating (kicked for a new trial, so its first
beat is not an interval late), of the claim on a problem of a shapes list, of a run, and of the configs a
compile-only search claimed.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Heartbeat:
    """Calls `on_tick()` every `interval_s` and `on_kick()` whenever `kick()` is called, off the caller's thread.

    Errors in either are the callback's to handle (a missed beat must never stop the thread); use as a context
    manager, or `start()` and `stop()`.
    """

    def __init__(self, interval_s: float, on_tick: Callable[[], None], on_kick: Callable[[], None] | None = None,
                 *, name: str = "heartbeat"):
        self.interval_s, self.on_tick, self.on_kick = interval_s, on_tick, on_kick
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def kick(self) -> None:
        self._wake.set()

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop, and wait up to `wait_s` for a beat in progress to end (so nothing is written after this)."""
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait_s)

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        next_tick = time.monotonic() + self.interval_s
        while True:
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            if self._stopped.is_set():
                return
            if time.monotonic() < next_tick:
                if self.on_kick is not None:
                    self.on_kick()
                continue
            next_tick = time.monotonic() + self.interval_s
            self.on_tick()
