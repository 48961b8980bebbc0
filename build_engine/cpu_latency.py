"""The kernel's CPU wake-up latency request (PM QoS) that glmv-serve may hold while Triton runs.

While a process keeps `/dev/cpu_dma_latency` open after writing a 32-bit number N to it, no core of the host
enters an idle state whose exit latency is over N µs (0: none deeper than polling); closing the file ends
the request, and the kernel keeps the strictest of the requests open. Between two requests, or two tokens,
the Python stubs of the ensemble, the engine's loop and Triton's threads sleep; a core in a deep idle state
takes tens of µs to wake and comes back with cold caches, and a request crosses several such threads. This
is what hosts tuned for latency set (tuned's `latency-performance` profile holds the same request);
opening the file needs root (in a container, the device passed in: `--device /dev/cpu_dma_latency`).

The request acts through the kernel's cpuidle driver (intel_idle, acpi_idle, haltpoll in KVM guests...): on a
host whose cpuidle driver is "none" (`idle_driver()`; many VMs) the cores halt the same way whatever is
asked, and `describe()` says so.

`CpuLatencyRequest(us).hold()` opens and writes; `release()` closes (idempotent); `current_us()` reads the
value the kernel applies now. A request that cannot be held raises `CpuLatencyError`, whose message names
the flag, the file and the reason.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

CPU_DMA_LATENCY = Path("/dev/cpu_dma_latency")
CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")
FLAG = "--cpu-dma-latency-us"


class CpuLatencyError(RuntimeError):
    """The PM QoS request could not be held (the file is missing or not writable here)."""


def current_us(path: Path | None = None) -> int:
    """The wake-up latency (µs) the kernel applies now: the strictest request held, else its default."""
    fd = os.open(path or CPU_DMA_LATENCY, os.O_RDONLY)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


def idle_driver(root: Path | None = None) -> str | None:
    """The host's cpuidle driver and governor ("intel_idle/menu"; "none" when the kernel has none), or None
    where sysfs does not say."""
    root = root or CPUIDLE
    try:
        driver = (root / "current_driver").read_text().strip()
    except OSError:
        return None
    try:
        governor = (root / "current_governor_ro").read_text().strip()
    except OSError:
        try:
            governor = (root / "current_governor").read_text().strip()
        except OSError:
            governor = ""
    return f"{driver}/{governor}" if governor and driver != "none" else driver


class CpuLatencyRequest:
    """One PM QoS request of ``us`` µs, held from ``hold()`` until ``release()``."""

    def __init__(self, us: int, path: Path | None = None) -> None:
        if us < 0:
            raise ValueError(f"{FLAG}: {us} must be an integer >= 0")
        self.us = us
        self.path = Path(path or CPU_DMA_LATENCY)
        self._fd: int | None = None

    @property
    def is_held(self) -> bool:
        return self._fd is not None

    def hold(self) -> CpuLatencyRequest:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError as exc:
            hint = (
                " (needs root; in a container, --device /dev/cpu_dma_latency)" if exc.errno in (1, 13) else ""
            )
            raise CpuLatencyError(
                f"{FLAG} {self.us}: cannot open {self.path}: {exc.strerror}{hint}"
            ) from None
        try:
            os.write(fd, struct.pack("i", self.us))
        except OSError as exc:
            os.close(fd)
            raise CpuLatencyError(
                exc.errno, f"{FLAG} {self.us}: cannot write {self.path}: {exc.strerror}"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def describe(self) -> str:
        if not self.is_held:
            return "CPU wake-up latency: host default"
        driver = idle_driver()
        if driver == "none":
            return (
                f"CPU wake-up latency <= {self.us} us held (no effect here: the host has no cpuidle driver)"
            )
        return f"CPU wake-up latency <= {self.us} us" + (f" (cpuidle {driver})" if driver else "")
