"""The one exception type that means "the user asked for something we cannot do; here is the fix".

Pipeline code raises it with a one-line message naming the flag or file and the fix; `cli.py`
prints the message and exits 1 without a traceback. Anything else is a bug and keeps its traceback.
"""


class KdpipeError(Exception):
    """A user-facing error: one line, names the flag or file, says how to fix it."""


try:  # huggingface_hub >= 1.0: transformers 5's configs validate their fields as strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _StrictConfigError

    CONFIG_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, _StrictConfigError)
except ImportError:
    _StrictConfigError = ()
    CONFIG_ERRORS = (TypeError, ValueError)
"""What transformers raises for a config it refuses (a field of the wrong type or out of range)."""


def reason(e: BaseException) -> str:
    """A library's exception in one line: its first line (a strict config's error: that of the ValueError it
    wraps, which names the field), or its type when it says nothing."""
    if isinstance(e, _StrictConfigError) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
