"""Sharing one compile-only key between concurrent `search --target` processes: its budget and its configs.

Two claims (db/claims.py: atomic, with a heartbeat, taken over once stale) stand for each config compiled: a
budget slot, `compile:<digest>:slot:<i>` for i below `--trials`, and the config itself,
`compile:<digest>:config:<hash>`. A process compiles a config only while it holds both, and marks both done once
the result is recorded; so N processes with `--trials 8` compile 8 distinct configs between them, as N device
searches share one study. Slots start at the number of configs the key already holds (an earlier run, an import):
`--trials` stays the key's total. A process that dies leaves claims that go stale after $AUTOTUNE_CLAIM_TTL
seconds; a later run takes them over.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading

from autotune.heartbeat import Heartbeat
from autotune.space import config_text
from db import Store, TuningKey


def slot_claim(key: TuningKey, index: int) -> str:
    return f"compile:{key.digest()}:slot:{index}"


def config_claim(key: TuningKey, config: dict) -> str:
    digest = hashlib.sha256(config_text(config).encode()).hexdigest()[:24]
    return f"compile:{key.digest()}:config:{digest}"


class ConfigClaims:
    """The claims this process holds for the configs it compiles, beaten for until each is released."""

    def __init__(self, store: Store, owner: str, *, ttl_s: float, beat_s: float):
        self.store, self.owner, self.ttl_s = store, owner, ttl_s
        self._held: dict[int, tuple[str, str]] = {}  # id of a planned config's job -> (slot claim, config claim)
        self._lock = threading.Lock()
        self._heartbeat = Heartbeat(beat_s, self._beat, name="compile-claims")

    def take(self, key: TuningKey, candidates: list, first_slot: int, last_slot: int) -> list:
        """Claim budget slots first_slot..last_slot-1 and a free config for each, in the candidates' order;
        the configs this process may compile (each with its two claims held)."""
        taken = []
        rest = list(candidates)
        for index in range(first_slot, last_slot):
            slot = slot_claim(key, index)
            if not rest or not self.store.try_claim(slot, self.owner, ttl_s=self.ttl_s):
                continue  # no config left, or the slot is another process's (held or done)
            while rest:
                config = rest.pop(0)
                name = config_claim(key, config.to_dict())
                if self.store.try_claim(name, self.owner, ttl_s=self.ttl_s):
                    with self._lock:
                        self._held[id(config)] = (slot, name)
                    taken.append(config)
                    break
            else:
                self.store.release_claim(slot, self.owner, done=False)
        return taken

    def done(self, config) -> None:
        """The config's result is recorded: its slot and the config are spent for good."""
        with self._lock:
            names = self._held.pop(id(config), ())
        for name in names:
            self.store.release_claim(name, self.owner, done=True)

    def __enter__(self) -> "ConfigClaims":
        self._heartbeat.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop beating; claims not done (an interrupt, an error) are given up for another run to take."""
        self._heartbeat.stop()
        with self._lock:
            left = [name for names in self._held.values() for name in names]
            self._held.clear()
        for name in left:
            with contextlib.suppress(Exception):  # the database may be what failed: they go stale instead
                self.store.release_claim(name, self.owner, done=False)

    def _beat(self) -> None:
        with self._lock:
            names = [name for names in self._held.values() for name in names]
        for name in names:
            with contextlib.suppress(Exception):  # a missed beat only risks another process taking it over
                self.store.heartbeat_claim(name, self.owner)


def claim_plans(plans: list, claims: ConfigClaims) -> list:
    """Each plan with the configs this process claimed to compile (the rest are another process's, or done)."""
    return [dataclasses.replace(plan, configs=tuple(claims.take(plan.key, list(plan.candidates), plan.recorded,
                                                                plan.limit)))
            for plan in plans]
