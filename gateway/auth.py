"""Bearer API keys: open when none are configured; keys compared in constant time."""

from __future__ import annotations

import hmac

from .openai_schema import ApiError


class ApiKeyAuth:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def is_open(self) -> bool:
        return not self._keys

    def check(self, authorization: str | None) -> str | None:
        """The key the request authenticated with (None when open); raises 401 ApiError otherwise."""
        if self.is_open:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer <key>'.",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        candidate = token.strip().encode()
        # Compare with every key (no early exit), so timing does not tell which key was close.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        if not any(matches):
            raise ApiError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return token.strip()
