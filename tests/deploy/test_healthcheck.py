"""docker/healthcheck.py against local HTTP servers that answer the health paths with chosen status codes."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from conftest import REPO_ROOT

HEALTHCHECK = REPO_ROOT / "docker" / "healthcheck.py"


class StatusServer:
    """An HTTP server on 127.0.0.1 answering GET `path` with `statuses[path]` (404 for other paths)."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(outer.statuses.get(self.path, 404))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[StatusServer, StatusServer]]:
    triton = StatusServer({"/v2/health/live": 200, "/v2/health/ready": 200})
    gateway = StatusServer({"/healthz": 200, "/readyz": 200})
    yield triton, gateway
    triton.close()
    gateway.close()


def run(checks: list[str], triton_port: int, gateway_port: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GLMV_HTTP_PORT=str(triton_port), GLMV_GATEWAY_PORT=str(gateway_port))
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *checks], capture_output=True, text=True, env=env, timeout=30
    )


def test_all_checks_pass(servers: tuple[StatusServer, StatusServer]) -> None:
    triton, gateway = servers
    result = run(["triton-live", "triton-ready", "gateway-live", "gateway-ready"], triton.port, gateway.port)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_not_ready_triton_fails_and_names_the_url(servers: tuple[StatusServer, StatusServer]) -> None:
    triton, gateway = servers
    triton.statuses["/v2/health/ready"] = 503
    result = run(["triton-ready", "gateway-live"], triton.port, gateway.port)
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"triton-ready: http://127.0.0.1:{triton.port}/v2/health/ready answered 503"
    )


def test_gateway_down_is_unreachable(servers: tuple[StatusServer, StatusServer]) -> None:
    triton, gateway = servers
    port = gateway.port
    gateway.close()
    result = run(["gateway-ready"], triton.port, port)
    assert result.returncode == 1
    assert result.stderr.startswith(f"gateway-ready: http://127.0.0.1:{port}/readyz unreachable")


def test_unknown_check_is_a_usage_error() -> None:
    result = run(["triton-ready", "bogus"], 1, 1)
    assert result.returncode == 2
    assert "gateway-ready" in result.stderr
