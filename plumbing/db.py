"""Database plumbing: async engine, session factory, declarative Base, SQLite pragmas, migrations."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import sqlalchemy
from sqlalchemy import DateTime, MetaData, TypeDecorator, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.pool import SingletonThreadPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

ROOT = Path(__file__).resolve().parent.parent
SQLITE_BUSY_TIMEOUT_MS = 15_000
READ_ONLY_OPTION = "paylink_read_only"
T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored as UTC and always come back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, statement_cache: bool = True, **kwargs: Any) -> AsyncEngine:
    """An engine with SQLite tuned for a web app: WAL, busy timeout, foreign keys, BEGIN IMMEDIATE.

    `statement_cache=False` (DATABASE_STATEMENT_CACHE=off) is for PostgreSQL behind PgBouncer in
    transaction mode, where consecutive transactions of one client connection may run on different
    server connections: asyncpg keeps no prepared statements between transactions (its own cache and
    SQLAlchemy's are off) and names each one uniquely, so that two clients' statements never collide
    on a server connection (SQLAlchemy's asyncpg dialect documents these three settings for PgBouncer)."""
    if not is_sqlite(url):
        if not statement_cache and make_url(url).get_driver_name() == "asyncpg":
            connect_args = dict(kwargs.pop("connect_args", {}))
            connect_args.update(statement_cache_size=0, prepared_statement_cache_size=0, prepared_statement_name_func=_statement_name)
            kwargs["connect_args"] = connect_args
        kwargs.setdefault("pool_pre_ping", True)
        return create_async_engine(url, **kwargs)
    _ensure_sqlite_dir(url)
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
    _tune_sqlite(engine.sync_engine)
    return engine


def _statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def create_sync_sqlite_engine(url: str) -> Engine:
    """A synchronous engine on the same SQLite file, tuned the same way, for code that runs in a
    thread of its own (the webhook writer): no per-statement thread hop."""
    _ensure_sqlite_dir(url)
    sync_url = make_url(url).set(drivername="sqlite+pysqlite")
    engine = sqlalchemy.create_engine(
        sync_url, poolclass=SingletonThreadPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )
    _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself so that writers can take the write lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers BEGIN IMMEDIATE: they take the lock up front and wait (busy_timeout) instead of
        # failing with "database is locked" half-way through. Readers (see `reader_engine`) take a
        # plain deferred BEGIN: under WAL they never wait for a writer.
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def insert_ignore(session: Session | AsyncSession, model: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the session's dialect: one statement that cannot race
    (SQLite and PostgreSQL both spell it this way). `.values(...)` and `.returning(...)` follow."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    return insert(model).on_conflict_do_nothing()


def chunked(values: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Slices for `IN (...)` lists that stay under every driver's parameter limit."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Prepared:
    """A statement compiled once for a dialect, run on the DB-API connection with SQLAlchemy's own
    bind and result processors for its types: the same values SQLAlchemy's execution gives, without
    its per-execution bookkeeping (parameter construction, execution context, result object)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.insert_prefetch or compiled.update_prefetch:
            # Columns whose defaults SQLAlchemy works out in Python per execution: not done here.
            raise ValueError("Prepared cannot run a statement with Python-side column defaults")
        self.sql = compiled.string
        names = list(compiled.positiontup or ())
        defaults = compiled.construct_params({name: None for name in compiled.binds if compiled.binds[name].required})
        self._binds = [
            (name, defaults.get(name), compiled.binds[name].required, compiled.binds[name].type._cached_bind_processor(dialect))
            for name in names
        ]
        processors = [column.type._cached_result_processor(dialect, None) for column in compiled._result_columns]
        self._results = [(index, process) for index, process in enumerate(processors) if process is not None]

    def args(self, values: dict[str, Any]) -> tuple[Any, ...]:
        args = []
        for name, default, required, process in self._binds:
            value = values[name] if required else default
            args.append(process(value) if process is not None else value)
        return tuple(args)

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        values = list(raw)
        for index, process in self._results:
            values[index] = process(values[index])
        return tuple(values)

    def all(self, connection: Any, values: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [self.row(raw) for raw in self.raw(connection, values)]

    def many(self, values: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The positional parameters of an executemany of `values` (`exec_driver_sql(prepared.sql, ...)`)."""
        return [self.args(v) for v in values]

    def raw(self, connection: Any, values: dict[str, Any]) -> list[Any]:
        """The DB-API rows, as the driver returns them."""
        cursor = connection.execute(self.sql, self.args(values))
        try:
            return cursor.fetchall()  # type: ignore[no-any-return]
        finally:
            cursor.close()


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def reader_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, for transactions that only read (no write lock on SQLite)."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate_sync(url: str) -> None:
    """Bring the schema to head (alembic upgrade head). Blocking: call from sync code or a thread."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


async def migrate(url: str) -> None:
    """Bring the schema to head without blocking the event loop (alembic runs its own loop)."""
    await asyncio.to_thread(migrate_sync, url)
