"""User-facing errors.

A `VlmrtError` is a mistake in the input or the environment (a missing file, an unknown model
name, a prompt that does not fit), never a bug. The CLI prints its message as one line on stderr
and exits with code 2; the message says what is wrong and what to do.
"""


class VlmrtError(Exception):
    """Bad input or environment, reported to the user without a traceback."""
