"""Splitting migration scripts into statements: checked against PostgreSQL itself, which runs each
piece alone and must get the same result as the whole script."""

from __future__ import annotations

import asyncpg
import pytest

from rollback.targets.database.pg import local_dsn
from rollback.targets.database.sql_statements import SqlSplitError, split_statements
from tests.postgres import database  # noqa: F401 - fixture

AWKWARD = r"""
-- a comment; with a semicolon
CREATE TABLE "semi;colon" (id int PRIMARY KEY, note text DEFAULT 'a;b', e text DEFAULT E'it\'s; fine');
/* block /* nested; */ still comment; */
INSERT INTO "semi;colon" VALUES (1, 'x''y;z', E'\\;');
CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$;
CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $$ DECLARE x int; BEGIN x := 2; RETURN x; END $$;
CREATE FUNCTION h(a int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN a > 0 THEN a ELSE 0 END; SELECT a + 1; END;
DO $$ BEGIN PERFORM 1; END $$;
SELECT 'tail$$' AS "$x$";
"""


def test_statements_end_only_at_their_own_semicolons() -> None:
    statements = split_statements(AWKWARD)
    assert [s.split(None, 2)[:2] for s in statements] == [
        ["--", "a"], ["/*", "block"], ["CREATE", "FUNCTION"], ["CREATE", "FUNCTION"], ["CREATE", "FUNCTION"],
        ["DO", "$$"], ["SELECT", "'tail$$'"]]
    assert statements[0].endswith("E'it\\'s; fine')") and statements[1].endswith("E'\\\\;')")
    assert "RETURN x; END $$" in statements[3] and statements[4].endswith("SELECT a + 1; END")
    assert split_statements("  -- only a comment\n /* and another */ ;; ") == []


@pytest.mark.parametrize("broken", ["SELECT 'open", 'SELECT "open', "SELECT $q$ open", "/* open", "CREATE FUNCTION f() "
                                    "RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1;"])
def test_an_incomplete_script_is_refused(broken: str) -> None:
    with pytest.raises(SqlSplitError):
        split_statements(broken)


async def test_the_pieces_run_alone_as_the_whole_script_does(database: str) -> None:  # noqa: F811
    conn = await asyncpg.connect(local_dsn(database), timeout=10)
    try:
        for statement in split_statements(AWKWARD):
            await conn.execute(statement)
        row = await conn.fetchrow('SELECT note, e FROM "semi;colon" WHERE id = 1')
        assert (row["note"], row["e"]) == ("x'y;z", "\\;")
        assert (await conn.fetchval("SELECT f() + g() + h(3)")) == 7
    finally:
        await conn.close()
