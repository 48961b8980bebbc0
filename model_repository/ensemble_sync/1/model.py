"""Triton `ensemble_sync`: the ensemble's whole answer as the one response of a plain (non-decoupled) infer().

Triton refuses `infer()` on a decoupled model (HTTP 501, gRPC UNIMPLEMENTED), and `ensemble` is decoupled
because its llm step streams; a decoupled model cannot be a step of a non-decoupled ensemble either. So this
Python model is not decoupled and calls `ensemble` through BLS (`exec(decoupled=True)`) with the request's
own input tensors and `stream=false`, which makes the ensemble answer with exactly one response: the whole
answer. That response's tensors are this request's answer, unchanged (same names, types and shapes).

Contract:
- inputs and outputs are the ensemble's (docs/DESIGN.md); `stream=true` is an error naming `stream`, and
  `num_return_sequences` other than 1 one naming it (the answer is one sequence);
- an ensemble error (e.g. `image_input[0]: image is ... over the limit ...`) is answered as this request's
  error with the same message;
- `execute` returns None and each request is answered from a worker thread by its response sender (one
  final response: allowed for non-decoupled models), so one instance serves up to `max_requests_in_flight`
  requests at once (the rest wait for a thread);
- a request runs to completion: a BLS call to a decoupled model cannot be cancelled in Triton 2.51. Clients
  that need cancellation stream from `ensemble`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from .triton_model import setup_model  # common/, copied by glmv-build


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = setup_model(args)
        self.target_model = parameters.get("target_model", "ensemble")
        num_threads = parameters.get_int("max_requests_in_flight", 512)
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="ensemble_sync")

    def execute(self, requests: list) -> None:
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        try:
            response = self._answer(request)
        except Exception as exc:  # every request gets its one response
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ensemble_sync: {exc}"))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _answer(self, request):
        inputs = []
        for tensor in request.inputs():
            if tensor.name() == "stream":
                if bool(tensor.as_numpy().reshape(-1)[0]):
                    return _error(
                        "stream: ensemble_sync answers with one response; stream from the 'ensemble' model "
                        "(gRPC stream_infer or HTTP generate_stream)"
                    )
                continue
            if tensor.name() == "num_return_sequences" and int(tensor.as_numpy().reshape(-1)[0]) != 1:
                return _error(
                    f"num_return_sequences: {int(tensor.as_numpy().reshape(-1)[0])}: ensemble_sync answers with "
                    "one sequence; ask 'ensemble' (gRPC stream_infer, HTTP generate_stream) for several, one "
                    "response stream with a sequence_index per response"
                )
            inputs.append(tensor)
        inputs.append(pb_utils.Tensor("stream", np.array([False])))
        # no requested output names: every output of the ensemble comes back, the same set as this model's
        bls = pb_utils.InferenceRequest(
            model_name=self.target_model, inputs=inputs, requested_output_names=[]
        )
        answers = []
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return _error(response.error().message())
            if response.output_tensors():
                answers.append(response)
        if len(answers) != 1:
            raise RuntimeError(
                f"'{self.target_model}' sent {len(answers)} answers to a non-streaming request"
            )
        return pb_utils.InferenceResponse(output_tensors=answers[0].output_tensors())

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)


def _error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
