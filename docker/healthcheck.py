"""Container health checks: exit 0 when every named check answers HTTP 200, else 1 (one line per failure).

    python docker/healthcheck.py CHECK [CHECK ...]

| check           | URL                                          |
|-----------------|----------------------------------------------|
| `triton-live`   | Triton  `/v2/health/live`  on GLMV_HTTP_PORT (8000)    |
| `triton-ready`  | Triton  `/v2/health/ready` on GLMV_HTTP_PORT (8000)    |
| `gateway-live`  | gateway `/healthz`         on GLMV_GATEWAY_PORT (8080) |
| `gateway-ready` | gateway `/readyz`          on GLMV_GATEWAY_PORT (8080) |

GLMV_HEALTH_HOST (127.0.0.1) and GLMV_HEALTH_TIMEOUT (3 seconds per check) apply to all. Used by the
Dockerfile's HEALTHCHECK, the Kubernetes readiness probe and docker/entrypoint.sh; standard library only, so
it runs in every image variant without curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

CHECKS: dict[str, tuple[str, str, str]] = {
    # name: (port variable, default port, path)
    "triton-live": ("GLMV_HTTP_PORT", "8000", "/v2/health/live"),
    "triton-ready": ("GLMV_HTTP_PORT", "8000", "/v2/health/ready"),
    "gateway-live": ("GLMV_GATEWAY_PORT", "8080", "/healthz"),
    "gateway-ready": ("GLMV_GATEWAY_PORT", "8080", "/readyz"),
}


def check_url(name: str) -> str:
    port_var, default_port, path = CHECKS[name]
    host = os.environ.get("GLMV_HEALTH_HOST", "127.0.0.1")
    return f"http://{host}:{os.environ.get(port_var, default_port)}{path}"


def run_check(name: str, timeout_s: float) -> str | None:
    """None when the check passes, else why it failed."""
    url = check_url(name)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return None
            return f"{name}: {url} answered {response.status}"
    except urllib.error.HTTPError as e:
        return f"{name}: {url} answered {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{name}: {url} unreachable ({reason})"


def main(argv: list[str]) -> int:
    if not argv or any(name not in CHECKS for name in argv):
        print(
            f"usage: healthcheck.py CHECK [CHECK ...]; CHECK is one of {', '.join(CHECKS)}", file=sys.stderr
        )
        return 2
    timeout_s = float(os.environ.get("GLMV_HEALTH_TIMEOUT", "3"))
    failures = [msg for msg in (run_check(name, timeout_s) for name in argv) if msg is not None]
    for msg in failures:
        print(msg, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
