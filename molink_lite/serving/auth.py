"""API keys for the HTTP gateway: loading them, and checking a request's ``Authorization: Bearer`` header.

Keys come from ``--api-key`` (repeatable), ``--api-key-file`` (one key per line; blank lines and
``#`` comments ignored) and the ``MOLINK_API_KEY`` environment variable (one or more keys,
comma-separated). Only SHA-256 digests of the keys are kept, and a presented key is compared
with every configured one in constant time, without stopping at the first match. Keys are never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, List, Mapping, Optional, Sequence, Union

ENV_VAR = "MOLINK_API_KEY"
MIN_KEY_CHARS = 16          # shorter keys are refused: they can be guessed
MAX_KEY_CHARS = 4096


def _check_key(key: str, where: str) -> str:
    if not isinstance(key, str):
        raise ValueError(f"API key from {where} must be a string")
    key = key.strip()
    if not key:
        raise ValueError(f"empty API key from {where}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"API key from {where} is longer than {MAX_KEY_CHARS} characters")
    if any(not ("!" <= c <= "~") for c in key):
        # an HTTP header carries it: printable ASCII, no spaces
        raise ValueError(f"API key from {where} may only hold printable ASCII characters without spaces")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"API key from {where} is too short ({len(key)} characters; use at least "
                         f"{MIN_KEY_CHARS}, e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return key


def load_api_keys(keys: Optional[Sequence[str]], key_file: Optional[str] = None,
                  env: Union[bool, Mapping[str, str]] = True) -> List[str]:
    """All configured API keys (deduplicated, in order): ``keys``, then ``key_file``, then $MOLINK_API_KEY.

    ``env``: True reads ``os.environ``, False ignores the environment, a mapping is read instead.
    Raises :class:`ValueError` with a message naming the source of a bad key.
    """
    out: List[str] = []
    for k in keys or ():
        out.append(_check_key(k, "--api-key"))
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read API key file {key_file}: {e}") from None
        found = 0
        for i, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            out.append(_check_key(line, f"{key_file} line {i}"))
            found += 1
        if not found:
            raise ValueError(f"API key file {key_file} holds no keys (one key per line; '#' starts a comment)")
    environ: Optional[Mapping[str, str]] = os.environ if env is True else (env or None)
    if environ:
        value = environ.get(ENV_VAR, "")
        if value.strip():
            parts = [p.strip() for p in value.split(",")]
            if not any(parts):
                raise ValueError(f"${ENV_VAR} holds no keys (comma-separated keys expected)")
            out.extend(_check_key(p, f"${ENV_VAR}") for p in parts if p)
    return list(dict.fromkeys(out))


def _digest(key: Union[str, bytes]) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys (as SHA-256 digests) and a constant-time check of a presented one."""

    def __init__(self, keys: Iterable[str] = ()):
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: Optional[str]) -> bool:
        """True when ``presented`` equals one of the keys (every key is compared: no early exit)."""
        return self.identify(presented) is not None

    def identify(self, presented: Optional[str]) -> Optional[int]:
        """Which configured key ``presented`` is (its index), else None; every key is compared, in constant time.

        The index names a key holder for per-key limits without keeping the key itself."""
        if not self._digests or presented is None:
            return None
        d = _digest(presented)
        found = -1
        for i, ref in enumerate(self._digests):
            if hmac.compare_digest(d, ref):
                found = i
        return found if found >= 0 else None

    @staticmethod
    def bearer(authorization: Optional[str]) -> Optional[str]:
        """The token of an ``Authorization: Bearer <token>`` header value, else None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        return token or None
