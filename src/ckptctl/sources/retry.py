"""Remote failures: bounded retries of transient ones, and every other one mapped to a one-line
CkptError that names the URL and hides secrets (NoSuchObject, AccessDenied, RangeIgnored)."""

from __future__ import annotations

import time

from ckptctl.errors import CkptError, NotFound
from ckptctl.sources.config import redact, timeout_seconds

RETRIES = 3  # attempts per request for transient failures (timeouts, resets, 5xx)


class RangeIgnored(CkptError):
    """A server that answers a ranged request with the whole object."""


class NoSuchObject(NotFound):
    """404: no such bucket, key or URL (as opposed to access denied)."""


class AccessDenied(NotFound):
    """401/403."""


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, CkptError, ValueError)):
        return False
    st = _status(e)
    if st is not None:
        return st >= 500 or st == 429
    return isinstance(e, (TimeoutError, ConnectionError, OSError)) or type(e).__name__ in (
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ConnectionTimeoutError",
        "SocketTimeoutError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
    )


def remote_error(e: BaseException, url) -> CkptError:
    """One line naming the URL and the problem, without secrets."""
    if isinstance(e, CkptError):
        return e
    cause = e.__cause__ or e.__context__
    if (
        isinstance(e, FileNotFoundError)
        and cause is not None
        and _status(cause) != 404
        and not isinstance(cause, FileNotFoundError)
    ):
        return remote_error(cause, url)  # fsspec's HTTP info says "not found" for 403s and timeouts too
    text = redact(str(e))
    low = text.lower()
    st = _status(e)
    name = type(e).__name__
    if isinstance(e, FileNotFoundError) or st == 404 or "nosuchkey" in low or "nosuchbucket" in low:
        what = "no such bucket" if "bucket" in low else "no such object (key or URL not found)"
        return NoSuchObject(what, url)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return NotFound(
            "no credentials found (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "~/.aws/config; or --storage-option anon=true for a public bucket)",
            url,
        )
    if isinstance(e, PermissionError) or st in (401, 403) or "accessdenied" in low or "forbidden" in low:
        return AccessDenied("access denied (check credentials: AWS_PROFILE, --storage-option ...)", url)
    if isinstance(e, TimeoutError) or "timeout" in name.lower() or "timed out" in low:
        return CkptError(f"timed out after {RETRIES} attempts (CKPTCTL_TIMEOUT={timeout_seconds():g}s)", url)
    if "range requests" in low:
        return RangeIgnored(
            "the server ignores HTTP Range requests (it sends the whole object); ckptctl "
            "reads only the bytes it needs and refuses to download it all",
            url,
        )
    if (
        name in ("ClientPayloadError", "ContentLengthError", "IncompleteRead", "ResponseStreamingError")
        or isinstance(e, ConnectionResetError)
        or "connection reset" in low
    ):
        return CkptError(
            f"connection cut half way through a read, {RETRIES} attempts (server reset or closed "
            "it before the whole range arrived)",
            url,
        )
    if isinstance(e, (ConnectionError,)) or "connect" in name.lower() or "disconnect" in name.lower():
        return CkptError(f"connection failed after {RETRIES} attempts ({text or name})", url)
    if st is not None:
        return CkptError(f"server answered HTTP {st} ({text or name})", url)
    return CkptError(f"remote read failed: {name}: {text}" if text else f"remote read failed: {name}", url)


def _call(url, fn, *args, **kwargs):
    """fn(*args) with bounded retries of transient failures; errors become one-line CkptErrors."""
    delay = 0.2
    for attempt in range(RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - mapped below
            if attempt + 1 < RETRIES and _transient(e):
                time.sleep(delay)
                delay *= 3
                continue
            raise remote_error(e, url) from None
    raise AssertionError("unreachable")  # pragma: no cover
