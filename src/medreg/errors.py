"""Exceptions that carry a user-facing, one-line explanation."""


class MedregError(ValueError):
    """Bad input or impossible parameters; the message names the problem."""


class InputFileError(MedregError):
    """A file that is missing, unreadable or of an unsupported kind."""
