"""Whether the Hugging Face Hub answers, asked once per process before a Hub id is loaded.

Without a network, huggingface_hub (2.x) retries a refused connection five times with back-off, about 25 s
and a warning per try, before transformers or datasets give up. One probe with a short timeout turns a
missing Hub into a one-line error at once. With HF_HUB_OFFLINE=1 there is no probe: the libraries then load
from their own cache and never connect.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import urllib.error
import urllib.request

from .errors import KdpipeError

PROBE_TIMEOUT_S = 10.0  # huggingface_hub's own default for one metadata request (HF_HUB_ETAG_TIMEOUT)
DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub's default; HF_ENDPOINT overrides it there too


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def unreachable() -> str | None:
    """Why the Hub cannot be reached, in a few words, or None. Only a failure to connect counts (no name
    resolution, refused, timed out): any HTTP answer, even an error status, and a TLS failure (a proxy's
    certificate, say, which the Hub's own client may accept) leave the decision to the libraries."""
    if offline_mode():
        return None
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:  # it answered
        return None
    except urllib.error.URLError as e:
        return None if isinstance(e.reason, ssl.SSLError) else f"{endpoint} did not answer: {e.reason}"
    except (TimeoutError, ConnectionError) as e:
        return f"{endpoint} did not answer: {e or type(e).__name__}"
    except (OSError, http.client.HTTPException):  # something answered, oddly (a proxy?): the libraries decide
        return None
    return None


def require(flag: str, spec: str, local: str) -> None:
    """Raise a one-line KdpipeError for `flag spec` (a Hub id) when the Hub cannot be reached; `local` says
    what to pass instead."""
    reason = unreachable()
    if reason is not None:
        raise KdpipeError(f"{flag} {spec}: the Hugging Face Hub cannot be reached ({reason}); offline? pass {local}, "
                          "or set HF_HUB_OFFLINE=1 to load it from your Hugging Face cache")
