"""What a streamed response's tensor count costs through an ensemble of two Python models:
``python -m benchmarks.response_cost --out DIR``.

The serving ensemble passes every streamed response from the llm (a decoupled Python model) through
postprocessing (a second Python model) to the client. This builds the same shape with no model in it: a
decoupled `source` that streams `--responses` responses of K INT32 [1] tensors per request, a `sink` that
passes each response on with every one of its 16 outputs (those missing filled, as postprocessing does),
and an ensemble of the two, served by the launcher's Triton. For each K of `--tensors` (in turns, `--repeats`
times) it streams `--streams` requests at once over gRPC and reports the responses per second at the
client and the server's CPU time (tritonserver and its stubs, user + system) per response. With
`--cancel-check` each K also runs through a second pair whose sink asks `request.is_cancelled()` of every
response, as postprocessing does of a stream's response once per `cancellation_check_period_ms`.

Writes ``response_cost.json`` (meta: device, date, commit) and ``response_cost.png`` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.results import cpu_seconds, make_meta

OUTPUTS = 16

SOURCE = """
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.tensors = [pb_utils.Tensor(f"t{i}", np.array([i], np.int32)) for i in range(OUTPUTS)]

    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy()[0])
            k = int(pb_utils.get_input_tensor_by_name(request, "k").as_numpy()[0])
            threading.Thread(target=self.stream, args=(request.get_response_sender(), n, k)).start()
        return None

    def stream(self, sender, n, k):
        for j in range(n):
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if j == n - 1 else 0
            sender.send(pb_utils.InferenceResponse(output_tensors=self.tensors[:k]), flags=flags)
"""

SINK = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.fill = [pb_utils.Tensor(f"t{i}", np.array([i], np.int32)) for i in range(OUTPUTS)]

    def execute(self, requests):
        responses = []
        for request in requests:
            if CHECK:
                request.is_cancelled()
            inputs = {tensor.name(): tensor for tensor in request.inputs()}
            tensors = [inputs.get(f"t{i}") or self.fill[i] for i in range(OUTPUTS)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""


def _write_repository(root: Path) -> None:
    def tensors(optional: bool) -> str:
        extra = " optional: true" if optional else ""
        return ",\n".join(
            f'  {{ name: "t{i}" data_type: TYPE_INT32 dims: [ 1 ]{extra} }}' for i in range(OUTPUTS)
        )

    requests = (
        '{ name: "n" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "k" data_type: TYPE_INT32 dims: [ 1 ] }'
    )
    configs = {
        "source": f'name: "source"\nbackend: "python"\nmax_batch_size: 0\n'
        f"model_transaction_policy {{ decoupled: true }}\ninput [ {requests} ]\noutput [\n{tensors(False)}\n]\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n",
        "sink": f'name: "sink"\nbackend: "python"\nmax_batch_size: 0\ninput [\n{tensors(True)}\n]\n'
        f"output [\n{tensors(False)}\n]\ninstance_group [ {{ count: 1 kind: KIND_CPU }} ]\n",
        "pair": f'name: "pair"\nplatform: "ensemble"\nmax_batch_size: 0\ninput [ {requests} ]\n'
        f"output [\n{tensors(False)}\n]\nensemble_scheduling {{ step [\n"
        '  { model_name: "source" model_version: -1 input_map { key: "n" value: "n" } '
        'input_map { key: "k" value: "k" } '
        + " ".join(f'output_map {{ key: "t{i}" value: "s{i}" }}' for i in range(OUTPUTS))
        + " },\n"
        '  { model_name: "sink" model_version: -1 '
        + " ".join(f'input_map {{ key: "t{i}" value: "s{i}" }}' for i in range(OUTPUTS))
        + " "
        + " ".join(f'output_map {{ key: "t{i}" value: "t{i}" }}' for i in range(OUTPUTS))
        + " }\n] }\n",
    }
    configs["sink_checked"] = configs["sink"].replace('name: "sink"', 'name: "sink_checked"')
    configs["pair_checked"] = (
        configs["pair"].replace('name: "pair"', 'name: "pair_checked"').replace('"sink"', '"sink_checked"')
    )
    sink = SINK.replace("OUTPUTS", str(OUTPUTS))
    models = {
        "source": SOURCE.replace("OUTPUTS", str(OUTPUTS)),
        "sink": sink.replace("CHECK", "False"),
        "sink_checked": sink.replace("CHECK", "True"),
    }
    for name, config in configs.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        if name in models:
            (root / name / "1" / "model.py").write_text(models[name])


def _stream(url: str, k: int, streams: int, responses: int, model: str = "pair") -> tuple[int, float]:
    """(responses received, seconds) for ``streams`` requests of ``responses`` responses each, at once."""
    import tritonclient.grpc as grpcclient

    start, counts, errors = threading.Barrier(streams + 1), [], []

    def one() -> None:
        client = grpcclient.InferenceServerClient(url)
        received: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: received.put(error))
        inputs = []
        for name, value in (("n", responses), ("k", k)):
            tensor = grpcclient.InferInput(name, [1], "INT32")
            tensor.set_data_from_numpy(np.array([value], np.int32))
            inputs.append(tensor)
        start.wait()
        client.async_stream_infer(model, inputs)
        got = 0
        while got < responses:
            error = received.get(timeout=120)
            if error is not None:
                errors.append(str(error))
                break
            got += 1
        counts.append(got)
        client.stop_stream()
        client.close()

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"response_cost: a stream failed: {errors[0]}")
    return sum(counts), time.perf_counter() - began


def _cases(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(tensors, is_cancelled() per response) of each run of a turn."""
    return [
        (k, checked) for k in args.tensors for checked in ((False, True) if args.cancel_check else (False,))
    ]


def _label(k: int, checked: bool) -> str:
    return f"{k} tensors" + (" + is_cancelled()" if checked else "")


def measure(args: argparse.Namespace) -> dict:
    from build_engine.launcher import TritonServer

    runs = []
    with tempfile.TemporaryDirectory(prefix="glmv-response-cost-") as tmp:
        _write_repository(Path(tmp) / "repo")
        server = TritonServer(
            Path(tmp) / "repo", http_port=0, grpc_port=0, metrics_port=0, log_file=args.out / "triton.log"
        )
        with server:
            _stream(server.grpc_url, OUTPUTS, args.streams, args.responses // 4)  # warm-up
            for repeat in range(args.repeats):
                for k, checked in _cases(args):
                    model = "pair_checked" if checked else "pair"
                    before = cpu_seconds(server.process.pid, children=True)
                    count, seconds = _stream(server.grpc_url, k, args.streams, args.responses, model)
                    cpu = cpu_seconds(server.process.pid, children=True) - before
                    runs.append(
                        {
                            "tensors": k,
                            "cancel_check": checked,
                            "repeat": repeat,
                            "responses": count,
                            "seconds": round(seconds, 3),
                            "responses_per_s": round(count / seconds, 1),
                            "server_cpu_us_per_response": round(1e6 * cpu / count, 1),
                        }
                    )
                    print(
                        f"{_label(k, checked)}: {count / seconds:6.0f} responses/s, "
                        f"server CPU {1e6 * cpu / count:5.0f} us per response",
                        flush=True,
                    )
    summary = {}
    for k, checked in _cases(args):
        mine = [r for r in runs if r["tensors"] == k and r["cancel_check"] == checked]
        summary[_label(k, checked)] = {
            "tensors": k,
            "cancel_check": checked,
            "responses_per_s_median": statistics.median(r["responses_per_s"] for r in mine),
            "server_cpu_us_per_response_median": statistics.median(
                r["server_cpu_us_per_response"] for r in mine
            ),
        }
    model = "ensemble of two Python models (a decoupled source, a pass-through sink), no model"
    return {"meta": make_meta(vars(args) | {"out": str(args.out)}, model), "runs": runs, "summary": summary}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    labels = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(labels, [s["responses_per_s_median"] for s in summary.values()], color="#4477aa")
    axes[0].set_ylabel("responses/s at the client (median)")
    axes[1].bar(labels, [s["server_cpu_us_per_response_median"] for s in summary.values()], color="#cc6677")
    axes[1].set_ylabel("server CPU per response, us (median)")
    meta = doc["meta"]
    fig.suptitle(f"response cost, {meta['device']}, {meta['commit']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tensors", type=int, nargs="+", default=[16, 4], help="tensors per streamed response")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--responses", type=int, default=400, help="responses per stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cancel-check", action="store_true", help="each tensor count also with is_cancelled() per response"
    )
    args = ap.parse_args(argv)
    for name in ("streams", "responses", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: must be >= 1")
    if not all(1 <= k <= OUTPUTS for k in args.tensors):
        ap.error(f"--tensors: each must be in [1, {OUTPUTS}]")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = measure(args)
    (args.out / "response_cost.json").write_text(json.dumps(doc, indent=2))
    plot(doc, args.out / "response_cost.png")
    for k, s in doc["summary"].items():
        print(
            f"median, {k}: {s['responses_per_s_median']:.0f} responses/s, "
            f"{s['server_cpu_us_per_response_median']:.0f} us of server CPU per response"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
