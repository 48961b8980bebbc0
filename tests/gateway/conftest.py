"""Fixtures for the gateway tests: a real Triton with the fixture ensemble, and gateways run by uvicorn."""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig

FIXTURE_REPO = Path(__file__).parents[1] / "client" / "fixture_repo"


class GatewayServer:
    """The gateway app served by uvicorn in a thread on a free port."""

    def __init__(self, config: GatewayConfig) -> None:
        from build_engine.launcher import free_port

        self.port = free_port()
        self.config = dataclasses.replace(config, port=self.port, host="127.0.0.1")
        self.app = create_app(self.config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="session")
def fixture_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = tmp_path_factory.mktemp("gateway_fixture") / "requests.log"
    log.touch()  # readable before the fixture server has logged anything: any test may run first
    return log


@pytest.fixture(scope="session")
def fixture_triton(fixture_log: Path) -> Iterator[object]:
    from build_engine.launcher import TritonServer

    server = TritonServer(
        FIXTURE_REPO, http_port=0, grpc_port=0, metrics_port=0, env={"GLMV_FIXTURE_LOG": str(fixture_log)}
    )
    with server:
        yield server


@pytest.fixture
def make_gateway(fixture_triton) -> Iterator[Callable[..., GatewayServer]]:
    """``make_gateway(**config_fields)`` → a started gateway in front of the fixture Triton."""
    started: list[GatewayServer] = []

    def make(**fields: object) -> GatewayServer:
        fields.setdefault("triton_url", fixture_triton.grpc_url)
        config = GatewayConfig(**fields)  # type: ignore[arg-type]
        server = GatewayServer(config).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def png_data_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()


@pytest.fixture(scope="session")
def gateway_server_class() -> type[GatewayServer]:
    return GatewayServer


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model repository of a tiny random engine (``python -m build_engine --preset tiny``), built once."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny_engine")
    build = subprocess.run(
        [sys.executable, "-m", "build_engine", "--preset", "tiny", "--output", str(out), "--device", "cpu"],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return out / "model_repository"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Debian chromium driven by playwright (never a downloaded browser)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
