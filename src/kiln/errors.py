"""One exception type for every problem a user can fix.

The CLI prints a `KilnError` as a single line and exits non-zero; anything else is
a bug in kiln and keeps its traceback. Messages name the file and key at fault.
"""


class KilnError(Exception):
    """A user-facing error: bad input, bad flag, missing file, unwritable output."""
