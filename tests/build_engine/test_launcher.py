"""glmv-serve: bundled Triton start-up, failure reporting, clean SIGTERM shutdown leaving no backend stubs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from build_engine.allocator import LIBRARY_NAMES, choose_allocator
from build_engine.launcher import ServerStartError, TritonServer, free_port, free_ports

pytestmark = pytest.mark.slow

ECHO_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "s" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "t" data_type: TYPE_STRING dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
ECHO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            s = pb_utils.get_input_tensor_by_name(r, "s").as_numpy()
            t = np.array([v[::-1] for v in s], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2), pb_utils.Tensor("t", t)]))
        return out
"""


def echo_repo(root: Path, model_py: str = ECHO_MODEL) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(model_py)
    return root


def stub_pids(marker: str) -> list[int]:
    """Backend stub processes whose command line mentions `marker` (our model repository)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def test_bundled_server_runs_python_models_exactly(tmp_path: Path) -> None:
    """Tensors cross the Python backend intact (numpy >= 2 here: the stub env must hold numpy 1.x)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    repo = echo_repo(tmp_path / "repo")
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, exit_timeout_s=10) as server:
        assert server.is_ready()
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            x = grpcclient.InferInput("x", [3], "FP32")
            x.set_data_from_numpy(np.array([1.0, 2.0, 3.0], np.float32))
            s = grpcclient.InferInput("s", [2], "BYTES")
            s.set_data_from_numpy(np.array([b"abc", "żółw".encode()], dtype=np.object_))
            result = client.infer("echo", [x, s])
            assert result.as_numpy("y").tolist() == [2.0, 4.0, 6.0]
            assert result.as_numpy("t").tolist() == [b"cba", "żółw".encode()[::-1]]
        assert stub_pids(str(repo))
    assert stub_pids(str(repo)) == []


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path / "repo", model_py="raise RuntimeError('model import exploded')\n")
    with pytest.raises(ServerStartError) as info:
        TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=120).start()
    assert "model import exploded" in str(info.value)
    assert stub_pids(str(repo)) == []


def test_glmv_serve_sigterm_exits_cleanly(tiny_engine: Path, tmp_path: Path) -> None:
    repo = tiny_engine / "model_repository"
    http_port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "build_engine.launcher",
            "--model-repository",
            str(repo),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://localhost:{http_port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        r = httpx.post(
            f"http://localhost:{http_port}/v2/models/ensemble/generate",
            json={"text_input": "hi", "max_tokens": 4, "temperature": 0.0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert stub_pids(str(repo))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "glmv-serve: shutting down" in proc.stdout.read()
    assert stub_pids(str(repo)) == []
    assert "successfully unloaded 'llm'" in log.read_text()
    assert "Exit timeout expired" not in log.read_text()
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_prepare_only(capsys) -> None:
    from build_engine.launcher import main

    assert main(["--prepare"]) == 0
    assert "tritonserver" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])  # --model-repository is required without --prepare


def test_port_in_use_is_an_error_at_start_up(tmp_path: Path) -> None:
    """A port another server listens on must fail the start, not be answered by that other server."""
    import socket

    from build_engine.launcher import PortInUseError

    repo = echo_repo(tmp_path / "repo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        busy = other.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            TritonServer(repo, http_port=0, grpc_port=busy, metrics_port=0).start()
        assert str(info.value) == (
            f"--grpc-port: port {busy} is already in use (another server listens there); "
            "stop it or choose another port"
        )
        result = subprocess.run(
            [sys.executable, "-m", "build_engine.launcher", "--model-repository", str(repo)]
            + ["--http-port", str(busy), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert result.returncode == 1
    assert f"--http-port: port {busy} is already in use" in result.stderr
    assert stub_pids(str(repo)) == []


def test_control_apis_need_the_admin_key(tmp_path: Path) -> None:
    """Repository, logging, statistics and shared-memory control answer only with the admin key."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = echo_repo(tmp_path / "repo")
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, exit_timeout_s=10) as server:
        base = f"http://{server.http_url}"
        closed = [
            ("POST", "/v2/repository/index"),
            ("GET", "/v2/logging"),
            ("GET", "/v2/models/stats"),
            ("GET", "/v2/systemsharedmemory/status"),
            ("POST", "/v2/repository/models/echo/unload"),
        ]
        for method, path in closed:
            r = httpx.request(method, base + path, timeout=10)
            assert r.status_code == 403, (path, r.status_code, r.text)
        assert (
            httpx.post(base + "/v2/repository/index", headers={"glmv-admin-key": "wrong"}).status_code == 403
        )
        r = httpx.post(base + "/v2/repository/index", headers=server.admin_headers, timeout=10)
        assert r.status_code == 200 and r.json()[0]["name"] == "echo"
        assert (
            httpx.get(base + "/v2/models/stats", headers=server.admin_headers, timeout=10).status_code == 200
        )
        assert httpx.get(base + "/v2/health/ready", timeout=10).status_code == 200
        assert httpx.get(base + "/v2/models/echo/config", timeout=10).status_code == 200
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            with pytest.raises(InferenceServerException) as info:
                client.get_model_repository_index()
            assert "This protocol is restricted" in str(info.value)
            index = client.get_model_repository_index(headers=server.admin_grpc_headers)
            assert [m.name for m in index.models] == ["echo"]
            assert client.is_model_ready("echo")
        assert stub_pids(str(repo))
    assert stub_pids(str(repo)) == []


def test_glmv_serve_exits_on_the_group_sigterm_and_a_second_one(tmp_path: Path) -> None:
    """serve.sh's shutdown: SIGTERM to the process group, then SIGTERM from its trap. Exit in 30 s, nothing left."""
    repo = echo_repo(tmp_path / "repo")
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "build_engine.launcher", "--model-repository", str(repo)]
        + [
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("glmv-serve: ready"), line + proc.stdout.read()
        assert f"  malloc {choose_allocator().name} " in line
        assert stub_pids(str(repo))
        os.killpg(proc.pid, signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "glmv-serve: shutting down" in proc.stdout.read()
    assert stub_pids(str(repo)) == []


def mapped_allocators(pid: int) -> set[str]:
    """The preloadable allocators (jemalloc, tcmalloc) mapped into a running process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name, files in LIBRARY_NAMES.items() if any(f in maps for f in files)}


def infer_echo(server: TritonServer) -> list[float]:
    import numpy as np
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url) as client:
        x = httpclient.InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.array([1.5, -2.0], np.float32))
        s = httpclient.InferInput("s", [1], "BYTES")
        s.set_data_from_numpy(np.array([b"ab"], dtype=np.object_))
        return client.infer("echo", [x, s]).as_numpy("y").tolist()


def test_server_runs_with_the_allocator_installed(tmp_path: Path) -> None:
    """auto preloads jemalloc (else tcmalloc) into tritonserver and, through its environment, the stubs."""
    allocator = choose_allocator("auto")
    if allocator.library is None:
        pytest.skip(f"neither jemalloc nor tcmalloc is installed here ({allocator.reason})")
    repo = echo_repo(tmp_path / "repo")
    log = tmp_path / "server.log"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log, malloc="auto") as server:
        assert server.allocator == allocator
        assert infer_echo(server) == [3.0, -4.0]
        assert mapped_allocators(server.process.pid) == {allocator.name}
        stubs = stub_pids(str(repo))
        assert stubs and all(mapped_allocators(pid) == {allocator.name} for pid in stubs)
    assert server.process.returncode == 0, server.log_tail()
    assert log.read_text().splitlines()[0] == (
        f"glmv-serve: malloc {allocator.name} (LD_PRELOAD {allocator.library}; "
        "auto: the first of jemalloc, tcmalloc installed)"
    )
    assert stub_pids(str(repo)) == []


def test_server_falls_back_to_glibc_when_no_allocator_is_installed(tmp_path: Path) -> None:
    """With no library in the directories searched, auto starts the server on glibc's malloc and says so."""
    empty = tmp_path / "no-libraries"
    empty.mkdir()
    repo = echo_repo(tmp_path / "repo")
    log = tmp_path / "server.log"
    glibc = choose_allocator("auto", dirs=[empty])
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log, malloc=glibc) as server:
        assert infer_echo(server) == [3.0, -4.0]
        assert mapped_allocators(server.process.pid) == set()
        assert all(mapped_allocators(pid) == set() for pid in stub_pids(str(repo)))
    assert log.read_text().splitlines()[0] == (
        f"glmv-serve: malloc glibc (auto: neither jemalloc nor tcmalloc is installed in {empty})"
    )


def test_glmv_serve_refuses_an_allocator_that_is_not_there(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path / "repo")
    missing = tmp_path / "libjemalloc.so.2"
    result = subprocess.run(
        [sys.executable, "-m", "build_engine.launcher", "--model-repository", str(repo)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "GLMV_TRITON_MALLOC": str(missing)},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"--malloc / GLMV_TRITON_MALLOC: {missing} is not a file"
    assert stub_pids(str(repo)) == []


def kernel_log() -> str | None:
    """The kernel ring buffer (where crashed processes are reported), or None where it cannot be read."""
    result = subprocess.run(["dmesg"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def test_shutdown_leaves_no_crashed_stub(tiny_engine: Path, tmp_path: Path) -> None:
    """The backend stubs exit cleanly on SIGTERM, the llm's included: no segfault in the kernel log."""
    if kernel_log() is None:
        pytest.skip("the kernel log (dmesg) cannot be read here")
    repo = tiny_engine / "model_repository"
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, log_file=tmp_path / "server.log", exit_timeout_s=30
    ) as server:
        r = httpx.post(
            f"http://{server.http_url}/v2/models/ensemble/generate",
            json={"text_input": "hi", "max_tokens": 4, "temperature": 0.0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        # argv[8] of a stub is its model instance: name the crashed one
        pids = {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[8].decode()
            for pid in stub_pids(str(repo))
        }
        assert len(pids) >= 4  # preprocessing, llm, postprocessing, vision_encoder
    assert server.process.returncode == 0, server.log_tail()
    deadline = time.monotonic() + 10  # the kernel logs a crash as the process dies; the stubs are gone now
    crashes: list[str] = []
    while time.monotonic() < deadline:
        log = kernel_log() or ""
        crashes = [
            f"{name}: {line}"
            for line in log.splitlines()
            for pid, name in pids.items()
            if f"[{pid}]" in line and ("segfault" in line or "protection fault" in line or "trap" in line)
        ]
        if crashes or not stub_pids(str(repo)):
            break
        time.sleep(0.5)
    assert crashes == []


def test_the_ports_a_server_picks_are_distinct(tmp_path: Path) -> None:
    # picked one by one, the OS may hand out a port twice (a server then refused to start: "cannot listen
    # to GRPC requests and metrics requests at the same address and port")
    for _ in range(50):
        assert len(set(free_ports(3))) == 3
        server = TritonServer(tmp_path)
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    given = free_port()
    server = TritonServer(tmp_path, grpc_port=given)
    assert server.grpc_port == given and given not in (server.http_port, server.metrics_port)
    assert server.http_port != server.metrics_port


def test_server_holds_the_cpu_latency_request_while_it_runs(tmp_path: Path) -> None:
    """cpu_dma_latency_us: from start() until stop() the kernel applies the request (read back from
    /dev/cpu_dma_latency), the log's first line says so, and the host's value comes back after."""
    from build_engine.cpu_latency import CPU_DMA_LATENCY, current_us

    if not os.access(CPU_DMA_LATENCY, os.W_OK):
        pytest.skip(f"{CPU_DMA_LATENCY} is not writable here (needs root)")
    before = current_us()
    if before <= 7:
        pytest.skip(f"another request already holds the host at {before} us")
    repo = echo_repo(tmp_path / "repo")
    log = tmp_path / "server.log"
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=log, cpu_dma_latency_us=7)
    assert current_us() == before  # nothing held before start()
    with server:
        assert current_us() == 7
        assert infer_echo(server) == [3.0, -4.0]
        assert ", CPU wake-up latency <= 7 us" in server.describe_host()
    assert server.process.returncode == 0, server.log_tail()
    assert current_us() == before
    assert ", CPU wake-up latency <= 7 us" in log.read_text().splitlines()[0]
    assert stub_pids(str(repo)) == []


def test_a_cpu_latency_request_that_cannot_be_held_stops_the_start(tmp_path: Path, monkeypatch) -> None:
    """No server starts without the request asked for: the error names the flag, the file and why."""
    from build_engine import cpu_latency
    from build_engine.cpu_latency import CpuLatencyError

    missing = tmp_path / "cpu_dma_latency"
    monkeypatch.setattr(cpu_latency, "CPU_DMA_LATENCY", missing)
    repo = echo_repo(tmp_path / "repo")
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, cpu_dma_latency_us=0)
    with pytest.raises(CpuLatencyError) as info:
        server.start()
    assert str(info.value) == f"--cpu-dma-latency-us 0: cannot open {missing}: No such file or directory"
    assert server.process is None and stub_pids(str(repo)) == []


def test_glmv_serve_refuses_a_negative_cpu_latency(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path / "repo")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "build_engine.launcher",
            "--model-repository",
            str(repo),
            "--cpu-dma-latency-us=-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "--cpu-dma-latency-us: -1 must be an integer >= 0"


def test_the_latency_request_says_where_it_cannot_act(tmp_path: Path, monkeypatch) -> None:
    """The cpuidle driver is what applies the request: a host without one ("none") is named as such."""
    from build_engine import cpu_latency

    sysfs = tmp_path / "cpuidle"
    sysfs.mkdir()
    monkeypatch.setattr(cpu_latency, "CPUIDLE", sysfs)
    assert cpu_latency.idle_driver() is None  # sysfs says nothing
    (sysfs / "current_driver").write_text("intel_idle\n")
    (sysfs / "current_governor_ro").write_text("menu\n")
    assert cpu_latency.idle_driver() == "intel_idle/menu"
    (sysfs / "current_driver").write_text("none\n")
    assert cpu_latency.idle_driver() == "none"
    fake = tmp_path / "cpu_dma_latency"
    fake.write_bytes(b"")
    request = cpu_latency.CpuLatencyRequest(0, fake)
    assert request.describe() == "CPU wake-up latency: host default"
    request.hold()
    try:
        assert fake.read_bytes() == (0).to_bytes(4, sys.byteorder)
        assert request.describe() == (
            "CPU wake-up latency <= 0 us held (no effect here: the host has no cpuidle driver)"
        )
    finally:
        request.release()
    assert not request.is_held
