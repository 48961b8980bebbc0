"""``python -m gateway`` / ``glmv-gateway``: run the gateway with uvicorn.

    python -m gateway --triton-url localhost:8001 --port 8080 [--api-keys k1,k2] ...

Every flag also reads ``GLMV_GATEWAY_<NAME>``; see ``python -m gateway --help``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvicorn

from .app import create_app
from .config import ConfigError, GatewayConfig


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = GatewayConfig.from_sources(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"gateway: bad setting: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=int(config.drain_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
