"""What Palette's SQL and driver need of a PostgreSQL session that a DBA's own server, database or
role may default to otherwise: checked as the event store opens, and refused in one line naming
the fix. Not set by Palette on each connection (libpq's ``options``): PgBouncer, common in front
of such a server, refuses a connection that carries them."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

# (setting, what its value must start with, why): psycopg parses the text of a time in ISO's
# DateStyle alone, and of an interval in the postgres IntervalStyle alone.
NEEDED = (("DateStyle", "ISO", "psycopg reads times in ISO's alone"),
          ("IntervalStyle", "postgres", "psycopg reads intervals in postgres' alone"))


def refusal(conn: psycopg.Connection[Any]) -> str | None:
    """Why this connection's session defaults would fail Palette's reads (None: they will not)."""
    names = [name for name, _, _ in NEEDED]
    row = conn.execute(sql.SQL("SELECT current_user, {}").format(
        sql.SQL(", ").join(sql.SQL("current_setting({})").format(sql.Literal(n)) for n in names))).fetchone()
    assert row is not None
    role, values = row[0], row[1:]
    for (name, needed, why), value in zip(NEEDED, values, strict=True):
        if not str(value).startswith(needed):
            return (f"PostgreSQL's {name} for this role is '{value}', where {why}: "
                    f"ALTER ROLE {sql.Identifier(role).as_string(conn)} SET {name} = '{needed}' "
                    f"(or ALTER DATABASE), then start again")
    return None
