"""User-facing errors.

A `TinyLLMError` is a problem with the user's input (a path, a file, a flag, a model that
does not fit). The CLI prints its message on one line and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


class TinyLLMError(Exception):
    """A user error: the message names the problem and, where there is one, the fix."""
