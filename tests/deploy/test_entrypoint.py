"""docker/entrypoint.sh run from the work tree as the image runs it: the engine fingerprint, when it
rebuilds, and how it supervises Triton (glmv-serve) and the gateway (real servers, local ports)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT

ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
HAS_BUILD_CLI = (REPO_ROOT / "build_engine" / "cli.py").is_file()
HAS_GATEWAY_MAIN = (REPO_ROOT / "gateway" / "__main__.py").is_file()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def entrypoint_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a container, pointed at temp dirs; this venv's commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp_path)
    env["GLMV_CHECKPOINT_DIR"] = str(tmp_path / "checkpoint")
    env["GLMV_ENGINE_ROOT"] = str(tmp_path / "engine_root")
    env.update(settings)
    return env


def run_entrypoint(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def fingerprint(env: dict[str, str]) -> str:
    result = run_entrypoint(env, "fingerprint")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A writable copy of the tiny random checkpoint at $GLMV_CHECKPOINT_DIR."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


# --- fingerprint ---------------------------------------------------------------------------------------


def test_fingerprint_lists_config_hash_and_every_file(tmp_path: Path, checkpoint: Path) -> None:
    env = entrypoint_env(tmp_path, GLMV_DTYPE="bfloat16")
    text = fingerprint(env)
    lines = text.splitlines()
    assert lines[0] == "glmv-engine-fingerprint v1"
    assert lines[1] == f"source: --checkpoint {checkpoint}"
    assert lines[2] == "device= dtype=bfloat16 gpus= args="
    assert lines[3].startswith("build code: ") and len(lines[3].split()[-1]) == 64
    assert lines[4].startswith("config.json sha256: ")
    listed = {line.split()[0]: int(line.split()[1]) for line in lines[5:]}
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
    assert listed == files
    assert any(name.endswith(".safetensors") for name in listed)
    assert fingerprint(env) == text, "the fingerprint is stable while nothing changes"


def test_fingerprint_follows_config_content_shard_size_and_mtime(tmp_path: Path, checkpoint: Path) -> None:
    env = entrypoint_env(tmp_path)
    before = fingerprint(env)

    config = checkpoint / "config.json"
    stat = config.stat()
    text = config.read_text()
    assert ": " in text
    config.write_text(text.replace(": ", ":\t", 1))  # same size; mtime restored below
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after_config = fingerprint(env)
    changed = set(after_config.splitlines()) ^ set(before.splitlines())
    assert len(changed) == 2 and all(line.startswith("config.json sha256: ") for line in changed)

    shard = next(checkpoint.glob("*.safetensors"))
    shard_stat = shard.stat()
    os.utime(shard, ns=(shard_stat.st_atime_ns, shard_stat.st_mtime_ns + 1_000_000_000))
    after_mtime = fingerprint(env)
    assert after_mtime != after_config

    with shard.open("ab") as f:
        f.write(b"\0")
    os.utime(shard, ns=(shard_stat.st_atime_ns, shard_stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint(env) != after_mtime


def test_fingerprint_follows_build_settings(tmp_path: Path, checkpoint: Path) -> None:
    base = fingerprint(entrypoint_env(tmp_path))
    assert fingerprint(entrypoint_env(tmp_path, GLMV_DTYPE="float16")) != base
    assert fingerprint(entrypoint_env(tmp_path, GLMV_GPUS="all")) != base
    assert fingerprint(entrypoint_env(tmp_path, GLMV_BUILD_ARGS="--max-model-len 4096")) != base


def test_fingerprint_reads_through_symlinks(tmp_path: Path, checkpoint: Path) -> None:
    """Hugging Face cache snapshots are symlinks into blobs/: the blob's size counts."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for path in list(checkpoint.iterdir()):
        target = blobs / path.name
        path.rename(target)
        path.symlink_to(target)
    lines = fingerprint(entrypoint_env(tmp_path)).splitlines()
    listed = {line.split()[0]: int(line.split()[1]) for line in lines[5:]}
    assert listed == {p.name: p.stat().st_size for p in blobs.iterdir()}


def test_preset_is_used_without_a_checkpoint(tmp_path: Path) -> None:
    lines = fingerprint(entrypoint_env(tmp_path, GLMV_PRESET="tiny")).splitlines()
    assert lines[1] == "source: --preset tiny"
    assert len(lines) == 4


def test_no_checkpoint_and_no_preset_is_a_clear_error(tmp_path: Path) -> None:
    result = run_entrypoint(entrypoint_env(tmp_path), "build")
    assert result.returncode == 1
    assert f"{tmp_path}/checkpoint/config.json does not exist and GLMV_PRESET is not set" in result.stderr
    assert not (tmp_path / "engine_root" / ".glmv-fingerprint").exists()


def test_bad_port_setting_names_the_variable(tmp_path: Path) -> None:
    result = run_entrypoint(entrypoint_env(tmp_path, GLMV_GATEWAY_PORT="80a"), "fingerprint")
    assert result.returncode == 1
    assert "GLMV_GATEWAY_PORT=80a is not a whole number" in result.stderr


def test_other_commands_run_as_given(tmp_path: Path) -> None:
    result = run_entrypoint(entrypoint_env(tmp_path), "python3", "-c", "print('hello from the image')")
    assert result.returncode == 0 and result.stdout == "hello from the image\n"


# --- engine build (real glmv-build, tiny model on CPU) --------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BUILD_CLI, reason="glmv-build (build_engine/cli.py) is not in this tree yet")
def test_build_once_then_reuse_then_rebuild_on_change(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path, GLMV_PRESET="tiny", GLMV_DEVICE="cpu")
    root = tmp_path / "engine_root"

    first = run_entrypoint(env, "build")
    assert first.returncode == 0, first.stderr
    assert "no complete engine" in first.stderr and "engine built" in first.stderr
    assert (root / ".glmv-fingerprint").read_text() == fingerprint(env)
    engine = root / "engine"
    assert (engine / "engine_config.json").is_file() and (engine / "model_repository" / "ensemble").is_dir()
    mtimes = {p: p.stat().st_mtime_ns for p in engine.iterdir()}

    second = run_entrypoint(env, "build")
    assert second.returncode == 0, second.stderr
    assert "is up to date" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in engine.iterdir()} == mtimes

    env["GLMV_DTYPE"] = "float32"
    third = run_entrypoint(env, "build")
    assert third.returncode == 0, third.stderr
    assert (
        "changed since the engine was built" in third.stderr and "> device=cpu dtype=float32" in third.stderr
    )
    assert (root / ".glmv-fingerprint").read_text() == fingerprint(env)
    assert sorted(p.name for p in root.iterdir()) == [".glmv-build.lock", ".glmv-fingerprint", "engine"]


@pytest.mark.skipif(not HAS_BUILD_CLI, reason="glmv-build (build_engine/cli.py) is not in this tree yet")
def test_failed_build_leaves_no_fingerprint(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path, GLMV_PRESET="no-such-preset", GLMV_DEVICE="cpu")
    result = run_entrypoint(env, "build")
    assert result.returncode == 1
    assert "glmv-build failed with exit code" in result.stderr
    assert not (tmp_path / "engine_root" / ".glmv-fingerprint").exists()


# --- serving: real Triton (the server bundled in nvidia-pytriton) ----------------------------------------


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain `text` (leftover servers or stubs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != proc.name:
            found.append(cmdline)
    return found


def mark_built(root: Path) -> None:
    """An engine directory with an empty model repository (Triton is ready at once with no models)."""
    (root / "engine" / "model_repository").mkdir(parents=True)
    (root / "engine" / "engine_config.json").write_text("{}\n")


def serve_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    ports = {name: str(free_port()) for name in ("HTTP", "GRPC", "METRICS", "GATEWAY")}
    return entrypoint_env(
        tmp_path,
        GLMV_HTTP_PORT=ports["HTTP"],
        GLMV_GRPC_PORT=ports["GRPC"],
        GLMV_METRICS_PORT=ports["METRICS"],
        GLMV_GATEWAY_PORT=ports["GATEWAY"],
        GLMV_STOP_TIMEOUT="30",
        GLMV_DRAIN_TIMEOUT="10",
        **settings,
    )


def test_gateway_failure_stops_triton_and_fails_the_container(tmp_path: Path) -> None:
    """An empty model repository (Triton is ready at once) marked as built; the gateway is started with a
    flag it rejects, so it exits: the entrypoint must stop Triton and exit 1."""
    env = serve_env(tmp_path, GLMV_PRESET="tiny", GLMV_GATEWAY_ARGS="--no-such-flag")
    root = tmp_path / "engine_root"
    mark_built(root)
    (root / ".glmv-fingerprint").write_text(fingerprint(env))

    result = run_entrypoint(env, "serve", timeout=180)
    assert result.returncode == 1, result.stderr
    assert "is up to date" in result.stderr
    assert "Triton is ready; starting the gateway" in result.stderr
    assert "the gateway exited; stopping Triton" in result.stderr
    assert not port_is_open(int(env["GLMV_HTTP_PORT"]))
    assert not port_is_open(int(env["GLMV_GRPC_PORT"]))
    assert processes_mentioning(str(root)) == []


def test_triton_failure_before_ready_fails_the_container(tmp_path: Path) -> None:
    env = serve_env(tmp_path, GLMV_PRESET="tiny")
    root = tmp_path / "engine_root"
    mark_built(root)
    (root / "engine" / "model_repository" / "broken" / "1").mkdir(parents=True)
    (root / "engine" / "model_repository" / "broken" / "config.pbtxt").write_text(
        'backend: "no_such_backend"\n'
    )
    (root / ".glmv-fingerprint").write_text(fingerprint(env))

    result = run_entrypoint(env, "serve", timeout=180)
    assert result.returncode == 1
    assert "glmv-serve exited with code" in result.stderr
    assert not port_is_open(int(env["GLMV_HTTP_PORT"]))
    assert processes_mentioning(str(root)) == []


def wait_healthy(env: dict[str, str], proc: subprocess.Popen[bytes], log: Path, *checks: str) -> None:
    """Until every check passes; fails with the entrypoint's log if it exits or 240 s pass."""
    command = [sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py"), *checks]
    deadline = time.monotonic() + 240
    while subprocess.run(command, env=env, capture_output=True).returncode != 0:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.5)


@pytest.mark.skipif(not HAS_GATEWAY_MAIN, reason="the gateway (gateway/__main__.py) is not in this tree yet")
def test_sigterm_stops_gateway_then_triton_and_exits_0(tmp_path: Path) -> None:
    """Triton on an empty model repository (marked as built) and the real gateway; SIGTERM to the entrypoint
    as Docker or the kubelet sends it: both stop in order, exit code 0, no process left."""
    env = serve_env(tmp_path, GLMV_PRESET="tiny")
    root = tmp_path / "engine_root"
    mark_built(root)
    (root / ".glmv-fingerprint").write_text(fingerprint(env))
    log_path = tmp_path / "entrypoint.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(env, proc, log_path, "triton-ready", "gateway-live")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so a clean gateway stop reads as 143.
    assert "signal: shutting down" in text
    assert re.search(r"stopped \(gateway exit (0|143), glmv-serve exit 0\)", text), text[-2000:]
    assert text.index("Application shutdown complete") < text.index("glmv-serve: shutting down")
    for name in ("GLMV_HTTP_PORT", "GLMV_GRPC_PORT", "GLMV_GATEWAY_PORT"):
        assert not port_is_open(int(env[name])), name
    assert processes_mentioning(str(root)) == []
    assert processes_mentioning(f"--port {env['GLMV_GATEWAY_PORT']}") == []


def dashboard_series_missing(env: dict[str, str]) -> list[str]:
    """METRICS of the dashboard generator that neither Triton's nor the gateway's /metrics exposes (GPU
    metrics are left out: this runs on CPU)."""
    from test_grafana_dashboard import generator

    text = ""
    for port in (env["GLMV_METRICS_PORT"], env["GLMV_GATEWAY_PORT"]):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text += response.read().decode()
    missing = []
    for key, (name, kind, matchers) in generator().METRICS.items():
        if name.startswith("nv_gpu_"):
            continue
        series = f"{name}_bucket" if kind == "histogram" else name
        lines = [line for line in text.splitlines() if line.startswith((series + "{", series + " "))]
        if not any(all(m in line for m in matchers.split(",") if m) for line in lines):
            missing.append(f"{key}: {series}{{{matchers}}}")
    return missing


@pytest.mark.slow
@pytest.mark.skipif(
    not (HAS_BUILD_CLI and HAS_GATEWAY_MAIN), reason="glmv-build and the gateway are not in this tree yet"
)
def test_serve_tiny_model_then_sigterm_stops_everything(tmp_path: Path) -> None:
    """The container's default command end to end: build, Triton + gateway ready, SIGTERM, clean exit 0."""
    env = serve_env(tmp_path, GLMV_PRESET="tiny", GLMV_DEVICE="cpu")
    log = (tmp_path / "entrypoint.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(ENTRYPOINT), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(env, proc, tmp_path / "entrypoint.log", "triton-ready", "gateway-live", "gateway-ready")
        # One streamed chat answer through the gateway, so the labelled histograms have series.
        chat = httpx.post(
            f"http://127.0.0.1:{env['GLMV_GATEWAY_PORT']}/v1/chat/completions",
            json={
                "model": "glm-4.6v-flash",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "stream": True,
            },
            timeout=120,
        )
        assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]"), chat.text[-2000:]
        assert dashboard_series_missing(env) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "entrypoint.log").read_text()
        for name in ("GLMV_HTTP_PORT", "GLMV_GRPC_PORT", "GLMV_GATEWAY_PORT"):
            assert not port_is_open(int(env[name])), name
        assert processes_mentioning(str(tmp_path / "engine_root")) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
