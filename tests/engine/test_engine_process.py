"""EngineProcess: the engine in a child process gives the tokens of the engine in this one, refuses what it
refuses with the same message, aborts, stops, and ends every request with an error when the child dies,
then starts a new one.
Image references (files of the shared resize directory) are resolved by the engine in either process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.engine_process import EngineProcess, Wire, pack_request, unpack_request
from engine.llm_engine import GenerationRequest, LLMEngine, RequestOutput
from engine.model.rope import get_mrope_positions
from engine.processing.resize_cache import ResizeCache, shared_resize_dir_name
from engine.sample.sampler import SamplingParams
from engine.sample.structured import Guide

GUIDE = Guide("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
GRID = (1, 12, 12)  # 144 patches: 84,672 bytes of RGB, past the wire's out-of-band threshold


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine_process") / "engine"
    shutil.copytree(tiny_checkpoint, out)
    engine = {"block_size": 4, "num_kv_blocks": 256, "max_model_len": 256, "dtype": "float32"}
    (out / "engine_config.json").write_text(json.dumps({"engine": engine, "build": {"dtype": "float32"}}))
    return out


class Collector:
    """The outputs an EngineProcess hands its callback, by request; ``wait`` for some to finish."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self._cond = threading.Condition()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        with self._cond:
            for output in outputs:
                self.outputs.setdefault(output.request_id, []).append(output)
            self._cond.notify_all()

    def wait(self, *request_ids: str, timeout: float = 60.0) -> dict[str, list[RequestOutput]]:
        with self._cond:
            assert self._cond.wait_for(
                lambda: all(self.outputs.get(r) and self.outputs[r][-1].is_finished for r in request_ids),
                timeout,
            ), self.outputs
            return {r: self.outputs[r] for r in request_ids}

    def wait_first(self, request_id: str, timeout: float = 60.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: bool(self.outputs.get(request_id)), timeout)


def tokens(outs: list[RequestOutput]) -> list[int]:
    assert [o.is_finished for o in outs] == [False] * (len(outs) - 1) + [True]
    return [t for o in outs for t in o.new_token_ids]


def run_in_process(ex: LLMEngine, reqs: list[GenerationRequest]) -> dict[str, list[RequestOutput]]:
    for req in reqs:
        ex.add_request(req)
    outputs: dict[str, list[RequestOutput]] = {}
    while ex.has_unfinished():
        for out in ex.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def image_request(mc: ModelConfig, request_id: str, seed: int, **kwargs) -> GenerationRequest:
    """One image of GRID as flat RGB between two text tokens, with its M-RoPE positions."""
    t, h, w = GRID
    ids = (
        [5, 6, mc.image_start_token_id] + [mc.image_token_id] * (t * h * w // 4) + [mc.image_end_token_id, 7]
    )
    grid = torch.tensor([GRID])
    positions, delta = get_mrope_positions(ids, grid, mc)
    patch = mc.vision_config.patch_size
    rgb = torch.randint(0, 256, (h * w * patch * patch * 3,), generator=torch.Generator().manual_seed(seed))
    fields = {
        "image_pixels": rgb.to(torch.uint8),
        "image_grid_thw": grid,
        "mrope_positions": positions,
        "mrope_delta": delta,
        **kwargs,
    }
    return GenerationRequest(request_id, ids, greedy(6), **fields)


def test_wire_carries_tensors_of_any_dtype_large_ones_out_of_band() -> None:
    a, b = socket.socketpair()
    sender, receiver = Wire(Connection(a.detach())), Wire(Connection(b.detach()))
    big = torch.arange(100_000, dtype=torch.int32).to(torch.uint8)
    req = GenerationRequest(
        "r",
        [1, 2],
        image_embeds=torch.randn(3, 4).to(torch.bfloat16),
        image_pixels=big,
        image_grid_thw=torch.tensor([[1, 2, 2]]),
    )
    packed = pack_request(req)
    assert packed.image_pixels[0] == "uint8" and packed.image_embeds[0] == "bfloat16"
    thread = threading.Thread(target=sender.send, args=(("add", 7, packed),))
    thread.start()
    data = receiver.conn.recv_bytes()
    count, size = struct.unpack_from("<IQ", data)
    assert (count, size) == (1, 100_000)  # only the pixels went out of band, as bytes after the message
    raw = b""
    while len(raw) < size:
        raw += os.read(receiver.conn.fileno(), size - len(raw))
    assert raw == big.numpy().tobytes()
    thread.join()
    thread = threading.Thread(target=sender.send, args=(("add", 8, packed),))
    thread.start()
    kind, call_id, got = receiver.recv()
    thread.join()
    got = unpack_request(got)
    assert (kind, call_id) == ("add", 8)
    assert torch.equal(got.image_pixels, big) and torch.equal(got.image_grid_thw, req.image_grid_thw)
    assert got.image_embeds.dtype == torch.bfloat16 and torch.equal(got.image_embeds, req.image_embeds)
    with pytest.raises(ValueError, match="meta tensor cannot go to the engine process"):
        pack_request(GenerationRequest("m", [1], image_pixels=torch.empty(4, device="meta")))
    sender.close()
    receiver.close()


def test_tokens_text_and_refusals_equal_the_engine_in_this_process(engine_dir: Path) -> None:
    ex = LLMEngine.from_engine_dir(engine_dir)
    mc = ex.model_config
    requests = [
        GenerationRequest("a", [11, 12, 13, 14, 15], greedy(10, ignore_eos=True)),
        GenerationRequest("b", [21, 22, 23], greedy(8, ignore_eos=True)),
        image_request(mc, "img", seed=3),
        GenerationRequest("guided", [31, 32, 33], greedy(16), guide=GUIDE),
    ]
    expected = run_in_process(ex, requests)
    collector = Collector()
    ep = EngineProcess(engine_dir)
    try:
        assert ep.max_model_len == ex.max_model_len and ep.model_config == mc
        ep.start(collector)
        for req in requests:
            ep.add_request(req)
        got = collector.wait("a", "b", "img", "guided")
        for request_id, outs in expected.items():
            assert tokens(got[request_id]) == tokens(outs), request_id
            assert "".join(o.text + o.reasoning for o in got[request_id]) == "".join(
                o.text + o.reasoning for o in outs
            )
            assert got[request_id][-1].finish_reason == outs[-1].finish_reason
        bad = [
            GenerationRequest("empty", [], greedy(4)),
            GenerationRequest("long", [1] * 10, greedy(250)),
            image_request(mc, "short", seed=3, image_grid_thw=torch.tensor([[1, 12, 10]])),
            GenerationRequest("bad guide", [1, 2], greedy(4), guide=Guide("regex", "(unclosed")),
        ]
        for req in bad:
            with pytest.raises(ValueError) as in_process:
                ex.add_request(req)
            with pytest.raises(ValueError) as in_child:
                ep.add_request(req)
            assert str(in_child.value) == str(in_process.value)
        ep.add_request(GenerationRequest("after", [11, 12, 13, 14, 15], greedy(10, ignore_eos=True)))
        ep.add_request(GenerationRequest("guided again", [31, 32, 33], greedy(16), guide=GUIDE))
        got = collector.wait("after", "guided again")
        assert tokens(got["after"]) == tokens(expected["a"])
        assert tokens(got["guided again"]) == tokens(expected["guided"])
        stats = ep.stats()
        assert stats.is_loop_running and stats.num_finished == 6 and stats.num_running == 0
        # the child froze its heap when its loop started, after one full collection
        assert stats.num_gc_frozen_objects > 10_000 and stats.num_gc_full_collections >= 1
        # the guide was parsed here and compiled once by the child, as the engine in process compiled it
        assert stats.num_grammars_compiled == ex.stats().num_grammars_compiled == 1
        assert ep._checks.num_grammars_compiled() == 0
        assert not ep.has_unfinished()
    finally:
        ep.stop(30)
    assert ep._process.returncode == 0 and not ep.is_running()


def test_the_guide_parser_is_imported_while_the_child_starts(engine_dir: Path) -> None:
    """xgrammar's import (~1 s) happens at start, not in the first guided request's check."""
    script = (
        "import sys\n"
        "from engine.engine_process import EngineProcess\n"
        "assert 'xgrammar' not in sys.modules\n"
        f"ep = EngineProcess({str(engine_dir)!r}, warmup=False)\n"
        "ep.guide_parser_warmup.join(60)\n"
        "print('xgrammar' in sys.modules)\n"
        "ep.stop(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_abort_and_stop_end_requests_with_abort(engine_dir: Path) -> None:
    collector = Collector()
    ep = EngineProcess(engine_dir)
    try:
        ep.start(collector)
        ep.add_request(GenerationRequest("long", [1, 2, 3], greedy(200, ignore_eos=True)))
        ep.add_request(GenerationRequest("kept", [4, 5, 6], greedy(200, ignore_eos=True)))
        collector.wait_first("long")
        for signum in (signal.SIGINT, signal.SIGTERM):  # meant for the server's process group: ignored
            os.kill(ep._process.pid, signum)
        ep.abort("long")
        outs = collector.wait("long")["long"]
        assert outs[-1].finish_reason == "abort" and outs[-1].error is None
        assert len(tokens(outs)) < 200
    finally:
        ep.stop(30)  # "kept" is unfinished: it ends with "abort" before the child exits
    outs = collector.wait("kept", timeout=1)["kept"]  # ended by stop, not by the signals
    assert outs[-1].finish_reason == "abort" and len(tokens(outs)) < 200
    assert ep._process.returncode == 0 and not ep.is_running() and not ep.has_unfinished()


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.05)


def test_a_dead_child_ends_its_requests_with_an_error_and_a_new_one_takes_over(engine_dir: Path) -> None:
    collector = Collector()
    ep = EngineProcess(engine_dir)
    try:
        ep.start(collector)
        ep.add_request(GenerationRequest("done", [1, 2, 3], greedy(5, ignore_eos=True)))
        first = tokens(collector.wait("done")["done"])
        wait_until(lambda: ep.stats().num_finished == 1)  # seen here, as the llm model's stats thread does
        ep.add_request(GenerationRequest("cut", [1, 2, 3], greedy(200, ignore_eos=True)))
        collector.wait_first("cut")
        dead = ep._process
        ep.abort("gone")  # an unknown id: a no-op, not an error
        dead.kill()
        outs = collector.wait("cut")["cut"]
        assert outs[-1].finish_reason == "abort"
        assert outs[-1].error == "the engine process exited (code -9) before this request ended"
        assert not ep.has_unfinished()
        ep.abort("cut")  # a no-op, not an error
        # a new child: refused until it is ready, then the same tokens as the first
        wait_until(lambda: ep._process is not dead)
        while not ep.is_running():
            with pytest.raises(RuntimeError, match="engine process: not running"):
                ep.add_request(GenerationRequest("early", [1, 2, 3], greedy(4)))
            wait_until(lambda: ep.is_running() or not ep._is_dead, timeout=60)
        ep.add_request(GenerationRequest("again", [1, 2, 3], greedy(5, ignore_eos=True)))
        assert tokens(collector.wait("again")["again"]) == first
        stats = ep.stats()
        assert stats.num_engine_restarts == 1 and stats.is_loop_running
        assert stats.num_finished == 2  # counted on from the dead child's last stats seen
    finally:
        ep.stop(30)
    assert ep._process.returncode == 0 and not ep.is_running()


def test_a_child_that_dies_while_a_new_one_would_start_is_stopped_cleanly(engine_dir: Path) -> None:
    """``stop`` while a new child is starting ends it; nothing is left running."""
    ep = EngineProcess(engine_dir)
    ep.start()
    dead = ep._process
    dead.kill()
    wait_until(lambda: ep._restarter is not None)
    ep.stop(30)
    assert not ep._restarter.is_alive() and not ep.is_running()
    assert ep._process.poll() is not None


def test_restart_off_leaves_a_dead_child_dead(engine_dir: Path) -> None:
    ep = EngineProcess(engine_dir, restart=False)
    try:
        ep.start()
        ep._process.kill()
        wait_until(lambda: ep._is_dead)
        with pytest.raises(RuntimeError, match="engine process: not running"):
            ep.add_request(GenerationRequest("late", [1, 2, 3], greedy(4)))
        assert ep._restarter is None and not ep.stats().is_loop_running
    finally:
        ep.stop(10)


def test_a_child_that_cannot_start_raises_its_error(engine_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # read by the child only
    with pytest.raises(RuntimeError, match=r"engine process: could not start:\n(.|\n)*safetensors"):
        EngineProcess(broken)
    with pytest.raises(ValueError, match="max_num_seqs: 0 must be an integer >= 1"):  # checked here first
        EngineProcess(engine_dir, {"max_num_seqs": 0})


def image_by_ref(engine_dir: Path, tmp_path: Path, seed: int):
    """(the request with the image's pixels, by_ref(request_id, **changes) making the same request with the
    image as its file in a shared resize directory under ``tmp_path``, the image's hash, the path)."""
    mc = ModelConfig.from_pretrained(engine_dir)
    by_value = image_request(mc, "pixels", seed=seed)
    t, h, w = GRID
    patch = mc.vision_config.patch_size
    rgb = by_value.image_pixels.numpy().reshape(h * patch, w * patch, 3)
    image_hash = hashlib.sha256(b"%d,%d;" % rgb.shape[:2] + rgb.tobytes()).hexdigest()
    shared = tmp_path / shared_resize_dir_name(engine_dir)
    cache = ResizeCache(0, shared_dir=shared, shared_max_bytes=64 << 20)
    cache.put("f" * 64, rgb.copy(), image_hash)
    cache.flush()
    ref = cache.shared_ref("f" * 64)
    assert ref is not None

    def by_ref(request_id: str, **changes) -> GenerationRequest:
        fields = {"image_refs": [ref], "image_hashes": [image_hash.encode()], "image_pixels": None, **changes}
        return GenerationRequest(
            request_id,
            by_value.prompt_token_ids,
            greedy(6),
            image_grid_thw=by_value.image_grid_thw,
            mrope_positions=by_value.mrope_positions,
            mrope_delta=by_value.mrope_delta,
            **fields,
        )

    return by_value, by_ref, image_hash, ref


@pytest.mark.parametrize("in_child", [False, True], ids=["this_process", "child"])
def test_image_refs_take_held_embeddings_or_read_the_file(
    engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_child: bool
) -> None:
    """An image named by its file in the shared resize directory gives the tokens of its pixels: read
    from the file when the image cache does not hold it, from the cache when it does."""
    mc = ModelConfig.from_pretrained(engine_dir)
    by_value, by_ref, image_hash, ref = image_by_ref(engine_dir, tmp_path, seed=9)
    bad = [
        (by_ref("wrong", image_hashes=[b"0" * 64]), f"image_ref[0]: the file holds image {image_hash}, not"),
        (by_ref("two", image_refs=[ref, ref]), "image_ref: 2 references, 1 hashes and 1 grid rows"),
        (by_ref("both", image_pixels=by_value.image_pixels), "image_ref: give the images' pixels, embed"),
        (by_ref("outside", image_refs=["/etc/passwd"]), "image_ref[0]: '/etc/passwd' is not an entry"),
    ]
    expected = tokens(run_in_process(LLMEngine.from_engine_dir(engine_dir), [by_value])["pixels"])
    if not in_child:
        ex = LLMEngine.from_engine_dir(engine_dir)
        assert tokens(run_in_process(ex, [by_ref("read")])["read"]) == expected
        assert tokens(run_in_process(ex, [by_ref("held")])["held"]) == expected
        stats = ex.stats()
        for req, message in bad:
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
                ex.add_request(req)
        plain = LLMEngine(mc, ex.engine_config)  # not from an engine directory: no shared directory
        with pytest.raises(ValueError, match="image_ref: this engine reads no shared image directory"):
            plain.add_request(by_ref("plain"))
    else:
        collector = Collector()
        ep = EngineProcess(engine_dir)
        try:
            ep.start(collector)
            ep.add_request(by_ref("read"))
            assert tokens(collector.wait("read")["read"]) == expected
            ep.add_request(by_ref("held"))
            assert tokens(collector.wait("held")["held"]) == expected
            (wrong, wrong_message), *checked_here = bad
            for req, message in checked_here:
                with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
                    ep.add_request(req)
            # the file is the child's to read: what it holds ends the request with an error output
            ep.add_request(wrong)
            (out,) = collector.wait("wrong")["wrong"]
            assert out.finish_reason == "abort" and out.error.startswith(wrong_message), out
            stats = ep.stats()
        finally:
            ep.stop(30)
    assert (stats.num_image_refs_read, stats.num_image_refs_held) == (1, 1)
    assert stats.num_image_cache_hits == 1


def test_image_refs_arriving_together_read_the_file_once(engine_dir: Path, tmp_path: Path) -> None:
    """Three requests naming one new image's file, added before a step (the n sequences of one request, or
    questions sent at once): the file is read for the first, the others take the same pixels; each gets the
    tokens of the pixels; once none holds them, the next such request finds the embeddings held."""
    by_value, by_ref, _, _ = image_by_ref(engine_dir, tmp_path, seed=11)
    expected = tokens(run_in_process(LLMEngine.from_engine_dir(engine_dir), [by_value])["pixels"])
    ex = LLMEngine.from_engine_dir(engine_dir)
    for k in range(3):
        ex.add_request(by_ref(f"q{k}"))
    pixels = {id(ex._seqs[f"q{k}"].image_pixels) for k in range(3)}
    assert len(pixels) == 1
    stats = ex.stats()
    assert (stats.num_image_refs_read, stats.num_image_refs_shared, stats.num_image_refs_held) == (1, 2, 0)
    outs = run_in_process(ex, [])
    assert {k: tokens(v) for k, v in outs.items()} == {f"q{k}": expected for k in range(3)}
    assert tokens(run_in_process(ex, [by_ref("later")])["later"]) == expected
    stats = ex.stats()
    assert (stats.num_image_refs_read, stats.num_image_refs_shared, stats.num_image_refs_held) == (1, 2, 1)


@pytest.mark.parametrize("in_child", [False, True], ids=["this_process", "child"])
def test_an_image_ref_holding_the_decoded_size_is_resized_like_pil(
    engine_dir: Path, tmp_path: Path, in_child: bool
) -> None:
    """A shared file may hold an image at its decoded size rather than its grid's: the engine reads it at
    that size and resizes it on its device as PIL does, so the tokens are those of PIL's resized pixels."""
    import numpy as np
    from PIL import Image

    mc = ModelConfig.from_pretrained(engine_dir)
    by_value = image_request(mc, "pixels", seed=4)
    _, h, w = GRID
    patch = mc.vision_config.patch_size
    decoded = np.random.default_rng(8).integers(0, 256, (190, 150, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(decoded).resize((w * patch, h * patch), Image.Resampling.BICUBIC))
    pil = dataclasses.replace(by_value, image_pixels=torch.from_numpy(resized.reshape(-1).copy()))
    image_hash = "a" * 64  # the preprocessing model's hash of the image; the engine only compares it
    shared = tmp_path / shared_resize_dir_name(engine_dir)
    cache = ResizeCache(0, shared_dir=shared, shared_max_bytes=64 << 20)
    cache.put("e" * 64, decoded.copy(), image_hash)
    cache.flush()
    ref = cache.shared_ref("e" * 64)
    by_ref = dataclasses.replace(
        by_value, request_id="ref", image_pixels=None, image_refs=[ref], image_hashes=[image_hash.encode()]
    )
    expected = tokens(run_in_process(LLMEngine.from_engine_dir(engine_dir), [pil])["pixels"])
    if not in_child:
        ex = LLMEngine.from_engine_dir(engine_dir)
        assert tokens(run_in_process(ex, [by_ref])["ref"]) == expected
        assert ex.num_image_refs_read == 1
    else:
        collector = Collector()
        ep = EngineProcess(engine_dir)
        try:
            ep.start(collector)
            ep.add_request(by_ref)
            assert tokens(collector.wait("ref")["ref"]) == expected
        finally:
            ep.stop(10)
