"""The error type for mistakes a user can make (bad recipe, bad data, missing file).

The command line prints these as one readable message and exits non-zero, without a traceback; anything
else is a bug in crlft and keeps its traceback.
"""


class UserError(ValueError):
    """A problem in the user's input: the message names the file, line and field and says how to fix it."""
