"""The bearer-token check, shared by every API surface (gRPC metadata, HTTP headers)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def check_authorization(values: Sequence[str | bytes], token: str, *, allow_raw: bool = False) -> bool:
    """True when exactly one authorization value was sent and it carries `token`.

    The value is `Bearer <token>`, the scheme matched case-insensitively (RFC 6750 via RFC 7235);
    with `allow_raw` (HTTP only) the bare token is accepted too. Two or more values are refused
    whatever they hold: a proxy that appends its own header must not let either one win. The token
    is compared in constant time.
    """
    if len(values) != 1:
        return False
    value = values[0]
    presented = value.encode() if isinstance(value, str) else bytes(value)
    expected = token.encode()
    scheme, _, credentials = presented.partition(b" ")
    if scheme.lower() == b"bearer" and hmac.compare_digest(credentials, expected):
        return True
    return allow_raw and hmac.compare_digest(presented, expected)
