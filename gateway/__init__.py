"""gateway: OpenAI-compatible HTTP API and web page in front of the glmv-serve Triton ensemble."""

from .app import create_app
from .config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
