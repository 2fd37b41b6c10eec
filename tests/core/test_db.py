"""core.db.run_db: the web process's side work runs in one database thread, on a connection kept between calls,
dropped after a database error (so a database that goes away and comes back is used again) and at shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.db.backends.base.base import BaseDatabaseWrapper

from core import db
from core.db import DB_THREAD_NAME, adb_connections_close, db_connections_close, run_db

pytestmark = pytest.mark.django_db(transaction=True)


def _where() -> tuple[str, object]:
    """(thread name, the raw connection) after a query in the calling thread (kept referenced: never reused)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return threading.current_thread().name, connection.connection


def _fail() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table_here")


async def test_calls_run_in_one_named_thread_on_a_kept_connection() -> None:
    # given the database thread, used by one call
    first_thread, first_conn = await run_db(_where)
    # when other calls follow, from this loop and from another one
    second = await run_db(_where)
    third = await asyncio.to_thread(asyncio.run, run_db(_where))
    # then they all ran in the one database thread, on the connection the first call opened
    assert first_thread.startswith(DB_THREAD_NAME) and first_thread != threading.current_thread().name
    assert (
        second[0] == third[0] == first_thread and second[1] is third[1] is first_conn
    )  # (on SQLite in spite of its CONN_MAX_AGE of 0)


async def test_a_database_error_drops_the_connection_and_the_next_call_reconnects() -> None:
    _, before = await run_db(_where)
    # when a call fails with a database error (it reaches the caller)
    with pytest.raises(DatabaseError):
        await run_db(_fail)
    # then the next call works, on a new connection
    _, after = await run_db(_where)
    assert after is not before


async def test_the_connection_is_closed_at_shutdown_and_reopened_on_use() -> None:
    _, before = await run_db(_where)
    await adb_connections_close()
    assert await run_db(lambda: connection.connection) is None
    _, after = await run_db(_where)
    assert after is not before
    db_connections_close()  # the sync twin (tests' teardown) does the same
    assert await run_db(lambda: connection.connection) is None


async def test_the_shutdown_close_gives_up_on_a_hung_call(caplog: pytest.LogCaptureFixture) -> None:
    # given a call that hangs in the database thread (a database that stopped answering)
    release = threading.Event()
    hung = asyncio.ensure_future(run_db(lambda: release.wait(30)))
    await asyncio.sleep(0.05)
    # when the lifespan shutdown closes the connections with a short bound
    started = time.monotonic()
    await adb_connections_close(timeout_s=0.2)
    # then it returned after the bound, said so, and the hung call was left alone
    assert time.monotonic() - started < 10 and not hung.done()
    assert "still busy" in caplog.text
    release.set()
    assert await hung is True
    db_connections_close()  # what the bounded close gave up on, done now that the thread is free


async def test_a_connection_older_than_the_bound_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the bound stands for a CONN_MAX_AGE of 0 on SQLite only")
    # given a CONN_MAX_AGE of 0 (SQLite's here; the settings are shared by every thread's connection) and a bound of 0
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    monkeypatch.setattr(db, "KEPT_MAX_AGE_S", 0.0)
    await adb_connections_close()
    # then every call gets a new connection
    _, before = await run_db(_where)
    _, after = await run_db(_where)
    assert after is not before


async def test_a_conn_max_age_of_0_is_kept_on_sqlite_and_closed_after_each_call_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given DB_CONN_MAX_AGE=0 (the settings are shared by every thread's connection)
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    await adb_connections_close()
    # when two calls follow each other
    _, before = await run_db(_where)
    _, after = await run_db(_where)
    left_open = await run_db(lambda: connection.connection)
    if connection.vendor == "sqlite":
        # then on SQLite the connection is kept (opening one per poll was a measured cost; KEPT_MAX_AGE_S bounds it)
        assert after is before and left_open is before
    else:
        # then elsewhere (PostgreSQL) each call opened its own and none is held between calls, as the operator asked
        assert after is not before and left_open is None


async def test_a_result_and_an_exception_are_handed_back_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # a failing close of a broken connection does not hide the call's own outcome
    def close(self: BaseDatabaseWrapper) -> Any:
        raise RuntimeError("close failed")

    assert await run_db(lambda: 42) == 42
    monkeypatch.setattr(BaseDatabaseWrapper, "close", close)
    with pytest.raises(DatabaseError):
        await run_db(_fail)
    monkeypatch.undo()
    await adb_connections_close()


async def test_a_connection_killed_by_postgresql_is_replaced() -> None:
    # the server ends the kept connection (a restart, a failover, an idle timeout), as the database going away
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")

    def backend_pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    def terminate(pid: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    pid = await run_db(backend_pid)
    await asyncio.to_thread(terminate, pid)
    # the first call after it fails (the connection is gone), the next one reconnects
    with pytest.raises(DatabaseError):
        await run_db(backend_pid)
    assert await run_db(backend_pid) != pid


def test_postgresql_cancels_a_statement_longer_than_the_bound() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")
    from django.db import OperationalError, connections

    # given the settings' bound (DB_STATEMENT_TIMEOUT_MS, 30 s unless set) on every connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")  # in milliseconds
        assert int(cursor.fetchone()[0]) == int(os.environ.get("DB_STATEMENT_TIMEOUT_MS", 30_000))
    # and a connection made with the same options but a bound of 0.2 s: from a copy of the settings, which every
    # connection of the alias shares (connections.create_connection would hand it the shared dict itself)
    shared_options = dict(connection.settings_dict["OPTIONS"])
    settings_dict = {**connection.settings_dict, "OPTIONS": {**shared_options, "options": "-c statement_timeout=200"}}
    short = type(connections["default"])(settings_dict, "default")
    try:
        started = time.monotonic()
        # when a statement runs longer (a lock wait, a runaway query)
        with pytest.raises(OperationalError, match="statement timeout"), short.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(5)")
        # then the server cancels it after the bound, and the caller gets an error instead of waiting
        assert time.monotonic() - started < 4
    finally:
        short.close()
    # and the process's other connections keep the settings' bound (a later test's teardown flush is no statement
    # to cut at 0.2 s)
    assert connection.settings_dict["OPTIONS"] == shared_options


def test_a_forked_child_starts_its_own_database_thread() -> None:
    # given a process whose database thread is running (a Celery prefork parent, say)
    asyncio.run(run_db(_where))
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not come along; a call must not wait for it forever
        try:
            name, _ = asyncio.run(asyncio.wait_for(run_db(_where), timeout=20))
            os._exit(0 if name.startswith(DB_THREAD_NAME) else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child's database call never ran")
    assert os.waitstatus_to_exitcode(done[1]) == 0
