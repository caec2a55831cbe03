"""The tables (schema version 6), as typed SQLAlchemy ORM models.

Every table is prefixed `autotune_` because Optuna keeps its own tables (`studies`, `trials`, `alembic_version`, ...)
in the same database. A key row is written once per distinct `TuningKey` and found by its unique digest; trials,
bests and misses point at it, so the hot lookup is one indexed join. Version 1 lacked the trial timing spread and
count and the claims table, version 2 the compile figures of compile-only trials, version 3 the keys' sliding
window, soft-cap and padding-lengths fields and the misses' reason, version 4 the misses' count of calls the
kernels could not run (kept apart from the tunable misses), version 5 which implementation won a best (the kernel,
XLA or cuDNN) and every implementation's time; `db.migrations` adds them.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, false, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from db.validation import as_utc

SCHEMA_VERSION = 6
PREFIX = "autotune_"
META_TABLE = "autotune_meta"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps that come back timezone-aware in UTC on every backend (SQLite keeps no zone, so store UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        float: Float(),
        str: String(),
    }


class MetaRow(Base):
    """Name/value facts about the database itself; `schema_version` is the one that matters."""

    __tablename__ = META_TABLE

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


FAMILY_COLUMNS = ("kernel", "kernel_version", "platform", "device_kind", "dtype", "causal", "segments", "backward",
                  "window_left", "window_right", "softcap", "lengths")


class KeyRow(Base):
    """One distinct TuningKey; immutable once written."""

    __tablename__ = "autotune_keys"
    # The family: what `Store.neighbours` matches exactly (the shape and jax version may differ).
    __table_args__ = (
        Index("ix_autotune_keys_family", *FAMILY_COLUMNS),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    kernel: Mapped[str]
    kernel_version: Mapped[str]
    platform: Mapped[str]
    device_kind: Mapped[str]
    jax_version: Mapped[str]
    batch: Mapped[int]
    q_len: Mapped[int]
    kv_len: Mapped[int]
    heads: Mapped[int]
    kv_heads: Mapped[int]
    head_dim: Mapped[int]
    dtype: Mapped[str]
    causal: Mapped[bool] = mapped_column(Boolean)
    segments: Mapped[bool] = mapped_column(Boolean)
    backward: Mapped[bool] = mapped_column(Boolean)
    window_left: Mapped[int | None]  # added in version 4, with the three below
    window_right: Mapped[int | None]
    softcap: Mapped[float | None]
    lengths: Mapped[bool] = mapped_column(Boolean, server_default=false())  # rows from before version 4: false
    created_at: Mapped[datetime]


class RunRow(Base):
    """One search invocation."""

    __tablename__ = "autotune_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str]
    device_kind: Mapped[str]
    platform: Mapped[str]
    jax_version: Mapped[str]
    arguments: Mapped[dict[str, Any]]
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    status: Mapped[str]
    message: Mapped[str] = mapped_column(Text)


class TrialRow(Base):
    """One measured or failed config."""

    __tablename__ = "autotune_trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("autotune_keys.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("autotune_runs.id", ondelete="SET NULL"), index=True)
    number: Mapped[int | None]
    config: Mapped[dict[str, Any]]
    status: Mapped[str]
    error_class: Mapped[str | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    compile_s: Mapped[float | None]
    time_s: Mapped[float | None]
    time_spread_s: Mapped[float | None]  # added in version 2
    time_count: Mapped[int | None]  # added in version 2
    max_error: Mapped[float | None]
    figures: Mapped[dict[str, Any] | None]  # added in version 3: a compile-only trial's per-kernel figures
    created_at: Mapped[datetime]


class BestRow(Base):
    """The fastest config known for a key (at most one per key), and which implementation won its final re-timing:
    `time_s` is the winner's time, `times` every implementation's ({name: seconds}; NULL in rows from before
    version 6: the kernel's alone, `time_s`)."""

    __tablename__ = "autotune_bests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("autotune_keys.id"), unique=True, index=True)
    config: Mapped[dict[str, Any]]
    time_s: Mapped[float]
    default_time_s: Mapped[float | None]
    trials: Mapped[int]
    run_id: Mapped[int | None] = mapped_column(ForeignKey("autotune_runs.id", ondelete="SET NULL"), index=True)
    updated_at: Mapped[datetime]
    implementation: Mapped[str] = mapped_column(String(16), server_default=text("'pallas'"))  # added in version 6
    times: Mapped[dict[str, Any] | None]  # added in version 6


class MissRow(Base):
    """How often the runtime asked for a key that had no best (`count`: the search's to-do list), and, apart from
    those, how often a call of that key ran XLA because the kernels could not run it (`fallbacks`, with the latest
    `reason`, e.g. an additive bias): tuning cannot help those, and they must not hide the tunable misses."""

    __tablename__ = "autotune_misses"

    key_id: Mapped[int] = mapped_column(ForeignKey("autotune_keys.id"), primary_key=True)
    count: Mapped[int]
    last_seen: Mapped[datetime]
    reason: Mapped[str | None] = mapped_column(Text)  # added in version 4: why the latest fallback ran XLA
    fallbacks: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # added in version 5


class ClaimRow(Base):
    """Which worker is tuning a shape right now (added in version 2)."""

    __tablename__ = "autotune_claims"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str]
    claimed_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    done: Mapped[bool] = mapped_column(Boolean)

