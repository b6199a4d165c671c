"""What a version is: a release name or a database revision, checked the same way at every door.

Pure: the public models, the target contracts and the workflows import it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

# A version (a release name, or a database revision such as 0002 or an Alembic id) ends up
# among a deploy hook's arguments (deploy_command's {version}), where the hook may wrap
# `ssh` or `sh -c`. So one strict rule at every door: never a leading `-` (an option), no
# `/` or `..` (a path), no whitespace or shell metacharacters, and bounded length.
VERSION_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}$"
VERSION_RULE = "1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter, digit or '_', without '..'"
_VERSION = re.compile(VERSION_PATTERN)


def version_problem(value: object) -> str | None:
    """Why `value` cannot be a version, in one line; None if it is one."""
    if isinstance(value, str) and _VERSION.fullmatch(value) and ".." not in value:
        return None
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{shown} is not a valid version ({VERSION_RULE})"


def _check_version(value: str) -> str:
    problem = version_problem(value)
    if problem is not None:
        # A custom error: the message is ours, not "Value error, ..."; passed as context so
        # braces in the value are never read as a format string.
        raise PydanticCustomError("version", "{problem}", {"problem": problem})
    return value


Version = Annotated[str, AfterValidator(_check_version), WithJsonSchema(
    {"type": "string", "pattern": r"^(?!.*\.\.)" + VERSION_PATTERN[1:], "maxLength": 64,
     "description": f"a release or database revision: {VERSION_RULE}"})]

__all__ = ["VERSION_PATTERN", "VERSION_RULE", "Version", "version_problem"]
