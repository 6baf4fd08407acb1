"""The base of every user-facing error: the CLI prints these as one line (no traceback) and exits 2."""


class KvlabError(ValueError):
    """A user mistake or unusable input; the message says what is wrong and how to fix it."""
