"""The one exception type that means "the user asked for something we cannot do; here is the fix".

Pipeline code raises it with a one-line message naming the flag or file and the fix; `cli.py`
prints the message and exits 1 without a traceback. Anything else is a bug and keeps its traceback.
"""


class KdpipeError(Exception):
    """A user-facing error: one line, names the flag or file, says how to fix it."""
