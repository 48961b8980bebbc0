"""Build an engine with ``glmv-build`` and serve it with Triton, for the smoke run, tests and the GPU harness.

``local_triton(preset, device, dtype, workdir)`` is a context manager yielding the running
:class:`build_engine.launcher.TritonServer` (free ports; ``server.grpc_url`` / ``server.http_url``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.results import REPO_ROOT


def build_engine(
    preset: str,
    output: Path,
    device: str = "cpu",
    dtype: str | None = None,
    timeout_s: float = 900,
    extra_args: Sequence[str] = (),
) -> Path:
    """Run ``glmv-build --preset PRESET --output OUTPUT --device DEVICE [--dtype DTYPE] EXTRA...``."""
    argv = ["glmv-build", "--preset", preset, "--output", str(output), "--device", device]
    if dtype:
        argv += ["--dtype", dtype]
    argv += list(extra_args)
    # The console script may not be installed (running from a checkout): run the package instead.
    if (REPO_ROOT / "build_engine" / "__main__.py").is_file():
        cmd = [sys.executable, "-m", "build_engine", *argv[1:]]
    else:
        code = f"import sys; sys.argv = {argv!r}; from build_engine.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", code]
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO_ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO_ROOT)
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"glmv-build --preset {preset} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    print(
        f"built {preset} engine in {time.perf_counter() - started:.1f} s -> {output}",
        file=sys.stderr,
        flush=True,
    )
    return output


def find_model_repository(output: Path) -> Path:
    """The rendered model repository inside a glmv-build output (the directory holding ensemble/)."""
    if (output / "ensemble" / "config.pbtxt").is_file():
        return output
    for config in sorted(output.glob("**/ensemble/config.pbtxt")):
        return config.parent.parent
    raise FileNotFoundError(f"no model repository (ensemble/config.pbtxt) under {output}")


@contextlib.contextmanager
def local_triton(
    preset: str = "tiny",
    device: str = "cpu",
    dtype: str | None = None,
    workdir: Path | None = None,
    log_file: Path | None = None,
    startup_timeout_s: float = 600.0,
    build_args: Sequence[str] = (),
    cpu_dma_latency_us: int | None = None,
) -> Iterator:
    """Build ``preset`` into ``workdir`` (a temp dir by default; ``build_args``: more glmv-build flags) and
    serve it on free ports (``cpu_dma_latency_us``: glmv-serve's --cpu-dma-latency-us)."""
    import tempfile

    from build_engine.launcher import TritonServer

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"glmv-{preset}-")))
        output = build_engine(
            preset, Path(workdir) / "engine", device=device, dtype=dtype, extra_args=build_args
        )
        repo = find_model_repository(output)
        server = TritonServer(
            repo,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            log_file=log_file,
            startup_timeout_s=startup_timeout_s,
            cpu_dma_latency_us=cpu_dma_latency_us,
        )
        started = time.perf_counter()
        with server:
            print(
                f"triton ready in {time.perf_counter() - started:.1f} s (grpc {server.grpc_url}, log {server.log_file})",
                file=sys.stderr,
                flush=True,
            )
            yield server


class GatewayNotStarted(RuntimeError):
    """``python -m gateway`` exited or did not answer in time; the message ends with its log's tail."""


@contextlib.contextmanager
def local_gateway(
    triton_urls: Sequence[str],
    log_file: Path,
    extra_args: Sequence[str] = (),
    ready_path: str = "/healthz",
    timeout_s: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m gateway`` in front of ``triton_urls`` on a free port, its output in ``log_file``;
    yields (its URL, the process) once ``ready_path`` answers 200, and stops it on exit."""
    import httpx

    from build_engine.launcher import free_port

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "gateway", "--triton-url", ",".join(triton_urls), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", *extra_args]
    with open(log_file, "w") as log:
        gateway = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url + ready_path, timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(Path(log_file).read_text(errors="replace").strip().splitlines()[-5:])
                raise GatewayNotStarted(f"the gateway did not start (exit {gateway.poll()}): {tail}")
            time.sleep(0.3)
        yield url, gateway
    finally:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
