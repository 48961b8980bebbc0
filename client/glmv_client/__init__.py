"""glmv_client: a light client for the glmv-serve Triton ensemble (GLM-4.6V-Flash, image + question).

    from glmv_client import Client
    with Client("localhost:8001") as client:
        result = client.analyze("cat.png", "What is in this picture?", max_tokens=128)
        print(result.text, result.usage.completion_tokens, result.timings.ttft)
        for item in client.stream("cat.png", "Describe it.", temperature=0):
            ...  # Delta(text, reasoning) items, then Finish(finish_reason, usage, timings)
        for item in client.stream("cat.png", "Name it.", temperature=1.0, num_return_sequences=3):
            ...  # the three sequences' items interleaved, told apart by item.index; a Finish each

Dependencies: tritonclient[grpc,http], httpx, pillow, numpy (no torch).
"""

from __future__ import annotations

from .aio import AsyncClient
from .client import Client
from .errors import (
    GlmvError,
    InvalidRequestError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from .images import to_data_uri, to_image_bytes
from .request import Limits
from .results import Delta, Finish, Result, Timings, Usage

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Delta",
    "Finish",
    "GlmvError",
    "InvalidRequestError",
    "Limits",
    "RequestTimeoutError",
    "Result",
    "ServerError",
    "ServerUnavailableError",
    "Timings",
    "Usage",
    "to_data_uri",
    "to_image_bytes",
]
