"""Which malloc `tritonserver` runs with: jemalloc or tcmalloc through LD_PRELOAD where installed, else glibc's.

Contract:
- `choose_allocator(setting)` turns the setting (`glmv-serve --malloc` / `TritonServer(malloc=...)`; None:
  `$GLMV_TRITON_MALLOC`, else `auto`) into an `Allocator`:
  - `auto`: jemalloc if its library is in one of `LIBRARY_DIRS`, else tcmalloc, else glibc. Never fails.
  - `jemalloc` / `tcmalloc`: that library; not installed raises `AllocatorNotFoundError` naming the setting
    and the directories searched.
  - `glibc`: no preload.
  - an absolute path: that shared library; a missing file raises `AllocatorNotFoundError`.
  Anything else raises `AllocatorNotFoundError` listing the accepted values.
- `Allocator.environment(env)` returns `env` with the library first on LD_PRELOAD (kept once when the
  caller's LD_PRELOAD already has it) and, for jemalloc, `MALLOC_CONF=JEMALLOC_CONF` unless the caller set
  MALLOC_CONF; glibc returns `env` unchanged. `Allocator.describe()` is the log line.
- The preload reaches the Python backend stubs too: Triton starts each one through `bash -c exec …`,
  which passes the server's environment on.

Why: Triton's HTTP and gRPC frontends run some 300 threads, which glibc spreads over up to 8 arenas a
core, and an arena keeps the pages of the largest request bodies its threads once held: in a CPU soak
one of tritonserver's 16 arenas held 21 MB with 0.3 MB in use, and the server's memory climbed in steps
as more arenas met a large body. jemalloc gives freed pages back (`JEMALLOC_CONF`: within about a
second). Triton's model management guide recommends tcmalloc or jemalloc through LD_PRELOAD for such
growth; tcmalloc's heap still grew in steps in a like soak, so auto tries jemalloc first. NVIDIA's
Triton images ship both; Debian and Ubuntu package them as `libjemalloc2` and `libtcmalloc-minimal4`.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALLOCATOR_ENV",
    "AUTO_ORDER",
    "JEMALLOC_CONF",
    "LIBRARY_DIRS",
    "LIBRARY_NAMES",
    "Allocator",
    "AllocatorNotFoundError",
    "choose_allocator",
]

ALLOCATOR_ENV = "GLMV_TRITON_MALLOC"
LIBRARY_NAMES: dict[str, tuple[str, ...]] = {  # first match wins
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
AUTO_ORDER = ("jemalloc", "tcmalloc")
# Freed pages go back to the system after about a second, from jemalloc's own thread even while the server
# is idle (by default they are kept 10 s and purged only when that arena allocates again). No per-thread
# caches: each of Triton's ~300 threads would keep one (18 MB more resident in the CPU soak than glibc).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache:false"


def _multiarch() -> str:
    return sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


LIBRARY_DIRS: tuple[Path, ...] = tuple(
    Path(d)
    for d in (
        f"/usr/lib/{_multiarch()}",
        f"/lib/{_multiarch()}",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    )
)


class AllocatorNotFoundError(ValueError):
    """The allocator asked for is not installed, or the setting is not one of the accepted values."""


@dataclass(frozen=True)
class Allocator:
    """The malloc the server runs with."""

    name: str  # "jemalloc" | "tcmalloc" | "glibc" | the file name of another library given by path
    library: Path | None  # preloaded; None: glibc's malloc
    reason: str  # why this one, for the log line

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        out = dict(env)
        if self.library is None:
            return out
        preload = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
        out["LD_PRELOAD"] = ":".join([str(self.library), *(p for p in preload if p != str(self.library))])
        if self.name == "jemalloc":
            out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        return out

    def describe(self) -> str:
        if self.library is None:
            return f"malloc glibc ({self.reason})"
        return f"malloc {self.name} (LD_PRELOAD {self.library}; {self.reason})"


def _find(name: str, dirs: Sequence[Path]) -> Path | None:
    for directory in dirs:
        for filename in LIBRARY_NAMES[name]:
            candidate = directory / filename
            if candidate.is_file():
                return candidate
    return None


def choose_allocator(setting: str | None = None, dirs: Sequence[Path] = LIBRARY_DIRS) -> Allocator:
    """The allocator for `setting` (see the module docstring); `dirs`: where libraries are looked for."""
    if setting is None:
        setting = os.environ.get(ALLOCATOR_ENV) or "auto"
    where = ", ".join(str(d) for d in dirs)
    value = setting.strip()
    if value == "auto":
        for name in AUTO_ORDER:
            library = _find(name, dirs)
            if library is not None:
                return Allocator(name, library, "auto: the first of jemalloc, tcmalloc installed")
        return Allocator("glibc", None, f"auto: neither jemalloc nor tcmalloc is installed in {where}")
    if value == "glibc":
        return Allocator("glibc", None, f"{ALLOCATOR_ENV}=glibc")
    if value in LIBRARY_NAMES:
        library = _find(value, dirs)
        if library is None:
            names = " or ".join(LIBRARY_NAMES[value])
            raise AllocatorNotFoundError(
                f"--malloc / {ALLOCATOR_ENV}: {value} asked for, but no {names} in {where} "
                f"(install libjemalloc2 / libtcmalloc-minimal4, or use auto or glibc)"
            )
        return Allocator(value, library, f"{ALLOCATOR_ENV}={value}")
    if os.path.isabs(value):
        library = Path(value)
        if not library.is_file():
            raise AllocatorNotFoundError(f"--malloc / {ALLOCATOR_ENV}: {value} is not a file")
        name = next((n for n in LIBRARY_NAMES if n in library.name), library.name)
        return Allocator(name, library, f"{ALLOCATOR_ENV}={value}")
    raise AllocatorNotFoundError(
        f"--malloc / {ALLOCATOR_ENV}: {setting!r} is not auto, jemalloc, tcmalloc, glibc or an absolute path "
        "to a shared library"
    )
