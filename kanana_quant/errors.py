"""The one exception type for problems a user can cause (bad files, bad flags, bad configs)."""


class KananaQuantError(Exception):
    """A user-facing error: the message is one line naming the file or flag and the fix.

    The CLI prints it as ``error: <message>`` and exits with code 2; anything else is a bug.
    """
