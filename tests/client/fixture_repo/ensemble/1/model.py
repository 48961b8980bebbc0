"""Fixture "ensemble": echoes the request back, one word per token, over the real tensor contract.

Answer: "<words of the question> | images=<n> sizes=<bytes,...> temperature=<t> seed=<s>".
num_return_sequences n: n answers (sequence i's seed is s + i) interleaved token by token, each response
carrying its sequence_index, the last of all final.
Reasoning (unless enable_thinking is false): "thinking about <n> images".
Special questions: "sleep <seconds-per-token> ..." sleeps before each token (polling cancellation
and writing "cancelled <request id>" to $GLMV_FIXTURE_LOG); "fail" answers with an error that names
max_tokens; image_input over 1000000 bytes fails with the server's image_input[i] message.
"""

import json
import os
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_IMAGE_BYTES = 1_000_000


def _get(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        self.log_path = os.environ.get("GLMV_FIXTURE_LOG")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _log(self, line):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._answer(request, sender)
        except Exception as exc:  # every stream ends with a final response
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )

    def _answer(self, request, sender):
        arrival = time.time_ns()
        question = _get(request, "text_input")[0].decode()
        messages = _get(request, "messages")
        if messages is not None:
            msgs = json.loads(messages[0].decode())
            question = " ".join(
                p["text"] if isinstance(c := m["content"], list) else c
                for m in msgs
                for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                if "text" in p
            )
        images = _get(request, "image_input")
        images = [] if images is None else list(images.reshape(-1))
        for i, img in enumerate(images):
            if len(img) > MAX_IMAGE_BYTES:
                raise ValueError(
                    f"image_input[{i}]: image is {len(img)} bytes, over the limit of {MAX_IMAGE_BYTES} bytes "
                    "(max_image_bytes)"
                )
        max_tokens = int(_get(request, "max_tokens")[0])
        stream = _get(request, "stream")
        stream = bool(stream[0]) if stream is not None else False
        lean = _get(request, "lean_stream")
        lean = stream and lean is not None and bool(lean[0])  # as the real ensemble: a stream's middle lean
        thinking = _get(request, "enable_thinking")
        thinking = True if thinking is None else bool(thinking[0])
        temperature = _get(request, "temperature")
        seed = _get(request, "seed")
        words = [
            w for w in re.split(r"[ \t\r\n]+", question) if w
        ]  # ASCII whitespace: U+2028 stays in a word
        delay = 0.0
        if words and words[0] == "fail":
            raise ValueError("max_tokens: the fixture was asked to fail")
        if words and words[0] == "sleep":
            delay = float(words[1])
        count = _get(request, "num_return_sequences")
        count = 1 if count is None else int(count[0])
        if not 1 <= count <= 8:
            raise ValueError(f"num_return_sequences: {count} must be in [1, 8]")
        reasoning = ["thinking", "about", f"{len(images)}", "images"] if thinking else []
        sequences = []  # per sequence: its tokens and finish reason (the seed moved by its index)
        for index in range(count):
            answer = words + [
                "|",
                f"images={len(images)}",
                "sizes=" + ",".join(str(len(i)) for i in images),
                "temperature=" + ("-" if temperature is None else f"{float(temperature[0]):g}"),
                "seed=" + ("-" if seed is None else str((int(seed[0]) + index) % 2**64)),
            ]
            tokens = [("r", w) for w in reasoning] + [("t", w) for w in answer]
            finish = "length" if len(tokens) > max_tokens else "stop"
            sequences.append((tokens[:max_tokens], finish))
        num_input = len(words) + 10 * len(images)
        first = None
        texts = [[] for _ in sequences]
        reasons = [[] for _ in sequences]
        open_sequences = count
        # the sequences' tokens interleave, one of each in turn
        for i in range(max(len(tokens) for tokens, _ in sequences)):
            for index, (tokens, finish) in enumerate(sequences):
                if i >= len(tokens):
                    continue
                kind, word = tokens[i]
                if delay:
                    time.sleep(delay)
                if request.is_cancelled():
                    self._log(f"cancelled {request.request_id()}")
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                first = first or time.time_ns()
                piece = word if i == 0 or tokens[i - 1][0] != kind else " " + word
                (reasons[index] if kind == "r" else texts[index]).append(piece)
                last = i == len(tokens) - 1
                open_sequences -= last
                if stream:
                    if open_sequences == 0:  # logged before the final response: a client's next read sees it
                        self._log(f"finished {request.request_id()}")
                    response = self._response(
                        piece if kind == "t" else "",
                        piece if kind == "r" else "",
                        finish if last else "",
                        num_input,
                        i + 1,
                        arrival,
                        first,
                        index,
                        lean=lean and 0 < i and not last,
                    )
                    sender.send(
                        response,
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if open_sequences == 0 else 0,
                    )
        if not stream or not sequences[0][0]:
            self._log(f"finished {request.request_id()}")
            for index, (tokens, finish) in enumerate(sequences):
                sender.send(
                    self._response(
                        "".join(texts[index]),
                        "".join(reasons[index]),
                        finish,
                        num_input,
                        len(tokens),
                        arrival,
                        first,
                        index,
                    ),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if index == count - 1 else 0,
                )

    @staticmethod
    def _response(text, reasoning, finish, num_input, num_output, arrival, first, index=0, lean=False):
        now = time.time_ns()
        if lean:  # what changes, and reasoning / sequence_index only with a value (as the real ensemble)
            tensors = [
                pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
                pb_utils.Tensor("num_output_tokens", np.array([num_output], dtype=np.int32)),
                pb_utils.Tensor("last_token_time_ns", np.array([now], dtype=np.int64)),
            ]
            if reasoning:
                tensors.append(
                    pb_utils.Tensor("reasoning_output", np.array([reasoning.encode()], np.object_))
                )
            if index:
                tensors.append(pb_utils.Tensor("sequence_index", np.array([index], dtype=np.int32)))
            return pb_utils.InferenceResponse(output_tensors=tensors)
        tensors = [
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("reasoning_output", np.array([reasoning.encode()], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([num_input], dtype=np.int32)),
            pb_utils.Tensor("num_cached_tokens", np.array([0], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([num_output], dtype=np.int32)),
            pb_utils.Tensor("arrival_time_ns", np.array([arrival], dtype=np.int64)),
            pb_utils.Tensor("first_token_time_ns", np.array([first or now], dtype=np.int64)),
            pb_utils.Tensor("last_token_time_ns", np.array([now], dtype=np.int64)),
            pb_utils.Tensor("sequence_index", np.array([index], dtype=np.int32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
