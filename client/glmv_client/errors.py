"""Exceptions raised by glmv_client.

Every error the client raises derives from :class:`GlmvError`:

- :class:`InvalidRequestError` (also a ``ValueError``): the request broke a client-side check that
  mirrors a server limit; ``field`` names the offending argument (``images[1]``, ``max_tokens`` ...).
- :class:`ServerError`: Triton or a model answered with an error; ``message`` is the server's text,
  ``status`` the gRPC code or HTTP status when known, ``field`` the ensemble input the message
  starts with (the server names the field first, e.g. ``image_input[1]: image is ...``).
- :class:`RequestTimeoutError` (also a builtin ``TimeoutError``): no complete answer in time.
- :class:`ServerUnavailableError` (also a builtin ``ConnectionError``): the server could not be
  reached, after the retries.
"""

from __future__ import annotations

import re

#: The ensemble's input tensors; a server message starting with one of them is a bad request.
ENSEMBLE_INPUTS = (
    "guided_decoding_guide_type",
    "guided_decoding_guide",
    "return_log_probs",
    "top_logprobs",
    "tools",
    "text_input",
    "messages",
    "image_input",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop_words",
    "enable_thinking",
    "stream",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "num_return_sequences",
)


class GlmvError(Exception):
    """Base class of every glmv_client error."""


class InvalidRequestError(GlmvError, ValueError):
    """The request failed a client-side check; ``field`` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


class ServerError(GlmvError):
    """The server answered with an error."""

    def __init__(self, message: str, status: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field_of(message)

    @property
    def is_invalid_request(self) -> bool:
        """True when the server rejected the request itself (a bad field), not failed serving it."""
        if self.field is not None:
            return True
        return self.status in (400, "StatusCode.INVALID_ARGUMENT", "INVALID_ARG")


class RequestTimeoutError(GlmvError, TimeoutError):
    """No complete answer arrived within the client's timeout."""


class ServerUnavailableError(GlmvError, ConnectionError):
    """The server could not be reached (connection refused, DNS, reset before any response)."""


def field_of(message: str) -> str | None:
    """The ensemble input a server error message starts with, else None."""
    # Triton may prefix the model's text, e.g. "in ensemble 'ensemble', image_input[1]: ...".
    first_line = message.splitlines()[0] if message else ""
    best: tuple[int, str] | None = None
    for name in ENSEMBLE_INPUTS:
        match = re.search(rf"(?:^|[\s,'\"(]){name}(?:\[\d+\])?:", first_line)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), name)
    return best[1] if best else None
