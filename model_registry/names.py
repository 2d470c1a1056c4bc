"""Validation of model and alias names (they become folder names and JSON keys)."""

from __future__ import annotations

import re

from .errors import InvalidName

MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_RULE = "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"


def validate_name(name: object, what: str = "model name") -> str:
    """Return `name` unchanged if it is a valid model name, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"invalid {what} {name!r}: must be a string")
    if not name:
        raise InvalidName(f"invalid {what} {name!r}: must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"invalid {what} {name!r}: longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(f"invalid {what} {name!r}: use only {_RULE}")
    return name


def validate_alias(alias: object) -> str:
    """Return `alias` unchanged if it is a valid alias name, else raise InvalidName."""
    validate_name(alias, "alias name")
    assert isinstance(alias, str)
    if alias.isdigit():
        raise InvalidName(
            f"invalid alias name {alias!r}: an all-digit alias would be mistaken for a version number"
        )
    return alias


def is_valid_name(name: object) -> bool:
    """True if `name` is a valid model name."""
    try:
        validate_name(name)
    except InvalidName:
        return False
    return True
