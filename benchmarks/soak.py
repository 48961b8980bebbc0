"""``python -m benchmarks.soak``: minutes of mixed load, cancellations and bad input through every door.

Builds an engine (``--preset``, ``--device``), serves it with the launcher's Triton and a gateway process,
then runs ``--concurrency`` workers for ``--minutes``. Each request picks one of these kinds:

- ``gateway_stream`` / ``gateway_json``: a whole answer from the gateway (SSE / JSON);
- ``gateway_stream_cut`` / ``gateway_json_cut``: the client goes away after a few chunks / while waiting;
- ``grpc_stream`` / ``grpc_cut``: ``glmv_client.AsyncClient`` over gRPC, whole or left after a few deltas;
- ``http_stream`` / ``http_cut``: Triton's HTTP ``generate_stream``, whole or closed after a few events;
- ``bad_gateway`` / ``bad_triton``: malformed input (deep JSON, lone surrogates, out-of-range fields,
  a text over the byte limit, a broken image) that must be refused with a 4xx naming the field.

Every request ends as one outcome: ``ok`` (a finish_reason), ``cancelled`` (cut on purpose), ``refused``
(a bad input refused as it should be) or ``error`` (anything else, kept by message); a request that never
ends counts as ``lost``. Every ``--sample-s`` the RSS of tritonserver, each backend stub (by model) and the
gateway, split into its anonymous (heap), file-backed (code) and shared-memory parts, and the llm's active
requests and used KV blocks are recorded. The server's allocator is ``--malloc`` (the launcher's setting). At the end, once the server is
idle, the used KV blocks must be 0. Writes ``soak.json`` and ``soak.png`` under
``<out>/<date>-<device>-soak-<commit>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from glmv_client.results import aevent_lines

from benchmarks.results import REPO_ROOT, device_slug, make_meta

KINDS = {  # kind: weight
    "gateway_stream": 3,
    "gateway_stream_cut": 3,
    "gateway_json": 2,
    "gateway_json_cut": 1,
    "grpc_stream": 2,
    "grpc_cut": 2,
    "http_stream": 1,
    "http_cut": 1,
    "bad_gateway": 1,
    "bad_triton": 1,
}
MODEL = "glm-4.6v-flash"
PROMPTS = ("Describe this picture.", "What does the image say?", "图片里有什么？", "Tell me a long story.")


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = random.Random(seed)
    img = Image.new(
        "RGB", (rng.randint(32, 96), rng.randint(32, 96)), tuple(rng.randrange(256) for _ in "rgb")
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Soak:
    """The load, the samples and the tally of one run."""

    def __init__(self, args: argparse.Namespace, triton: Any, gateway_url: str, max_tokens: int) -> None:
        self.args = args
        self.triton = triton
        self.gateway_url = gateway_url
        self.max_tokens = max_tokens
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.images = [_png(i) for i in range(8)]
        self.rng = random.Random(args.seed)

    # -- requests ---------------------------------------------------------------------------------

    def _chat(self, stream: bool, tokens: int) -> dict[str, Any]:
        import base64

        content: list[dict[str, Any]] = [{"type": "text", "text": self.rng.choice(PROMPTS)}]
        if self.rng.random() < 0.5:
            uri = "data:image/png;base64," + base64.b64encode(self.rng.choice(self.images)).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": stream,
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0.8,
            "seed": self.rng.randrange(1 << 30),  # never answered from the gateway's cache
        }

    async def _gateway(self, http: httpx.AsyncClient, stream: bool, cut: bool) -> str:
        tokens = self.max_tokens * (8 if cut else 1)
        body = self._chat(stream, tokens)
        if not stream:
            try:
                r = await http.post(
                    f"{self.gateway_url}/v1/chat/completions", json=body, timeout=0.5 if cut else 600
                )
            except httpx.TimeoutException:
                if cut:
                    return "cancelled"
                raise
            if r.status_code != 200:
                return f"error: gateway {r.status_code} {r.text[:160]}"
            return "ok" if r.json()["choices"][0]["finish_reason"] else "error: no finish_reason"
        chunks = 0
        async with http.stream(
            "POST", f"{self.gateway_url}/v1/chat/completions", json=body, timeout=600
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return f"error: gateway {r.status_code} {r.text[:160]}"
            async for line in aevent_lines(r.aiter_text()):
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "ok"
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error: gateway stream {event['error'].get('message', '')[:160]}"
                chunks += 1
                if cut and chunks >= 3:
                    return "cancelled"
        return "error: gateway stream ended without [DONE]"

    async def _grpc(self, client: Any, cut: bool) -> str:
        from glmv_client import Finish

        tokens = self.max_tokens * (8 if cut else 1)
        images = [self.rng.choice(self.images)] if self.rng.random() < 0.5 else None
        stream = client.stream(images, self.rng.choice(PROMPTS), max_tokens=tokens, min_tokens=tokens)
        deltas = 0
        try:
            async for item in stream:
                if isinstance(item, Finish):
                    return (
                        "ok" if item.finish_reason in ("stop", "length") else f"error: {item.finish_reason}"
                    )
                deltas += 1
                if cut and deltas >= 3:
                    return "cancelled"
        finally:
            await stream.aclose()
        return "error: grpc stream ended without a Finish"

    async def _http(self, http: httpx.AsyncClient, cut: bool) -> str:
        tokens = self.max_tokens * (8 if cut else 1)
        body = {
            "text_input": self.rng.choice(PROMPTS),
            "max_tokens": tokens,
            "min_tokens": tokens,
            "stream": True,
        }
        url = f"http://{self.triton.http_url}/v2/models/ensemble/generate_stream"
        events = 0
        async with http.stream("POST", url, json=body, timeout=600) as r:
            if r.status_code != 200:
                await r.aread()
                return f"error: triton http {r.status_code} {r.text[:160]}"
            async for line in aevent_lines(r.aiter_text()):
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return f"error: triton http {event['error'][:160]}"
                events += 1
                if cut and events >= 3:
                    return "cancelled"
                if event.get("finish_reason"):
                    return "ok"
        return "error: generate_stream ended without a finish_reason"

    async def _bad_gateway(self, http: httpx.AsyncClient) -> str:
        cases = [
            b"[" * 100_000 + b"]" * 100_000,
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
            % MODEL.encode(),
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}'
            % MODEL.encode(),
            b'{"model": "%s", "messages": []}' % MODEL.encode(),
            b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}' % MODEL.encode(),
            b"{not json",
        ]
        raw = self.rng.choice(cases)
        r = await http.post(
            f"{self.gateway_url}/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        if 400 <= r.status_code < 500 and "error" in r.json():
            return "refused"
        return f"error: bad input answered {r.status_code} {r.text[:160]}"

    async def _bad_triton(self, http: httpx.AsyncClient) -> str:
        cases = [
            {"text_input": "hi", "max_tokens": 0},
            {"text_input": "hi", "max_tokens": 8, "temperature": -1.0},
            {"text_input": "x" * (self.args.oversize_bytes), "max_tokens": 8},
            {"text_input": "hi", "max_tokens": 8, "image_input": ["not an image"]},
        ]
        body = self.rng.choice(cases)
        r = await http.post(
            f"http://{self.triton.http_url}/v2/models/ensemble/generate", json=body, timeout=120
        )
        if 400 <= r.status_code < 500 and "error" in r.json():
            return "refused"
        return f"error: bad input answered {r.status_code} {r.text[:160]}"

    async def one(self, kind: str, http: httpx.AsyncClient, client: Any) -> str:
        if kind.startswith("gateway_"):
            return await self._gateway(http, stream="stream" in kind, cut=kind.endswith("_cut"))
        if kind.startswith("grpc_"):
            return await self._grpc(client, cut=kind.endswith("_cut"))
        if kind.startswith("http_"):
            return await self._http(http, cut=kind.endswith("_cut"))
        if kind == "bad_gateway":
            return await self._bad_gateway(http)
        return await self._bad_triton(http)

    async def worker(self, deadline: float, http: httpx.AsyncClient, client: Any) -> None:
        names, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(names, weights)[0]
            try:
                outcome = await asyncio.wait_for(self.one(kind, http, client), self.args.request_timeout_s)
            except asyncio.TimeoutError:
                outcome = "lost"
            except Exception as exc:  # kept by message: every error must be explained
                outcome = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            if outcome.startswith("error"):
                self.errors[f"{kind}: {outcome[7:]}"] += 1
                outcome = "error"
            self.outcomes[(kind, outcome)] += 1

    # -- samples ----------------------------------------------------------------------------------

    def sample(self, started: float, gateway_pid: int) -> None:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1)}
        assert self.triton.process is not None
        pids = {"tritonserver": self.triton.process.pid, "gateway": gateway_pid}
        for pid, model in _stubs(str(self.triton.model_repository)):
            pids[f"stub:{model}"] = pid
        parts = {name: _rss_parts_mb(pid) for name, pid in pids.items()}
        for key, field in RSS_FIELDS.items():
            row[key] = {name: p.get(field) for name, p in parts.items()}
        row["active"] = _metric(self.triton, "nv_trt_llm_request_metrics", 'request_type="active"')
        row["kv_used"] = _metric(
            self.triton, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"'
        )
        row["requests"] = sum(self.outcomes.values())
        self.samples.append(row)

    async def run(self, gateway_pid: int) -> None:
        from glmv_client import AsyncClient

        started = time.monotonic()
        deadline = started + self.args.minutes * 60
        limits = httpx.Limits(max_connections=4 * self.args.concurrency)
        async with (
            httpx.AsyncClient(limits=limits) as http,
            AsyncClient(self.triton.grpc_url, timeout=600) as client,
        ):
            workers = [
                asyncio.ensure_future(self.worker(deadline, http, client))
                for _ in range(self.args.concurrency)
            ]
            while not all(w.done() for w in workers):
                self.sample(started, gateway_pid)
                await asyncio.wait(workers, timeout=self.args.sample_s)
            for w in workers:
                w.result()
        # Idle: every request has ended (cut ones within a step); give the engine the time to say so.
        idle_deadline = time.monotonic() + 120
        while time.monotonic() < idle_deadline:
            self.sample(started, gateway_pid)
            if self.samples[-1]["active"] == 0 and self.samples[-1]["kv_used"] == 0:
                break
            await asyncio.sleep(1.0)


RSS_FIELDS = {  # sample key: /proc/<pid>/status field
    "rss_mb": "VmRSS",
    "rss_anon_mb": "RssAnon",  # heap and other private memory: where a leak or fragmentation shows
    "rss_file_mb": "RssFile",  # pages of the binary and its libraries, read in as code paths are first run
    "rss_shmem_mb": "RssShmem",  # touched pages of the Python backend's shared-memory regions
}


def _rss_parts_mb(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous, file and shared-memory parts of one process, in MB ({} once it is gone)."""
    fields = set(RSS_FIELDS.values())
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return {}
    return out


def _stubs(marker: str) -> list[tuple[int, str]]:
    """(pid, model instance) of the backend stubs serving the model repository `marker`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and marker.encode() in b" ".join(argv):
            # argv: stub, model.py path, shm region, shm sizes, parent pid, backend dir, ipc size, instance name
            out.append((int(entry.name), argv[8].decode() if len(argv) > 8 else "?"))
    return sorted(out, key=lambda p: p[1])


def _metric(server: Any, name: str, labels: str) -> float:
    try:
        body = httpx.get(server.metrics_url, timeout=10).text
    except httpx.HTTPError:
        return float("nan")
    found = re.findall(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", body, re.MULTILINE)
    return sum(float(v) for v in found)


def memory_growth(samples: list[dict[str, Any]], key: str = "rss_mb") -> dict[str, float | None]:
    """Per process: mean `key` (RSS or a part) of the last quarter over the mean of the second quarter
    (after warm-up), in %."""
    names = sorted({n for s in samples for n in s[key]})
    n = len(samples)
    out: dict[str, float | None] = {}
    for name in names:
        early = [s[key].get(name) for s in samples[n // 4 : n // 2]]
        late = [s[key].get(name) for s in samples[3 * n // 4 :]]
        early = [v for v in early if v]
        late = [v for v in late if v]
        out[name] = (
            round(100 * (sum(late) / len(late) / (sum(early) / len(early)) - 1), 2)
            if early and late
            else None
        )
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, (ax1, ax3, ax2) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    for name in sorted({n for s in samples for n in s["rss_mb"]}):
        ax1.plot(t, [s["rss_mb"].get(name) for s in samples], label=name)
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(fontsize=7, ncol=2)
    for name in ("tritonserver", "gateway"):
        for key, style in (("rss_anon_mb", "-"), ("rss_file_mb", ":"), ("rss_shmem_mb", "--")):
            values = [s.get(key, {}).get(name) for s in samples]
            ax3.plot(t, values, style, label=f"{name} {key[4:-3]}")
    ax3.set_ylabel("RSS parts (MB)")
    ax3.legend(fontsize=7, ncol=2)
    ax2.plot(t, [s["active"] for s in samples], label="active requests")
    ax2.plot(t, [s["kv_used"] for s in samples], label="KV blocks used")
    ax2.set_xlabel("minutes")
    ax2.legend(fontsize=8)
    meta = doc["meta"]
    malloc = meta.get("malloc", "malloc ?").split(" (")[0]  # the allocator's name, without its path
    fig.suptitle(
        f"soak {meta['args']['minutes']} min, {meta['device']}, {meta['commit']}, {meta['date']}, "
        f"tritonserver {malloc}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine-args", default="", help="extra glmv-build arguments")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of a whole answer (cut ones ask 8 x)")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument(
        "--request-timeout-s", type=float, default=600.0, help="a request not ended by then is lost"
    )
    p.add_argument("--oversize-bytes", type=int, default=4 << 20, help="size of the too-long text_input case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc",
        default=None,
        help="tritonserver's allocator (glmv-serve --malloc; default as glmv-serve's)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from benchmarks.server import GatewayNotStarted, build_engine, find_model_repository, local_gateway
    from build_engine.launcher import TritonServer

    args = parse_args(argv)
    meta = make_meta(vars(args), args.preset)
    out_dir = Path(args.out) / f"{meta['date']}-{device_slug(meta['device'])}-soak-{meta['commit'][:12]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="glmv-soak-") as work:
        engine = build_engine(
            args.preset, Path(work) / "engine", args.device, extra_args=args.engine_args.split()
        )
        config = json.loads((engine / "engine_config.json").read_text())
        with TritonServer(
            find_model_repository(engine),
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            log_file=out_dir / "triton.log",
            malloc=args.malloc,
        ) as triton:
            try:
                with local_gateway([triton.grpc_url], out_dir / "gateway.log") as (gateway_url, gateway):
                    soak = Soak(args, triton, gateway_url, args.max_tokens)
                    started = time.time()
                    asyncio.run(soak.run(gateway.pid))
                    wall_s = time.time() - started
            except GatewayNotStarted as exc:  # a soak without its gateway measures nothing of the gateway
                raise SystemExit(f"soak: {exc}") from None
        triton_exit = triton.process.returncode if triton.process else None
    by_outcome = Counter()
    for (_, outcome), n in soak.outcomes.items():
        by_outcome[outcome] += n
    last = soak.samples[-1]
    doc = {
        "meta": {**meta, "engine": config.get("engine", config), "malloc": triton.allocator.describe()},
        "wall_s": round(wall_s, 1),
        "requests": sum(by_outcome.values()),
        "outcomes": dict(by_outcome),
        "by_kind": {f"{k}/{o}": n for (k, o), n in sorted(soak.outcomes.items())},
        "lost": by_outcome.get("lost", 0),
        "cancelled": by_outcome.get("cancelled", 0),
        "errors_by_kind": dict(soak.errors.most_common()),
        "end": {"active": last["active"], "kv_used_blocks": last["kv_used"]},
        "rss_growth_pct": memory_growth(soak.samples),
        "rss_part_growth_pct": {
            key[4:-3]: memory_growth(soak.samples, key) for key in RSS_FIELDS if key != "rss_mb"
        },
        "triton_exit_code": triton_exit,
        "samples": soak.samples,
    }
    (out_dir / "soak.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    plot(doc, out_dir / "soak.png")
    summary = {k: doc[k] for k in ("requests", "outcomes", "lost", "cancelled", "errors_by_kind", "end")}
    growth = {k: doc[k] for k in ("rss_growth_pct", "rss_part_growth_pct")}
    print(json.dumps({**summary, **growth, "malloc": doc["meta"]["malloc"], "out": str(out_dir)}, indent=1))
    return 0 if not doc["lost"] and not soak.errors and last["kv_used"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
