"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class KilnError(Exception):
    """Base class of every expected failure (bad input, failed check, missing model)."""
