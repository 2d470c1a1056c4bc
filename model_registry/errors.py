"""Exceptions raised by the registry."""

from __future__ import annotations

from collections.abc import Iterable


class RegistryError(Exception):
    """Base class of every error the registry raises."""


class InvalidName(RegistryError, ValueError):
    """A model or alias name that the registry refuses."""


class NotFound(RegistryError, LookupError):
    """An unknown model, version or alias."""


class FamilyMismatch(RegistryError):
    """A package of another family than the model's, published without force."""


class IntegrityError(RegistryError):
    """A version whose files do not match its manifest; `problems` lists one line per bad file."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        text = message if not self.problems else message + "\n" + "\n".join(
            f"  - {p}" for p in self.problems
        )
        super().__init__(text)


class Conflict(RegistryError):
    """A write based on a model.json revision that another writer has since replaced (HTTP 409).

    `current` is the revision on disk, `expected` the one the writer read."""

    def __init__(self, message: str, current: int, expected: int):
        self.current = current
        self.expected = expected
        super().__init__(message)
