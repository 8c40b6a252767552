"""Statements sent straight to the database driver, compiled by SQLAlchemy once.

`Connection.execute` costs about 40 µs of CPU for a statement already built with bound
parameters (its cache key, an execution context, a result object): more than SQLite takes to
run most of mailflow's statements, and a message runs about eight (issue #10). A `Direct`
statement is compiled by SQLAlchemy once per dialect (and set of columns, for an INSERT),
with the bind and result processors SQLAlchemy itself would use for its columns' types, so
the values written and read back are the same; each call then converts the values with those
processors and runs the SQL on a driver cursor through `Connection._cursor_execute`:
SQLAlchemy's own path for a statement without an execution context, which still fires the
cursor events (`before_cursor_execute`, what tests count statements with) and turns a
driver's exception into SQLAlchemy's, invalidating a connection that is gone, so callers
catch the same errors as before.

What this does not do: Python-side column defaults (an INSERT must be given every column it
names: `Direct.insert_keys` checks), expanding IN parameters, anything but SQLite and
PostgreSQL. A statement it cannot take is run by `Connection.execute` as before.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Executable

_DIALECTS = ("sqlite", "postgresql")
Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Built:
    """One statement as compiled for one dialect."""
    sql: str
    positional: bool
    binds: tuple[tuple[str, Processor, bool, Any], ...]  # (name, processor, constant?, value)
    columns: tuple[tuple[str, Processor], ...]          # what a row holds, and how to read it
    lastrowid: bool                                      # the new row's key: cursor.lastrowid

    def args(self, params: dict[str, Any]) -> Any:
        if self.positional:
            return tuple((value if constant else params[name]) if proc is None
                         else proc(value if constant else params[name])
                         for name, proc, constant, value in self.binds)
        return {name: ((value if constant else params[name]) if proc is None
                       else proc(value if constant else params[name]))
                for name, proc, constant, value in self.binds}

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        return {key: (v if proc is None or v is None else proc(v))
                for (key, proc), v in zip(self.columns, values)}


# Per dialect (an engine's), what each statement compiled to: weakly, so that the engines of a
# test run do not pile up here.
_BUILT: "weakref.WeakKeyDictionary[Dialect, dict[tuple[Direct, Any], _Built | None]]" = (
    weakref.WeakKeyDictionary())


class Direct:
    """A statement to run through the driver. `pk`: for an INSERT whose caller wants the new
    row's primary key (`lastrowid` on SQLite, `RETURNING` on PostgreSQL)."""

    def __init__(self, stmt: Executable, *, pk: Column[Any] | None = None):
        self.stmt = stmt
        self.pk = pk
        # An INSERT's columns with a Python-side default (a value, or a function of nothing),
        # filled in as SQLAlchemy fills them when a caller leaves them out.
        table = getattr(stmt, "table", None) if getattr(stmt, "is_insert", False) else None
        self._defaults: tuple[tuple[str, Any], ...] = tuple(
            (c.key, c.default) for c in (table.columns if table is not None else ())
            if c.default is not None and (c.default.is_scalar or c.default.is_callable))

    def _built(self, dialect: Dialect, keys: tuple[str, ...] | None) -> _Built | None:
        per = _BUILT.get(dialect)
        if per is None:
            per = _BUILT[dialect] = {}
        k = (self, keys)
        try:
            return per[k]
        except KeyError:
            pass
        built = per[k] = self._build(dialect, keys)
        return built

    def _build(self, dialect: Dialect, keys: tuple[str, ...] | None) -> _Built | None:
        if dialect.name not in _DIALECTS:
            return None
        stmt = self.stmt
        lastrowid = False
        if self.pk is not None:
            if dialect.name == "sqlite":
                lastrowid = True
            else:
                stmt = stmt.returning(self.pk)  # type: ignore[attr-defined]
        compiled: Any = stmt.compile(dialect=dialect,
                                     column_keys=list(keys) if keys is not None else None)
        if (compiled.post_compile_params or compiled.literal_execute_params
                or getattr(compiled, "escaped_bind_names", None)):
            return None
        names = (list(compiled.positiontup) if compiled.positional
                 else list(dict.fromkeys(compiled.bind_names.values())))
        binds = []
        for name in names:
            bp = compiled.binds[name]
            constant = not bp.required and bp.value is not None
            if not constant and keys is not None and name not in keys:
                return None   # an INSERT column with a Python-side default: SQLAlchemy's
            proc = bp.type.dialect_impl(dialect).bind_processor(dialect)
            binds.append((name, proc, constant, bp.effective_value if constant else None))
        columns = []
        for col in stmt.exported_columns:  # type: ignore[attr-defined]
            columns.append((col.key, col.type.dialect_impl(dialect).result_processor(
                dialect, None)))
        return _Built(compiled.string, bool(compiled.positional), tuple(binds),
                      tuple(columns), lastrowid)

    # -- running it --------------------------------------------------------------------------
    def _run(self, conn: Connection, built: _Built, params: dict[str, Any]) -> Any:
        cursor = conn.connection.cursor()
        conn._cursor_execute(cursor, built.sql, built.args(params))
        return cursor

    def execute(self, conn: Connection, params: dict[str, Any], *, keyed: bool = False) -> int:
        """Run it; the number of rows it changed (rowcount). `keyed`: an UPDATE whose SET
        clause is the parameters' names (compiled once for each set of names)."""
        built = self._built(conn.dialect, tuple(params) if keyed else None)
        if built is None:
            return int(conn.execute(self.stmt, params).rowcount)  # type: ignore[attr-defined]
        cursor = self._run(conn, built, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run a SELECT (or a statement with RETURNING); every row, as a dict by column key."""
        built = self._built(conn.dialect, None)
        if built is None:
            return [dict(r._mapping) for r in conn.execute(self.stmt, params)]
        cursor = self._run(conn, built, params)
        try:
            return [built.row(r) for r in cursor.fetchall()]
        finally:
            cursor.close()

    def first(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run a SELECT; its first row, or None."""
        built = self._built(conn.dialect, None)
        if built is None:
            row = conn.execute(self.stmt, params).first()
            return dict(row._mapping) if row is not None else None
        cursor = self._run(conn, built, params)
        try:
            found = cursor.fetchone()
            return built.row(found) if found is not None else None
        finally:
            cursor.close()

    def insert(self, conn: Connection, values: dict[str, Any]) -> int | None:
        """Run an INSERT of exactly these columns; the new row's primary key when the
        statement has `pk` (None when ON CONFLICT DO NOTHING inserted nothing), else its
        rowcount."""
        for key, default in self._defaults:
            if key not in values:
                values = {**values, key: default.arg(None) if default.is_callable
                          else default.arg}
        keys = tuple(values)
        built = self._built(conn.dialect, keys)
        if built is None:
            stmt = self.stmt
            if self.pk is None:
                return int(conn.execute(stmt, values).rowcount)  # type: ignore[attr-defined]
            result = conn.execute(stmt, values)
            pk = result.inserted_primary_key  # type: ignore[attr-defined]
            return int(pk[0]) if pk and pk[0] is not None else None
        cursor = self._run(conn, built, values)
        try:
            if self.pk is None:
                return int(cursor.rowcount)
            if built.lastrowid:
                return int(cursor.lastrowid) if cursor.rowcount == 1 else None
            found = cursor.fetchone()
            return int(found[0]) if found is not None else None
        finally:
            cursor.close()
