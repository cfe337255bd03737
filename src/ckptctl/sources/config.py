"""This invocation's remote configuration: storage options (--storage-option), the secrets among
them and their redaction from messages, the fsspec file system per protocol (with default
timeouts), and the per-invocation caches and counters that `configure` resets."""

from __future__ import annotations

import json
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from ckptctl.errors import CkptError, UsageError

if TYPE_CHECKING:
    from ckptctl.sources.remote import RemotePath


# protocol -> the ckptctl extra that installs its fsspec file system
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
    "hf": "hf",
    "http": "http",
    "https": "http",
}
SECRET_KEYS = ("key", "secret", "token", "password", "passwd", "credential", "sas", "signature", "account_key")


_lock = threading.Lock()
_options: dict[str, object] = {}
_secrets: list[str] = []
_fs_cache: dict[str, Any] = {}  # fsspec file systems (their methods differ by protocol)
_listings: dict[str, dict[str, dict] | None] = {}
_infos: dict[str, dict] = {}
STATS = {"requests": 0, "bytes": 0, "sent": 0, "parts": 0}  # ranged GETs, bytes received, bytes and parts uploaded


# ---- configuration ----------------------------------------------------------------------------
def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value); true/false/null/numbers/JSON objects are decoded, else a string."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise UsageError(f"--storage-option expects KEY=VALUE, got {_redact_text(text)!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    low = raw.strip().lower()
    value: object
    if low in ("true", "yes", "on"):
        value = True
    elif low in ("false", "no", "off"):
        value = False
    elif low in ("none", "null"):
        value = None
    else:
        try:
            value = json.loads(raw)
            if not isinstance(value, (int, float, dict, list)):
                value = raw
        except ValueError:
            value = raw
    return key, value


def configure(options: list[str] | dict | None = None) -> None:
    """Set the storage options for this invocation (the CLI calls this once) and forget caches."""
    global _options
    opts: dict[str, object] = {}
    if isinstance(options, dict):
        opts = dict(options)
    else:
        for text in options or []:
            k, v = parse_option(text)
            opts[k] = v
    with _lock:
        _options = opts
        _secrets.clear()
        _collect_secrets(opts)
        _infos.clear()
        _listings.clear()  # file systems are kept (keyed by options and environment): listings are not
        STATS.update(requests=0, bytes=0, sent=0, parts=0)


def _collect_secrets(opts: dict, force: bool = False) -> None:
    for k, v in opts.items():
        secret = force or any(s in str(k).lower() for s in SECRET_KEYS)
        if isinstance(v, dict):
            _collect_secrets(v, secret)
        elif secret and v not in (None, True, False) and len(str(v)) >= 3:
            _secrets.append(str(v))


def _redact_text(text: str) -> str:
    if "=" in text:
        k, v = text.split("=", 1)
        if any(s in k.lower() for s in SECRET_KEYS):
            return f"{k}=***"
    return text


def redact(message: str) -> str:
    """The message with every secret storage-option value (and AWS secret env) replaced by ***."""
    secrets = list(_secrets)
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "AZURE_STORAGE_KEY"):
        v = os.environ.get(env)
        if v and len(v) >= 3:
            secrets.append(v)
    for s in sorted(secrets, key=len, reverse=True):
        message = message.replace(s, "***")
    message = _USERINFO.sub(r"\1***@", message)  # https://user:PASSWORD@host/...
    return _SIGNED.sub(r"\1***", message)  # presigned / SAS URLs: ?X-Amz-Signature=..., &sig=...


_USERINFO = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
_SIGNED = re.compile(
    r"([?&](?:X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential|X-Goog-Signature|X-Goog-Credential"
    r"|sig|signature|token|access_token|api_key|key)=)[^&\s'\"]+",
    re.IGNORECASE,
)


def _fs(path: RemotePath) -> tuple[Any, str]:
    """The fsspec file system of a URL (one per protocol and invocation) and the path inside it."""
    proto = path.protocol
    env = tuple(
        os.environ.get(v)
        for v in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "CKPTCTL_TIMEOUT",
            "HF_TOKEN",
            "GOOGLE_APPLICATION_CREDENTIALS",
        )
    )
    cache_key = f"{proto}|{sorted(_options.items(), key=str)!r}|{env!r}"
    with _lock:
        fs = _fs_cache.get(cache_key)
    if fs is None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a core dependency
            raise CkptError("remote paths need fsspec: pip install fsspec") from None
        opts = dict(_options)
        opts.setdefault("skip_instance_cache", True)
        _default_timeouts(proto, opts)
        try:
            fs, _p = fsspec.url_to_fs(path.url, **opts)
        except ImportError:
            extra = EXTRAS.get(proto)
            if extra:
                raise CkptError(f"{proto}:// needs the {extra} extra: pip install 'ckptctl[{extra}]'") from None
            raise CkptError(f"{proto}:// is not a protocol fsspec knows here") from None
        except ValueError as e:
            if "Protocol not known" in str(e) or "not known" in str(e):
                raise UsageError(f"{proto}:// is not a protocol ckptctl can read") from None
            raise CkptError(redact(f"{path}: cannot set up {proto}:// ({e})")) from None
        except TypeError as e:
            raise UsageError(redact(f"a --storage-option is not accepted by {proto}:// ({e})")) from None
        with _lock:
            _fs_cache[cache_key] = fs
    return fs, fs._strip_protocol(path.url) if proto not in ("http", "https") else path.url


def timeout_seconds() -> float:
    try:
        return float(os.environ.get("CKPTCTL_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def _default_timeouts(proto: str, opts: dict) -> None:
    """A per-request timeout (CKPTCTL_TIMEOUT, default 60 s) unless the user configured one."""
    t = timeout_seconds()
    if proto in ("http", "https"):
        if "client_kwargs" not in opts:
            import aiohttp

            opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}
    elif proto in ("s3", "s3a") and "config_kwargs" not in opts:
        # 32 connections: ls reads 16 headers at once and a multipart upload keeps 8 parts in
        # flight; botocore's default pool of 10 capped ls at 10 requests in flight
        opts["config_kwargs"] = {
            "connect_timeout": t,
            "read_timeout": t,
            "retries": {"max_attempts": 2},
            "max_pool_connections": 32,
        }
