"""results.json: metadata (device, date, commit), GPU memory sampling, schema check, summary table.

Schema (extra keys are allowed everywhere)::

    {"meta": {"device": str, "date": "YYYY-MM-DD", "commit": str, "args": {...}, "model": str | {...}},
     "runs": [{"concurrency": int} or {"rate": float},
              "requests": int, "errors": int, "rps": float, "output_tok_s": float,
              "ttft_ms": {"p50", "p95", "p99"}, "itl_ms": {...}, "e2e_ms": {...},
              "gpu_mem_gb": float | null}, ...]}

Percentile values are numbers, or null when a run had no successful request.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIST_KEYS = ("ttft_ms", "itl_ms", "e2e_ms")


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, cwd=REPO_ROOT)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in (out or "").splitlines() if line.strip()]


def device_name() -> str:
    """'NVIDIA H100 80GB HBM3' (or 'N x ...'), else 'cpu (<processor>)'."""
    names = gpu_names()
    if names:
        return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(name: str | None = None) -> str:
    """Short file-name form: 'h100-80gb-hbm3', 'cpu'."""
    name = name or device_name()
    if name.startswith("cpu"):
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def git_commit() -> str:
    """The commit of the code that runs: a snapshot tree's own (its SNAPSHOT_COMMIT file, written by
    benchmarks/snapshot_tree.sh: it sits inside another checkout, whose git would answer), else
    $GLMV_COMMIT if set (a copied tree whose git metadata may be stale), else the working tree's short
    commit (+'-dirty' if it has changes), else 'unknown'."""
    snapshot = REPO_ROOT / "SNAPSHOT_COMMIT"
    if snapshot.is_file():
        return snapshot.read_text().strip()
    if os.environ.get("GLMV_COMMIT"):
        return os.environ["GLMV_COMMIT"]
    sha = _run(["git", "rev-parse", "--short", "HEAD"])
    if sha:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        return sha + ("-dirty" if dirty else "")
    return "unknown"


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


def make_meta(args: dict, model: str | dict, **extra) -> dict:
    return {
        "device": device_name(),
        "date": today(),
        "commit": git_commit(),
        "args": args,
        "model": model,
        **extra,
    }


def results_dir(base: str | Path, meta: dict) -> Path:
    """<base>/<YYYY-MM-DD>-<device>-<shortcommit>/"""
    commit = str(meta["commit"]).replace("-dirty", "")[:12]
    return Path(base) / f"{meta['date']}-{device_slug(meta['device'])}-{commit}"


def gpu_memory_used_gb() -> float | None:
    """Memory in use on all GPUs together (nvidia-smi), or None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    out = _run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], timeout=5)
    if not out:
        return None
    try:
        return round(sum(float(v) for v in out.split()) / 1024.0, 3)  # MiB -> GiB
    except ValueError:
        return None


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat, clock ticks); with ``children``,
    plus that of every process below it that is still running (e.g. tritonserver and its backend stubs)."""
    total, pids = 0.0, [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if children:
            for task in Path(f"/proc/{current}/task").glob("*/children"):
                try:
                    pids += [int(child) for child in task.read_text().split()]
                except OSError:
                    pass
    return total


class GpuMemorySampler:
    """Samples nvidia-smi in a thread; ``take_peak()`` returns the peak since the last call (GiB) or None."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.enabled = shutil.which("nvidia-smi") is not None
        self._peak: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        used = gpu_memory_used_gb()
        if used is not None:
            with self._lock:
                self._peak = used if self._peak is None else max(self._peak, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuMemorySampler:
        if self.enabled:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="gpu-mem", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def take_peak(self) -> float | None:
        if not self.enabled:
            return None
        self._sample()
        with self._lock:
            peak, self._peak = self._peak, None
        return peak


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(doc: dict) -> None:
    """Raises ValueError listing every way ``doc`` breaks the results.json schema."""
    problems: list[str] = []
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        problems.append("meta: missing or not an object")
    else:
        for key in ("device", "date", "commit"):
            if not isinstance(meta.get(key), str) or not meta.get(key):
                problems.append(f"meta.{key}: missing or not a non-empty string")
        if isinstance(meta.get("date"), str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["date"]):
            problems.append(f"meta.date: {meta['date']!r} is not YYYY-MM-DD")
        if not isinstance(meta.get("args"), dict):
            problems.append("meta.args: missing or not an object")
        if "model" not in meta:
            problems.append("meta.model: missing")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        problems.append("runs: missing or empty")
        runs = []
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(run, dict):
            problems.append(f"{where}: not an object")
            continue
        has_c, has_r = "concurrency" in run, "rate" in run
        if has_c == has_r:
            problems.append(f"{where}: needs exactly one of concurrency / rate")
        if has_c and not (isinstance(run["concurrency"], int) and run["concurrency"] >= 1):
            problems.append(f"{where}.concurrency: {run['concurrency']!r} is not an integer >= 1")
        if has_r and not (_is_number(run["rate"]) and run["rate"] > 0):
            problems.append(f"{where}.rate: {run['rate']!r} is not a number > 0")
        for key in ("requests", "errors"):
            if not (isinstance(run.get(key), int) and run[key] >= 0):
                problems.append(f"{where}.{key}: missing or not an integer >= 0")
        for key in ("rps", "output_tok_s"):
            if not (_is_number(run.get(key)) and run[key] >= 0):
                problems.append(f"{where}.{key}: missing or not a number >= 0")
        for key in DIST_KEYS:
            dist = run.get(key)
            if not isinstance(dist, dict):
                problems.append(f"{where}.{key}: missing or not an object")
                continue
            for p in ("p50", "p95", "p99"):
                v = dist.get(p, "missing")
                if not (v is None or (_is_number(v) and v >= 0)):
                    problems.append(f"{where}.{key}.{p}: {v!r} is not a number >= 0 or null")
        if "gpu_mem_gb" not in run or not (run["gpu_mem_gb"] is None or _is_number(run["gpu_mem_gb"])):
            problems.append(f"{where}.gpu_mem_gb: missing or not a number or null")
    if problems:
        raise ValueError("results.json does not match the schema:\n  " + "\n  ".join(problems))


def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def summary_markdown(doc: dict) -> str:
    """A markdown table of the runs, headed by the metadata."""
    meta = doc["meta"]
    model = meta["model"] if isinstance(meta["model"], str) else meta["model"].get("name", str(meta["model"]))
    args = meta.get("args", {})
    lines = [
        f"# Benchmark: {args.get('target', '?')} target, {model}",
        "",
        f"- device: {meta['device']}",
        f"- date: {meta['date']}, commit: {meta['commit']}",
        f"- image size: {args.get('image_size', '?')}, max_tokens: {args.get('max_tokens', '?')}, "
        f"duration per run: {args.get('duration', '?')} s",
        "",
        "| load | requests | errors | req/s | out tok/s | TTFT p50 / p95 / p99 (ms) | ITL p50 / p95 / p99 (ms) "
        "| e2e p50 / p95 / p99 (ms) | GPU mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in doc["runs"]:
        load = f"c={run['concurrency']}" if "concurrency" in run else f"{run['rate']} req/s"
        dists = [" / ".join(_fmt(run[k].get(p)) for p in ("p50", "p95", "p99")) for k in DIST_KEYS]
        lines.append(
            f"| {load} | {run['requests']} | {run['errors']} | {run['rps']:.2f} | {run['output_tok_s']:.1f} | "
            + " | ".join(dists)
            + f" | {_fmt(run['gpu_mem_gb'], 2)} |"
        )
    errors: dict[str, int] = {}
    for run in doc["runs"]:
        for msg, n in (run.get("error_messages") or {}).items():
            errors[msg] = errors.get(msg, 0) + n
    if errors:
        lines += ["", "Errors seen:", ""] + [f"- {n} x `{msg}`" for msg, n in errors.items()]
    return "\n".join(lines) + "\n"
