"""Errors that end a run with a one-line message (``cli.py`` prints them without a traceback)."""


class NonFiniteError(ArithmeticError):
    """A training loss or gradient became NaN or infinite; the message names the step, batch and quantity."""


class DiskSpaceError(OSError):
    """Not enough free disk space for a write whose size is known (raised before anything is written)."""
