"""Hostile and careless input to the results database and to the kernels' input checks (issue 17).

Imports are checked like the kernels check configs, stored values from older versions never break reading or block
a better result, messages never show a password, reading never writes (read-only storage included), times and
counts stay physical, a killed search's run is marked crashed, a large import lets other writers in, and segment
ids wider than int32 are never wrapped."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import db
from db import DatabaseError, ImportValidationError, Store, TuningKey, import_document, read_document
from db.transfer import parse_document
from db.urls import display_url, mask_password, scrub
from kernels import attention_reference
from kernels.problem import DTYPES as KERNEL_DTYPES

H100 = "NVIDIA H100 80GB HBM3"


def make_key(**changes: Any) -> TuningKey:
    fields: dict[str, Any] = dict(
        kernel="flash_attention_gpu", kernel_version="k1", platform="gpu", device_kind=H100, jax_version="0.10.2",
        batch=2, q_len=256, kv_len=256, heads=8, kv_heads=2, head_dim=64, dtype="bfloat16", causal=True,
        segments=False, backward=False)
    fields.update(changes)
    return TuningKey(**fields)


def make_document(count: int = 3) -> dict:
    records = [{"key": make_key(q_len=64 * (index + 1)).to_dict(), "config": {"block_q": 64, "block_k": 32},
                "time_s": 1e-3, "default_time_s": 2e-3, "trials": 3, "updated_at": "2025-01-01T00:00:00+00:00"}
               for index in range(count)]
    return {"format": "pallas-autotune-results", "version": 1, "exported_at": "2025-01-02T00:00:00+00:00",
            "records": records}


def positive_blocks(key: TuningKey, config: Any) -> None:
    """A stand-in for the kernels' rules (the autotune layer passes the real ones): blocks are positive ints."""
    for name in ("block_q", "block_k"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")



def folder_state(path: Path) -> tuple[str, list[str]]:
    """A file's hash (or 'absent') and its folder's listing: a refused or reading open must change neither."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
    return digest, sorted(os.listdir(path.parent))


# -- imports ---------------------------------------------------------------------------------------------------------

def _key_field(name: str, value: Any) -> Callable[[dict], None]:
    return lambda document: document["records"][1]["key"].__setitem__(name, value)


def _field(name: str, value: Any) -> Callable[[dict], None]:
    return lambda document: document["records"][1].__setitem__(name, value)


@pytest.mark.parametrize("mutate, expected", [
    (_key_field("kv_heads", 3), ["record 1", "'key'", "kv_heads must divide heads"]),
    (_key_field("dtype", "int8"), ["record 1", "'key'", "dtype"]),
    (_key_field("device_kind", "GPU\x1b[2J\x1b[31m"), ["record 1", "'key'", "device_kind", "control characters"]),
    (_key_field("kernel", "k" * 500), ["record 1", "'key'", "kernel", "at most 200"]),
    (_key_field("batch", 2**40), ["record 1", "'key'", "batch", "at most 2147483647"]),
    (_field("trials", 10**30), ["record 1", "'trials'", "at most 2147483647"]),
    (_field("trials", 1e30), ["record 1", "'trials'", "must be an integer"]),
    (_field("trials", 10**5000), ["record 1", "'trials'", "bits"]),
    (_field("time_s", 5e-324), ["record 1", "'time_s'", "at least 1e-09"]),
    (_field("time_s", 1e30), ["record 1", "'time_s'", "at most"]),
    (_field("time_s", 10**400), ["record 1", "'time_s'", "too large"]),
    (_field("default_time_s", 5e-324), ["record 1", "'default_time_s'"]),
    (_field("config", {"block_q": 10**30}), ["record 1", "'config'", "at most 9223372036854775807"]),
    (_field("config", {"block_q": "x" * 20_000}), ["record 1", "'config'", "characters"]),
])
def test_import_refuses_what_no_kernel_could_use(store: Store, mutate, expected: list[str]) -> None:
    document = make_document()
    mutate(document)
    with pytest.raises(ImportValidationError) as raised:
        import_document(store, document)
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message, message
    for part in expected:
        assert part in message, message
    assert store.bests() == []  # records 0 and 2 were fine, but nothing was written


def test_import_applies_the_callers_kernel_rules(store: Store) -> None:
    document = make_document()
    for bad in (-64, 0, "64", {}, None):
        broken = copy.deepcopy(document)
        broken["records"][2]["config"]["block_q"] = bad
        with pytest.raises(ImportValidationError, match=r"record 2, field 'config': block_q must be a positive"):
            import_document(store, broken, check=positive_blocks)
    assert store.bests() == []
    assert len(parse_document(document, check=positive_blocks)) == 3
    assert import_document(store, document, check=positive_blocks) == {"imported": 3, "kept_existing": 0}


def test_read_document_bounds_depth_and_size_and_refuses_duplicate_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(make_document())
    assert read_document(text) == json.loads(text)
    assert read_document(text.encode()) == json.loads(text)
    refused = {
        "[" * 200_000 + "]" * 200_000: "nested 200000 levels deep",
        '{"records": [], "records": [1]}': "'records' appears twice",
        '{"time_s": NaN}': "NaN is not a JSON number",
        '{"time_s": -Infinity}': "-Infinity is not a JSON number",
        '{"trials": 1' + "0" * 5000 + "}": "not valid JSON",
        '{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[" ': "not a JSON document",
        b"\xff\xfe": "not UTF-8",
    }
    for bad, expected in refused.items():
        with pytest.raises(ImportValidationError, match=expected):
            read_document(bad)
    assert read_document('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[["}') == {"a": '[' * 30 + '"[['}  # in strings
    monkeypatch.setattr("db.transfer.MAX_DOCUMENT_BYTES", 100)
    with pytest.raises(ImportValidationError, match="at most 100 are read"):
        read_document(text)


def test_an_unusable_stored_best_never_blocks_a_better_one(store: Store) -> None:
    key = make_key()
    # An older version (or an import without the kernels' rules) stored a config no kernel can run, very fast.
    assert store.put_best(key, config={"block_q": -64, "block_k": 32}, time_s=1e-9, default_time_s=1e-3, trials=1)
    # A real search's best is slower, yet must be stored: the stored one cannot run.
    assert store.put_best(key, config={"block_q": 64, "block_k": 32}, time_s=1e-3, default_time_s=1e-3, trials=8,
                          check=positive_blocks)
    assert store.get_best(key).config == {"block_q": 64, "block_k": 32}
    # Once the stored best can run, keep-the-faster holds again.
    assert not store.put_best(key, config={"block_q": 32, "block_k": 32}, time_s=2e-3, default_time_s=None,
                              trials=8, check=positive_blocks)
    assert store.put_best(key, config={"block_q": 128, "block_k": 32}, time_s=5e-4, default_time_s=None, trials=8,
                          check=positive_blocks)
    assert store.get_best(key).time_s == 5e-4


def test_import_replaces_an_unusable_stored_best(store: Store) -> None:
    document = make_document(1)
    key = TuningKey.from_dict(document["records"][0]["key"])
    store.put_best(key, config={"block_q": 0, "block_k": 32}, time_s=1e-6, default_time_s=None, trials=1)
    assert import_document(store, document, check=positive_blocks) == {"imported": 1, "kept_existing": 0}
    assert store.get_best(key).config == {"block_q": 64, "block_k": 32}


def test_stored_values_from_older_versions_never_break_reading(tmp_path: Path) -> None:
    path, good = tmp_path / "old.db", make_key()
    with Store(path) as store:
        store.put_best(good, config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=1)
        store.put_best(make_key(q_len=512), config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=1)
    connection = sqlite3.connect(path)  # what an older version let in: 5e-324 s, and a key no kernel can run
    connection.execute("UPDATE autotune_bests SET time_s = 5e-324 WHERE id = 1")
    connection.execute("UPDATE autotune_keys SET heads = 3 WHERE id = 2")
    connection.commit()
    connection.close()
    with Store(path) as store:
        [best] = store.bests()  # the key row that is not valid any more is skipped, not a crash
        assert best.key == good and best.time_s == 5e-324 and best.speedup is None
        json.dumps([best.speedup, best.time_s], allow_nan=False)  # no infinity left to break JSON output
        problems = store.integrity_check()
        assert any("autotune_bests row 1 has time_s = 5e-324" in problem for problem in problems), problems
        assert any("autotune_keys row 2 is not a valid key" in problem for problem in problems), problems
        # and the impossible time does not block a real one
        assert store.put_best(good, config={"block_q": 32}, time_s=1e-3, default_time_s=2e-3, trials=4)
        assert store.get_best(good).speedup == pytest.approx(2.0)


@pytest.mark.parametrize("write", [
    lambda s: s.add_trial(make_key(), config={}, status="ok", time_s=5e-324),
    lambda s: s.add_trial(make_key(), config={}, status="ok", compile_s=1e30),
    lambda s: s.add_trial(make_key(), config={}, status="ok", time_count=10**30),
    lambda s: s.add_trial(make_key(), config={}, status="ok", number=2**40),
    lambda s: s.put_best(make_key(), config={}, time_s=1e-3, default_time_s=5e-324, trials=1),
    lambda s: s.put_best(make_key(), config={}, time_s=1e-3, default_time_s=None, trials=2**31),
    lambda s: s.try_claim("shape", "me", ttl_s=float("inf")),
    lambda s: s.start_run(host="box", device_kind="GPU\x1b]0;owned\x07", platform="gpu", jax_version="0.10.2",
                          arguments={}),
    lambda s: s.start_run(host="box", device_kind=H100, platform="gpu", jax_version="0.10.2",
                          arguments=json.loads("[" * 40 + "]" * 40)),
])
def test_every_entry_point_bounds_times_and_counts(store: Store, write) -> None:
    with pytest.raises(ValueError):
        write(store)
    assert store.bests() == [] and store.trials() == [] and store.runs() == []


# -- where the database is, and what messages show ------------------------------------------------------------------

@pytest.mark.parametrize("url", ["mysql://bob:s3cr3t-pw@db.example/results", "oracle://bob:s3cr3t-pw@db/x",
                                 "nosuchdb://bob:s3cr3t-pw@db/x", "postgresql://bob:s3cr3t-pw@db:port/x",
                                 "postgresql://bob:s3cr3t-pw@127.0.0.1:1/x"])
def test_no_message_shows_the_password(url: str) -> None:
    with pytest.raises((DatabaseError, ValueError)) as raised:
        Store(url, busy_timeout_s=1)
    message = str(raised.value)
    assert "s3cr3t-pw" not in message and "***" in message, message


def test_urls_render_without_password() -> None:
    assert display_url("postgresql+psycopg://bob:pw@host/db") == "postgresql+psycopg://bob:***@host/db"
    assert "pw" not in display_url("postgresql://bob:pw@host:notaport/db")  # unparseable: still masked
    assert mask_password("a mysql://u:p@ss:w@h/d and x://v:q@h") == "a mysql://u:***@h/d and x://v:***@h"
    assert scrub("auth failed for p%40ss and p@ss", "postgresql://u:p%40ss@h/d") == "auth failed for *** and ***"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:mem?mode=memory&uri=true"])
def test_in_memory_databases_are_refused(url: str) -> None:
    with pytest.raises(DatabaseError, match="in-memory SQLite database"):
        Store(url)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, 1e12])
def test_an_impossible_busy_timeout_is_refused_before_any_file_exists(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(DatabaseError, match="busy_timeout_s"):
        Store(tmp_path / "new" / "results.db", busy_timeout_s=timeout)
    assert os.listdir(tmp_path) == []


# -- reading never writes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"read_only": True}, {"create": False}, {"create": False, "read_only": None}])
@pytest.mark.parametrize("content", [None, b"", "optuna-only"])
def test_a_reading_open_never_creates_or_alters_a_database(tmp_path: Path, options: dict, content: Any) -> None:
    path = tmp_path / "results.db"
    if content == "optuna-only":
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY)")
        connection.close()
    elif content is not None:
        path.write_bytes(content)
    before = folder_state(path)
    with pytest.raises(DatabaseError, match="holds no results database yet"):
        Store(path, **options)
    assert folder_state(path) == before


def test_a_read_only_open_of_a_writable_folder_leaves_it_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    with Store(path) as store:
        store.put_best(make_key(), config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=1)
    before = folder_state(path)
    with Store(path, read_only=True) as reader:
        assert reader.read_only and len(reader.bests()) == 1
        with pytest.raises(DatabaseError, match="opened read-only; nothing was written"):
            reader.record_miss(make_key(q_len=64))
    assert folder_state(path) == before


def _in_unwritable_folder(folder: Path, work: Callable[[], Any]) -> Any:
    """`work()` where `folder` cannot be written: as user nobody when we are root (root writes anywhere), else
    here after taking the write bits away. Returns its result, or raises its error as an AssertionError."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return work()
        finally:
            folder.chmod(0o755)
    read, write = os.pipe()
    with warnings.catch_warnings():  # JAX warns about forking its threads; the child never touches JAX
        warnings.simplefilter("ignore", RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # the child: no return from here
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload = ["ok", work()]
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = ["error", f"{type(exc).__name__}: {exc}"]
        os.write(write, json.dumps(payload, default=str).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome, value = json.loads(pipe.read() or b'["error", "no answer"]')
    os.waitpid(pid, 0)
    if outcome != "ok":
        raise AssertionError(value)
    return value


def test_a_database_on_read_only_storage_can_be_read() -> None:
    folder = Path(tempfile.mkdtemp(prefix="autotune-readonly-"))  # not under pytest's root-only tmp folders
    try:
        folder.chmod(0o755)
        path = folder / "results.db"
        key = make_key()
        with Store(path) as store:
            store.put_best(key, config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=1)
        path.chmod(0o644)
        with Store(path, read_only=True) as warm:  # loads every module the reader needs before the fork
            warm.bests()
        before = folder_state(path)

        def read() -> list:
            with Store(path, read_only=True) as reader:
                configs = [best.config for best in reader.bests()]
                assert reader.get_best(key).time_s == 1e-3
            with Store(path, create=False, read_only=None) as runtime:  # the runtime's way: read-only here
                assert runtime.read_only and runtime.get_best(key) is not None
                try:
                    runtime.record_miss(make_key(q_len=64))
                except DatabaseError as exc:
                    assert "read-only" in str(exc)
                else:
                    raise AssertionError("a write went through")
            return configs

        assert _in_unwritable_folder(folder, read) == [{"block_q": 64}]
        assert folder_state(path) == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_reading_an_older_database_upgrades_it_only_where_it_can() -> None:
    from tests.db.test_db import V1_SCHEMA

    folder = Path(tempfile.mkdtemp(prefix="autotune-old-"))
    try:
        folder.chmod(0o755)
        for name in ("here.db", "readonly.db"):
            connection = sqlite3.connect(folder / name)
            connection.executescript(V1_SCHEMA)
            connection.close()
            (folder / name).chmod(0o644)
        with Store(folder / "here.db", read_only=True) as reader:  # writable: upgraded, then read
            assert reader.read_only and reader.bests() == []
        with Store(folder / "here.db", read_only=True) as warm:  # the modules the child needs, loaded before it
            warm.bests()
        before = folder_state(folder / "readonly.db")

        def read() -> str:
            try:
                Store(folder / "readonly.db", read_only=True)
            except DatabaseError as exc:
                return str(exc)
            return "opened"

        message = _in_unwritable_folder(folder, read)
        assert "schema version 1" in message and "cannot be upgraded" in message, message
        assert folder_state(folder / "readonly.db") == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- runs of killed searches ----------------------------------------------------------------------------------------

def test_a_killed_search_is_marked_crashed(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    code = textwrap.dedent(f"""
        import sys, time
        from db import Store
        store = Store({str(path)!r})
        run = store.start_run(host="box", device_kind="cpu", platform="gpu", jax_version="0.10.2", arguments={{}})
        print(run, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        killed_run = int(child.stdout.readline())
    finally:
        child.kill()  # SIGKILL: no finally block, no finish_run
        child.wait()
        child.stdout.close()
    with Store(path) as store:
        alive = store.start_run(host="box", device_kind="cpu", platform="gpu", jax_version="0.10.2", arguments={})
        # Its heartbeat is fresh, but its process on this machine is gone: crashed at once (issue 24 item 14).
        assert store.mark_crashed_runs(60.0) == [killed_run]
        statuses = {run.id: (run.status, run.message) for run in store.runs()}
        assert statuses[killed_run][0] == "crashed"
        assert f"pid {child.pid} on this machine) is gone" in statuses[killed_run][1]
        assert statuses[alive][0] == "running"  # this process lives
        assert not store.heartbeat_run(killed_run)
        stalled = store.start_run(host="box", device_kind="cpu", platform="gpu", jax_version="0.10.2",
                                  arguments={})
        time.sleep(0.3)
        assert store.heartbeat_run(alive)
        assert store.mark_crashed_runs(0.2) == [stalled]  # alive, but no heartbeat within the limit
        assert "no heartbeat since" in {run.id: run.message for run in store.runs()}[stalled]
        store.finish_run(alive, "ok")
        assert store.mark_crashed_runs(1e-3) == []
        assert {run.id: run.status for run in store.runs()} == {killed_run: "crashed", alive: "ok",
                                                                 stalled: "crashed"}


def test_a_run_of_a_reused_pid_or_another_machine_is_judged_by_its_heartbeat(tmp_path: Path) -> None:
    from db import runs

    here = runs.this_process()
    if here is None:
        pytest.skip("no /proc here: runs are judged by their heartbeat only")
    prefix, machine, pid, ticks = here.rsplit(":", 3)[0].split(":", 1)[0], *here.split(":", 1)[1].rsplit(":", 2)
    assert runs.gone_pid(here) is None  # this process
    assert runs.gone_pid(f"{prefix}:{machine}:{pid}:{int(ticks) + 1}") == int(pid)  # the pid, reused later
    assert runs.gone_pid(f"{prefix}:another-boot/pid:[1]:{pid}:{int(ticks) + 1}") is None  # another machine
    assert runs.gone_pid("run:7") is None  # a run written before runs named their process


# -- a large import and a concurrent writer -------------------------------------------------------------------------

def test_a_large_import_lets_a_concurrent_writer_in(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    Store(path).close()
    document = make_document(4000)
    outcome: dict[str, Any] = {}

    def run_import() -> None:
        with Store(path) as importer:
            started = time.monotonic()
            outcome["counts"] = import_document(importer, document)
            outcome["import_s"] = time.monotonic() - started

    worker = threading.Thread(target=run_import)
    worker.start()
    try:
        with Store(path, busy_timeout_s=0.5) as writer:  # a search waits this long at most
            while not writer.bests() and worker.is_alive():
                time.sleep(0.01)
            began = time.monotonic()
            stored = writer.put_best(make_key(kernel="other"), config={"block_q": 16}, time_s=1e-3,
                                     default_time_s=None, trials=1)
            waited = time.monotonic() - began
            importing = worker.is_alive()
    finally:
        worker.join()
    assert stored and importing, (stored, importing, outcome)
    assert waited < 0.5 < outcome["import_s"], (waited, outcome)
    assert outcome["counts"] == {"imported": 4000, "kept_existing": 0}


# -- kernel inputs --------------------------------------------------------------------------------------------------

def _attention_inputs(seq: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((1, seq, 1, 8)), jnp.float32) for _ in range(3))
    return q, k, v


def test_segment_ids_beyond_int32_are_refused_when_seen() -> None:
    q, k, v = _attention_inputs()
    for q_ids, kv_ids in ((np.array([[2**32, 0]], np.int64), np.array([[0, 0]], np.int64)),
                          (np.array([[2**31, 0]], np.uint32), np.array([[-2**31, 0]], np.int32))):
        with pytest.raises(ValueError, match=r"segment_ids \(q\) must fit in int32"):
            attention_reference(q, k, v, segment_ids=(q_ids, kv_ids))
    ids = np.array([[7, 2**31 - 1]], np.int64)  # wide types with values that fit are fine
    out = attention_reference(q, k, v, segment_ids=(ids, ids))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_traced_wide_segment_ids_compare_exactly() -> None:
    q, k, v = _attention_inputs()
    attend = jax.jit(lambda q, k, v, q_ids, kv_ids: attention_reference(q, k, v, segment_ids=(q_ids, kv_ids)))
    # uint32 2**31 and int32 -2**31 have the same 32 bits, but are different segments: query 0 sees no key
    out = attend(q, k, v, jnp.array([[2**31, 0]], jnp.uint32), jnp.array([[-2**31, 0]], jnp.int32))
    assert bool(jnp.all(out[0, 0] == 0)) and bool(jnp.any(out[0, 1] != 0))
    same = attend(q, k, v, jnp.array([[2**31, 0]], jnp.uint32), jnp.array([[2**31, 0]], jnp.uint32))
    expected = attention_reference(q, k, v, segment_ids=(jnp.array([[1, 0]]), jnp.array([[1, 0]])))
    np.testing.assert_allclose(np.asarray(same), np.asarray(expected), rtol=1e-6)
    with jax.enable_x64(True):
        attend64 = jax.jit(lambda q, k, v, a, b: attention_reference(q, k, v, segment_ids=(a, b)))
        out = attend64(q, k, v, jnp.array([[2**32, 0]], jnp.int64), jnp.array([[0, 0]], jnp.int64))
        assert bool(jnp.all(out[0, 0] == 0)) and bool(jnp.any(out[0, 1] != 0))
        out = attend64(q, k, v, jnp.array([[2**63 + 5, 0]], jnp.uint64), jnp.array([[5 - 2**63, 0]], jnp.int64))
        assert bool(jnp.all(out[0, 0] == 0)) and bool(jnp.any(out[0, 1] != 0))
        swapped = attend64(q, k, v, jnp.array([[2**40, 7]], jnp.int64), jnp.array([[7, 2**40]], jnp.int64))
        reference = attention_reference(q, k, v, segment_ids=(jnp.array([[1, 0]]), jnp.array([[0, 1]])))
        np.testing.assert_allclose(np.asarray(swapped), np.asarray(reference), rtol=1e-6)


def test_the_database_knows_the_kernels_dtypes() -> None:
    assert db.DTYPES == KERNEL_DTYPES


# -- PostgreSQL -----------------------------------------------------------------------------------------------------

@pytest.fixture
def pg_schema(pg_url: str):
    """A URL whose search_path is a fresh, empty schema."""
    from sqlalchemy import create_engine, make_url, text

    schema = f"hostile_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.mark.postgres
def test_postgres_reading_never_writes(pg_schema: str) -> None:
    from sqlalchemy import text

    for options in ({"read_only": True}, {"create": False}):
        with pytest.raises(DatabaseError, match="holds no results database yet"):
            Store(pg_schema, **options)
    with Store(pg_schema) as writer:
        writer.put_best(make_key(), config={"block_q": 64}, time_s=1e-3, default_time_s=2e-3, trials=1)
    with Store(pg_schema, read_only=True) as reader:
        assert [best.config for best in reader.bests()] == [{"block_q": 64}]
        with pytest.raises(DatabaseError, match="read-only"):
            reader.record_miss(make_key())
        with reader.engine.connect() as connection, pytest.raises(Exception, match="read-only transaction"):
            connection.execute(text("DELETE FROM autotune_bests"))
    with Store(pg_schema, read_only=True) as reader:
        assert len(reader.bests()) == 1
