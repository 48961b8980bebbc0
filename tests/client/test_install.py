"""glmv_client installed alone into a fresh virtualenv (pip install ./client): no torch; answers the fixture and the real ensemble."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLIENT_DIR = Path(__file__).parents[2] / "client"


@pytest.mark.slow
def test_fresh_venv_install_answers(fixture_triton, tmp_path, png_bytes):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(CLIENT_DIR)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode != 0 and "Could not find a version" in install.stderr + install.stdout:
        pytest.skip(f"no package index reachable: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-2000:]
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" not in freeze.lower()
    assert "glmv-client" in freeze.lower() or "glmv_client" in freeze.lower()

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes)
    ask = subprocess.run(
        [
            str(venv / "bin" / "glmv"),
            "ask",
            str(image),
            "fresh venv",
            "--url",
            fixture_triton.grpc_url,
            "--no-thinking",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repository: only the installed package can be imported
    )
    assert ask.returncode == 0, ask.stderr
    assert ask.stdout == f"fresh venv | images=1 sizes={len(png_bytes)} temperature=- seed=-\n"
    script = (
        "import sys, glmv_client\n"
        "assert 'torch' not in sys.modules\n"
        f"c = glmv_client.Client({fixture_triton.http_url!r}, protocol='http')\n"
        "print(c.analyze(None, 'over http', enable_thinking=False).text)\n"
    )
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "over http | images=0 sizes= temperature=- seed=-\n"

    # The same installed client against the real ensemble (tiny random engine): the greedy answer
    # equals the one this repository's client gets.
    from glmv_client import Client

    from build_engine.launcher import TritonServer

    engine = tmp_path / "engine"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "build_engine",
            "--preset",
            "tiny",
            "--output",
            str(engine),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    with TritonServer(engine / "model_repository", http_port=0, grpc_port=0, metrics_port=0) as server:
        ask = subprocess.run(
            [str(venv / "bin" / "glmv"), "ask", str(image), "What is this?", "--url", server.grpc_url]
            + ["--temperature", "0", "--max-tokens", "12"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert ask.returncode == 0, ask.stderr
        with Client(server.grpc_url) as client:
            reference = client.analyze([image], "What is this?", temperature=0, max_tokens=12)
    assert ask.stdout == reference.text + "\n"
    assert f"completion_tokens={reference.usage.completion_tokens}" in ask.stderr
