"""`glmv-serve`: start NVIDIA Triton Inference Server on a model repository.

Contract:
- A system `tritonserver` on PATH (as in NVIDIA's NGC container) is used as is. Otherwise the server bundled
  in the `nvidia-pytriton` wheel is used: its Python backend is copied into a private backend directory
  (under `$GLMV_CACHE_DIR`, default `~/.cache/glmv-serve`) together with the backend stub built for this
  Python version, `nvidia_pytriton.libs` goes on LD_LIBRARY_PATH and this interpreter's `bin` goes first on
  PATH, so the stub finds this environment's site-packages.
- `TritonServer(...)` starts the server as a child process in its own process group, waits until
  `/v2/health/ready` answers 200 (raising `ServerStartError` with the log tail if the process dies or the
  timeout passes), and `stop()` sends SIGTERM, waits for a clean exit (models unloaded, backend stubs
  gone), then SIGKILLs the whole group if it did not exit in time: no stub process outlives it.
- The Python backend stub of Triton 2.51 is built with a pybind11 that reads numpy 1.x array descriptors:
  under numpy 2 every tensor it hands over has stride 0 and byte size 0 (inputs read as their first
  element repeated, outputs arrive empty, BYTES inputs crash the stub). So when this environment has
  numpy >= 2, the stubs run in a small "stub env" (a venv directory under the cache dir whose
  site-packages holds numpy<2 and a .pth that adds this environment's site-packages after it). The
  numpy<2 wheel comes from `$GLMV_STUB_NUMPY_WHEEL`, `<project>/.whl/` or `pip install` (once).
- The stubs ignore PYTHONPATH; the project root is added to their sys.path by the same .pth (and by each
  model.py from its `python_path` parameter).
- Ports: each of the HTTP, gRPC and metrics ports must be free when `start()` runs; one already in use
  raises `PortInUseError` naming the flag and the port (a server already listening there would otherwise
  answer the readiness probe for the new one).
- Restricted APIs: Triton's control endpoints (model repository load/unload/index, logging, statistics,
  trace, shared-memory registration) answer only requests that carry the server's admin key in the HTTP
  header `glmv-admin-key` (gRPC metadata `triton-grpc-protocol-glmv-admin-key`), through
  `--http-restricted-api` / `--grpc-restricted-protocol`. The key comes from
  `admin_key` (glmv-serve: `$GLMV_TRITON_ADMIN_KEY` or `--admin-key-file`); without one a random key is
  made at start-up and kept only in this process (`admin_headers`), so the endpoints are closed to others.
  Health, metadata, model config and inference stay open.
- Signals: glmv-serve stops on SIGTERM / SIGINT through a `StopRequest` (no lock is taken in the handler);
  any number of signals lead to one clean shutdown.
- Allocator: the server runs with jemalloc (else tcmalloc) through LD_PRELOAD where the library is installed,
  else with glibc's malloc; `malloc` / `--malloc` / `$GLMV_TRITON_MALLOC` choose (build_engine/allocator.py).
  The choice is the first line of the server's log and is printed in glmv-serve's ready line.
- CPU wake-up latency: with `cpu_dma_latency_us` / `--cpu-dma-latency-us N` the launcher holds the kernel's
  PM QoS request (`/dev/cpu_dma_latency`, build_engine/cpu_latency.py) from `start()` until `stop()`, so no
  core of the host sleeps in an idle state slower than N µs to leave; a request that cannot be held fails
  the start (exit 2) with a message naming the flag, the file and why. Said on the log's first line too.
- gRPC message size: Triton 2.51 fixes its gRPC limit at INT32_MAX bytes, the same as tritonclient's
  `MAX_GRPC_MESSAGE_SIZE`, so no flag is needed; the Python backend's shared memory grows on demand from
  `shm_default_byte_size` in steps of `shm_growth_byte_size` (sized for 10 MiB images).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .allocator import ALLOCATOR_ENV, Allocator, AllocatorNotFoundError, choose_allocator
from .cpu_latency import CpuLatencyError, CpuLatencyRequest
from .stop_signal import StopRequest

__all__ = [
    "ADMIN_KEY_HEADER",
    "PortInUseError",
    "RESTRICTED_APIS",
    "ServerStartError",
    "TritonServer",
    "TritonInstall",
    "check_ports_free",
    "find_triton",
    "free_port",
    "free_ports",
    "main",
]

DEFAULT_STARTUP_TIMEOUT_S = 300.0
SHM_DEFAULT_BYTE_SIZE = 16 * 1024 * 1024
SHM_GROWTH_BYTE_SIZE = 16 * 1024 * 1024
ADMIN_KEY_HEADER = "glmv-admin-key"
ADMIN_KEY_ENV = "GLMV_TRITON_ADMIN_KEY"
# Triton's API groups that only the operator needs; health, metadata, model-config and inference stay open.
RESTRICTED_APIS = ("model-repository", "logging", "statistics", "trace", "shared-memory")


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with the tail of its log."""


class PortInUseError(ServerStartError):
    """A port the server needs is already in use; the message names the flag and the port."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary, its libraries and its backends are."""

    binary: Path
    backend_dir: Path | None  # None: the binary's own default (/opt/tritonserver/backends)
    lib_dir: Path | None  # added to LD_LIBRARY_PATH when set
    source: str  # "system" | "pytriton"


def _cache_dir() -> Path:
    return Path(os.environ.get("GLMV_CACHE_DIR", Path.home() / ".cache" / "glmv-serve"))


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_pytriton_backends(root: Path, cache_dir: Path) -> Path:
    """Copy the wheel's Python backend + the stub of this Python into a private backend directory."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    src_backend = root / "tritonserver" / "backends" / "python"
    # Key the directory on the wheel's files so an upgraded wheel gets a fresh copy.
    key = f"py{version}-{int(stub.stat().st_mtime)}-{stub.stat().st_size}"
    backend_dir = cache_dir / "triton_backends" / key
    python_dir = backend_dir / "python"
    if (python_dir / "triton_python_backend_stub").is_file():
        return backend_dir
    backend_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename, so concurrent launches never see a half-copied backend.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=backend_dir.parent))
    try:
        shutil.copytree(src_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        os.chmod(tmp / "python" / "triton_python_backend_stub", 0o755)
        try:
            os.rename(tmp, backend_dir)
        except OSError:
            if not (python_dir / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return backend_dir


def find_triton(cache_dir: Path | None = None) -> TritonInstall:
    """Return the system `tritonserver` if on PATH, else prepare the one bundled in nvidia-pytriton."""
    system = shutil.which("tritonserver")
    if system:
        return TritonInstall(binary=Path(system), backend_dir=None, lib_dir=None, source="system")
    root = _pytriton_root()
    if root is None:
        raise FileNotFoundError(
            "no Triton server: `tritonserver` is not on PATH and nvidia-pytriton is not installed "
            "(pip install --no-deps nvidia-pytriton==0.7.0)"
        )
    binary = root / "tritonserver" / "bin" / "tritonserver"
    lib_dir = root.parent / "nvidia_pytriton.libs"
    if not binary.is_file():
        raise FileNotFoundError(f"nvidia-pytriton is installed but has no server binary at {binary}")
    backend_dir = _prepare_pytriton_backends(root, cache_dir or _cache_dir())
    return TritonInstall(binary=binary, backend_dir=backend_dir, lib_dir=lib_dir, source="pytriton")


def _python_libdir() -> str | None:
    """The directory holding this interpreter's shared libpython, if it has one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlibrary and ldlibrary.endswith(".so") and (Path(libdir) / ldlibrary).exists():
        return str(libdir)
    return None


STUB_NUMPY_REQUIREMENT = "numpy==1.26.4"
STUB_HIDDEN_MODULES = ("scipy", "sklearn")  # compiled against numpy 2 where numpy 2 is installed


def _numpy_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("numpy").split(".")[0])
    except Exception:
        return 0


def _site_packages() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def _install_stub_numpy(target: Path) -> None:
    """Put numpy<2 into `target`: from a wheel given by env var, the project's .whl folder, or pip."""
    project_root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    wheel = os.environ.get("GLMV_STUB_NUMPY_WHEEL")
    if wheel:
        cmd.append(wheel)
    else:
        wheel_dir = project_root / ".whl"
        if wheel_dir.is_dir():
            cmd += ["--find-links", str(wheel_dir)]
        cmd.append(STUB_NUMPY_REQUIREMENT)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {STUB_NUMPY_REQUIREMENT} for the Triton Python backend stub "
            f"(set GLMV_STUB_NUMPY_WHEEL to a numpy 1.x wheel): {result.stderr.strip()[-2000:]}"
        )


def prepare_stub_env(cache_dir: Path | None = None) -> Path:
    """Create (once) the stub env and return its `bin` directory, to go first on the server's PATH."""
    import hashlib

    project_root = str(Path(__file__).resolve().parent.parent)
    sites = _site_packages()
    key_src = "|".join(
        [sys.prefix, sys.version, project_root, STUB_NUMPY_REQUIREMENT, *STUB_HIDDEN_MODULES, *sites]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = (cache_dir or _cache_dir()) / "stub_env" / key
    if (root / "pyvenv.cfg").is_file():
        return root / "bin"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
    try:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site_dir = tmp / "lib" / version / "site-packages"
        site_dir.mkdir(parents=True)
        (tmp / "bin").mkdir()
        base = Path(getattr(sys, "_base_executable", sys.executable))
        for name in ("python", "python3", version):
            (tmp / "bin" / name).symlink_to(base)
        (tmp / "pyvenv.cfg").write_text(
            f"home = {base.parent}\ninclude-system-site-packages = false\n"
            f"version = {'.'.join(map(str, sys.version_info[:3]))}\n"
        )
        _install_stub_numpy(site_dir)
        # Extension modules built against numpy 2 (scipy, and sklearn through it) cannot load beside numpy 1.x.
        # transformers imports them only when find_spec says they exist; a None entry in sys.modules makes
        # find_spec answer "absent" and a direct import raise ImportError, so they are treated as not installed.
        hidden = "; ".join(f"sys.modules.setdefault({name!r}, None)" for name in STUB_HIDDEN_MODULES)
        lines = [f"import sys; {hidden}"]
        lines += [f"import site; site.addsitedir({p!r})" for p in sites] + [project_root]
        (site_dir / "zz_glmv_serve.pth").write_text("\n".join(lines) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "pyvenv.cfg").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "bin"


def free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free now: each socket stays bound until all are picked (one by
    one, the OS may hand out the same port twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def check_ports_free(ports: dict[str, int]) -> None:
    """Raise PortInUseError for the first `{flag: port}` that cannot be bound on all interfaces now."""
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as the server sets it: a port in TIME_WAIT is free, a listening one is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError(
                    f"{flag}: port {port} is already in use (another server listens there); "
                    "stop it or choose another port"
                ) from None


class TritonServer:
    """A Triton server child process; a context manager that starts it and waits until it is ready.

    Ports of 0 are replaced by free ports. `stop()` is idempotent and leaves no child processes.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_file: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        grpc_infer_allocation_pool_size: int = 64,
        exit_timeout_s: int = 30,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        admin_key: str | None = None,
        malloc: str | Allocator | None = None,
        cpu_dma_latency_us: int | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"--model-repository: {self.model_repository} is not a directory")
        picked = iter(free_ports(3))  # distinct: a port given here is never picked for another
        given = {http_port, grpc_port, metrics_port}
        self.http_port, self.grpc_port, self.metrics_port = (
            port or next(p for p in picked if p not in given) for port in (http_port, grpc_port, metrics_port)
        )
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.grpc_infer_allocation_pool_size = grpc_infer_allocation_pool_size
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.allocator = malloc if isinstance(malloc, Allocator) else choose_allocator(malloc)
        # held from start() until stop(): no core deeper asleep than this (build_engine/cpu_latency.py)
        self.cpu_latency = None if cpu_dma_latency_us is None else CpuLatencyRequest(cpu_dma_latency_us)
        self._own_log = log_file is None
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_file = name
        self.log_file = Path(log_file).resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.install: TritonInstall | None = None
        self.stub_bin: Path | None = None
        self._stop_lock = threading.Lock()
        self.abort_event = StopRequest()  # set (e.g. from a signal handler) to cancel wait_ready

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The header that opens the restricted APIs (statistics, repository, logging, shared memory)."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """The same over gRPC: Triton expects the metadata key with a `triton-grpc-protocol-` prefix."""
        return {f"triton-grpc-protocol-{ADMIN_KEY_HEADER}": self.admin_key}

    def command(self) -> list[str]:
        assert self.install is not None
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--grpc-infer-allocation-pool-size={self.grpc_infer_allocation_pool_size}",
            f"--log-verbose={self.log_verbose}",
            "--allow-metrics=true",
            "--allow-cpu-metrics=true",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTE_SIZE}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTE_SIZE}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
        ]
        if self.install.backend_dir is not None:
            cmd.append(f"--backend-directory={self.install.backend_dir}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        assert self.install is not None
        env = dict(os.environ)
        env.update(self.extra_env)
        lib_path = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        if self.install.lib_dir is not None:
            lib_path.append(str(self.install.lib_dir))
        # The stub links libpython3.X.so; it must load this interpreter's copy, not an older system one
        # (their extension modules need matching symbols), so this interpreter's LIBDIR goes first.
        py_libdir = _python_libdir()
        if py_libdir is not None:
            lib_path.insert(0, py_libdir)
        env["LD_LIBRARY_PATH"] = ":".join(lib_path)
        # The backend stub embeds Python and finds its site-packages through the `python3` first on PATH.
        python_bin = str(self.stub_bin or Path(sys.executable).parent)
        env["PATH"] = f"{python_bin}:{env.get('PATH', '')}"
        return self.allocator.environment(env)

    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        check_ports_free(
            {
                "--http-port": self.http_port,
                "--grpc-port": self.grpc_port,
                "--metrics-port": self.metrics_port,
            }
        )
        self.install = find_triton()
        if self.install.source == "pytriton" and _numpy_major() >= 2:
            self.stub_bin = prepare_stub_env()
        if self.cpu_latency is not None:
            self.cpu_latency.hold()  # CpuLatencyError before anything starts
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"glmv-serve: {self.describe_host()}\n".encode())
        log.flush()
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # own process group: stop() can reach the backend stubs
            )
        except BaseException:
            if self.cpu_latency is not None:
                self.cpu_latency.release()
            raise
        finally:
            log.close()
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def describe_host(self) -> str:
        """The allocator and, when one is held, the CPU wake-up latency request."""
        held = self.cpu_latency is not None and self.cpu_latency.is_held
        return self.allocator.describe() + (f", {self.cpu_latency.describe()}" if held else "")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://localhost:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.abort_event.is_set():
                # A signal that lands between the server becoming ready and this loop's next probe finds a
                # running server: the caller then stops it like any running server (clean exit).
                if self.process.poll() is None and self.is_ready():
                    return
                raise ServerStartError("start-up interrupted by a signal")
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {code} before becoming ready; log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerStartError(
            f"tritonserver not ready after {timeout_s:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait for a clean exit, then SIGKILL the process group. Returns the exit code."""
        if timeout_s is None:
            timeout_s = self.exit_timeout_s + 15.0
        with self._stop_lock:
            proc = self.process
            if proc is None:
                return None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group(proc.pid)
            if proc.poll() is None:
                proc.wait()
            if self.cpu_latency is not None:
                self.cpu_latency.release()
            return proc.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """SIGKILL whatever is left in the server's process group (stubs orphaned by a crash).

        Called after the server (the group leader) was reaped. While orphans keep the group alive its id
        cannot be handed out again; once the group is empty the kernel may give that number to a new
        process, which then leads a group of its own (another server started with its own session). A live
        process whose pid is the old group id therefore means our group is gone: it must not be signalled.
        """
        if Path(f"/proc/{pgid}").exists():
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_log and not exc[0]:
            self.log_file.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmv-serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-repository", help="rendered model repository (glmv-build output)")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only prepare the bundled server's backend dir and stub env (e.g. in an image build), then exit",
    )
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", default=None, help="server log file (default: a temp file, tail on errors)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, help="seconds")
    p.add_argument(
        "--grpc-infer-allocation-pool-size", type=int, default=64, help="gRPC inference request objects kept"
    )
    p.add_argument(
        "--admin-key-file",
        default=None,
        help=f"file holding the key that opens Triton's control APIs (header {ADMIN_KEY_HEADER}); "
        f"default ${ADMIN_KEY_ENV}, else a random key nobody knows (the control APIs stay closed)",
    )
    p.add_argument(
        "--malloc",
        default=None,
        help="the server's allocator: auto (jemalloc, else tcmalloc, where installed; else glibc), jemalloc, "
        f"tcmalloc, glibc, or a library path; default ${ALLOCATOR_ENV}, else auto",
    )
    p.add_argument(
        "--cpu-dma-latency-us",
        type=int,
        default=None,
        help="while the server runs, hold the kernel's PM QoS request at this many µs "
        "(/dev/cpu_dma_latency: no core sleeps in an idle state slower to leave; 0: polling only); "
        "needs root, in a container --device /dev/cpu_dma_latency; default: not held (the host's setting)",
    )
    p.add_argument("extra", nargs="*", help="extra tritonserver arguments after `--`")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prepare:
        install = find_triton()
        stub_bin = prepare_stub_env() if install.source == "pytriton" and _numpy_major() >= 2 else None
        print(
            f"glmv-serve: {install.source} tritonserver {install.binary}; stub env {stub_bin or '(not needed)'}"
        )
        return 0
    if not args.model_repository:
        parser.error("--model-repository is required")
    for flag in ("http_port", "grpc_port", "metrics_port"):
        value = getattr(args, flag)
        if not 0 <= value < 65536:
            print(f"--{flag.replace('_', '-')}: {value} is not a TCP port", file=sys.stderr)
            return 2
    admin_key = os.environ.get(ADMIN_KEY_ENV) or None
    if args.admin_key_file:
        try:
            admin_key = Path(args.admin_key_file).read_text().strip()
        except OSError as e:
            print(f"--admin-key-file: cannot read {args.admin_key_file}: {e.strerror}", file=sys.stderr)
            return 2
        if not admin_key:
            print(f"--admin-key-file: {args.admin_key_file} is empty", file=sys.stderr)
            return 2
    try:
        server = TritonServer(
            args.model_repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_file=args.log_file,
            log_verbose=args.log_verbose,
            startup_timeout_s=args.startup_timeout,
            grpc_infer_allocation_pool_size=args.grpc_infer_allocation_pool_size,
            extra_args=args.extra,
            admin_key=admin_key,
            malloc=args.malloc,
            cpu_dma_latency_us=args.cpu_dma_latency_us,
        )
    except (FileNotFoundError, AllocatorNotFoundError, ValueError) as e:  # ValueError: a bad setting, named
        print(e, file=sys.stderr)
        return 2

    # One request for both: a signal during start-up aborts wait_ready, later it ends the wait below.
    stop_request = server.abort_event.install()
    try:
        server.start()
    except CpuLatencyError as e:
        print(e, file=sys.stderr)
        return 2
    except (ServerStartError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 1
    print(
        f"glmv-serve: ready  http :{server.http_port}  grpc :{server.grpc_port}  "
        f"metrics :{server.metrics_port}  {server.describe_host()}  log {server.log_file}",
        flush=True,
    )
    assert server.process is not None
    while not stop_request.is_set() and server.process.poll() is None:
        stop_request.wait(0.5)
    if server.process.poll() is not None:
        print(
            f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}",
            file=sys.stderr,
        )
        server.stop()
        return 1
    print("glmv-serve: shutting down", flush=True)
    code = server.stop()
    return 0 if code in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
