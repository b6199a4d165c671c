"""Split a migration's SQL script into its statements, the way PostgreSQL's own lexer reads them.

A migration is captured statement by statement (rollback/targets/database/capture.py), so its script must be cut
at the semicolons that end statements and nowhere else: not inside 'strings' (with '' and, in
E'...' strings, backslash escapes), "identifiers", $tag$ dollar-quoted bodies $tag$, -- line and
/* nested */ block comments, nor inside a SQL-standard function body (BEGIN ATOMIC ... END).
"""

from __future__ import annotations

import re

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_WORD = re.compile(r"[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*")


class SqlSplitError(ValueError):
    """The script ends inside a string, identifier, comment or body: it is not complete SQL."""


def split_statements(sql: str) -> list[str]:
    """The statements of `sql`, each without its terminating semicolon, blank ones dropped."""
    statements: list[str] = []
    start = i = 0
    n = len(sql)
    atomic_depth = 0  # inside BEGIN ATOMIC ... END: CASE/BEGIN open a level, END closes one
    previous_word = ""
    while i < n:
        ch = sql[i]
        if ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif ch == "/" and sql.startswith("/*", i):
            i = _block_comment_end(sql, i)
        elif ch == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            i = _quoted_end(sql, i, "'", backslash=escapes)
        elif ch == '"':
            i = _quoted_end(sql, i, '"', backslash=False)
        elif ch == "$" and (match := _DOLLAR_TAG.match(sql, i)) and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            tag = match.group(0)
            end = sql.find(tag, match.end())
            if end < 0:
                raise SqlSplitError(f"unterminated dollar-quoted string {tag} starting at character {i}")
            i = end + len(tag)
        elif ch == ";" and atomic_depth == 0:
            _keep(statements, sql[start:i])
            start = i = i + 1
            previous_word = ""
        elif match := _WORD.match(sql, i):
            word = match.group(0).upper()
            if word == "ATOMIC" and previous_word == "BEGIN" and atomic_depth == 0:
                atomic_depth = 1
            elif atomic_depth and word in ("CASE", "BEGIN"):
                atomic_depth += 1
            elif atomic_depth and word == "END":
                atomic_depth -= 1
            previous_word = word
            i = match.end()
        else:
            i += 1
    if atomic_depth:
        raise SqlSplitError("unterminated BEGIN ATOMIC body")
    _keep(statements, sql[start:])
    return statements


def _keep(statements: list[str], text: str) -> None:
    if _meaningful(text):
        statements.append(text.strip())


def _meaningful(text: str) -> bool:
    """Anything but blanks and comments."""
    return _past_blanks(text, parens=False) < len(text)


def _past_blanks(text: str, *, parens: bool) -> int:
    """The index of the first character that is not white space, a comment (or, `parens`, an opening parenthesis)."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace() or (parens and text[i] == "("):
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            i = _block_comment_end(text, i)
        else:
            return i
    return n


def _block_comment_end(sql: str, i: int) -> int:
    depth, i = 0, i
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise SqlSplitError("unterminated /* comment")


def _quoted_end(sql: str, i: int, quote: str, *, backslash: bool) -> int:
    """The index after the closing quote of the string or identifier opening at i."""
    i += 1
    while i < len(sql):
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
        elif ch == quote:
            if sql.startswith(quote * 2, i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise SqlSplitError(f"unterminated {'string' if quote == chr(39) else 'quoted identifier'}")


def first_keyword(statement: str) -> str:
    """The statement's first word, upper-cased, past comments and opening parentheses ('' if none)."""
    match = _WORD.match(statement, _past_blanks(statement, parens=True))
    return match.group(0).upper() if match else ""
