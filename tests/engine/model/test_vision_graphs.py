"""VisionEncoder CUDA graphs (TowerGraphs): replays equal eager, bookkeeping (LRU, size limit, failed
captures fall back to eager) checked on CPU with a stand-in graph; real capture on CUDA (gpu marker)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from build_engine.checkpoint import make_tiny_checkpoint
from engine.config import EngineConfig, ModelConfig
from engine.model.vision import (
    VISION_ATTENTION_BACKENDS,
    AttentionKernels,
    TowerGraphs,
    VisionEncoder,
)


@pytest.fixture(scope="module")
def vision_config():
    with tempfile.TemporaryDirectory() as tmp:
        return ModelConfig.from_pretrained(
            make_tiny_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
        ).vision_config


def tower_inputs(n: int, hidden: int, head_dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=gen)
    cos, sin = torch.randn(n, head_dim, generator=gen), torch.randn(n, head_dim, generator=gen)
    return x, cos, sin


class StandInGraph:
    """What torch.cuda.CUDAGraph does for TowerGraphs: replay = run the tower on the static buffers."""

    def __init__(self, tower, static, seqlens, start=0, end=None):
        self.tower, self.static, self.seqlens, self.range = tower, static, seqlens, (start, end)
        self.replays = 0

    def replay(self) -> None:
        x, cos, sin, out = self.static
        out.copy_(self.tower(x, cos, sin, self.seqlens, *self.range))
        self.replays += 1


def stand_in_capture(calls: list[tuple], refuse: tuple = ()):
    """A `TowerGraphs._capture` that records its keys, captures a StandInGraph, and refuses ``refuse``."""

    def capture(self, x, cos, sin, seqlens, start=0, end=None):
        key = self.key(seqlens, start, end)
        if key in refuse:
            raise RuntimeError("capture refused")
        static = (x.clone(), cos.clone(), sin.clone(), self.tower(x, cos, sin, seqlens, start, end).clone())
        calls.append(key)
        return (StandInGraph(self.tower, static, seqlens, start, end), *static)

    return capture


def test_tower_graphs_bookkeeping_with_a_stand_in_graph(vision_config, monkeypatch) -> None:
    encoder = VisionEncoder(vision_config).eval()
    calls: list[tuple] = []
    monkeypatch.setattr(TowerGraphs, "_capture", stand_in_capture(calls, refuse=((12,),)))
    graphs = TowerGraphs(encoder._tower, max_graphs=2, max_patches=64)
    head_dim = vision_config.head_dim
    with torch.inference_mode():
        for seqlens, seed in (([16], 0), ([16], 1), ([8, 8], 2), ([16], 3), ([4, 4], 4), ([8, 8], 5)):
            x, cos, sin = tower_inputs(sum(seqlens), vision_config.hidden_size, head_dim, seed)
            got = graphs(x, cos, sin, seqlens)
            torch.testing.assert_close(got, encoder._tower(x, cos, sin, seqlens), rtol=0, atol=0)
        # (16,) captured once and replayed, (8, 8) captured: both graphs held. (4, 4), met once, ran eagerly:
        # the least recently used graph's key, (8, 8), had run as often
        assert calls == [(16,), (8, 8)] and graphs.num_refused == 1
        assert list(graphs.entries) == [(16,), (8, 8)]
        # (4, 4) is captured once it has run more often than (16,) (3 runs), which it replaces
        for seed in (6, 7, 8):
            x, cos, sin = tower_inputs(8, vision_config.hidden_size, head_dim, seed)
            torch.testing.assert_close(
                graphs(x, cos, sin, [4, 4]), encoder._tower(x, cos, sin, [4, 4]), rtol=0, atol=0
            )
        assert calls == [(16,), (8, 8), (4, 4)] and graphs.num_refused == 3
        assert list(graphs.entries) == [(8, 8), (4, 4)]
        # a layout over max_patches runs eagerly, without a capture
        x, cos, sin = tower_inputs(68, vision_config.hidden_size, head_dim, 9)
        graphs(x, cos, sin, [68])
        assert (68,) not in graphs.entries and len(calls) == 3
        # a refused capture is not retried: that layout stays eager (its capture is tried on its 4th run,
        # once it has run more often than (8, 8))
        x, cos, sin = tower_inputs(12, vision_config.hidden_size, head_dim, 10)
        for _ in range(5):
            torch.testing.assert_close(graphs(x, cos, sin, [12]), encoder._tower(x, cos, sin, [12]))
        assert graphs.failed == {(12,)} and list(graphs.entries) == [(8, 8), (4, 4)]


def test_tower_graphs_do_not_capture_on_every_image_when_sizes_outnumber_graphs(
    vision_config, monkeypatch
) -> None:
    """Three layouts in turn and two graphs: the first two are captured and the third runs eagerly, instead
    of a capture (which holds the engine step) on every image; when the traffic turns to the third, it is
    captured once it has run more often than the least recently used graph's key."""
    encoder = VisionEncoder(vision_config).eval()
    calls: list[tuple] = []
    monkeypatch.setattr(TowerGraphs, "_capture", stand_in_capture(calls))
    graphs = TowerGraphs(encoder._tower, max_graphs=2, max_patches=64)
    head_dim = vision_config.head_dim
    layouts = ([16], [8, 8], [4, 4])
    with torch.inference_mode():
        for i in range(9):
            seqlens = layouts[i % 3]
            x, cos, sin = tower_inputs(sum(seqlens), vision_config.hidden_size, head_dim, i)
            torch.testing.assert_close(
                graphs(x, cos, sin, seqlens), encoder._tower(x, cos, sin, seqlens), rtol=0, atol=0
            )
        assert calls == [(16,), (8, 8)] and graphs.num_refused == 3  # least-recently-used caching: 9 captures
        for i in range(4):
            x, cos, sin = tower_inputs(8, vision_config.hidden_size, head_dim, 20 + i)
            graphs(x, cos, sin, [4, 4])
        # (4, 4)'s 4th run is one more than the least recently used graph's key, (16,), ran: captured in its
        # place, then replayed
        assert calls == [(16,), (8, 8), (4, 4)] and list(graphs.entries) == [(8, 8), (4, 4)]
        assert graphs.num_refused == 3


def test_a_split_forward_replays_its_block_ranges_from_the_second_time_on(vision_config, monkeypatch) -> None:
    """`advance` through segment graphs (a stand-in graph on CPU): a layout's block ranges run eagerly the
    first time and are captured the second time; the results equal `encode` each time; another range (all
    blocks at once, as when nothing decodes) is a key of its own; the least recently used one is dropped."""
    torch.manual_seed(0)
    encoder = VisionEncoder(vision_config).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.02)
    calls: list[tuple] = []
    monkeypatch.setattr(TowerGraphs, "_capture", stand_in_capture(calls))
    depth = vision_config.depth
    assert depth >= 2
    encoder.segment_graphs = TowerGraphs(encoder._tower, max_graphs=depth, max_patches=64, capture_after=1)
    graphs = encoder.segment_graphs
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    ranges = [((24, 8), b, b + 1) for b in range(depth)]

    def split(pixels, blocks: int):
        vision_pass = encoder.start(pixels, grid)
        while not encoder.advance(vision_pass, blocks):
            pass
        return vision_pass.out

    with torch.inference_mode():
        for round_ in range(3):
            pixels = torch.randn(32, vision_config.patch_dim)
            whole = encoder.encode(pixels, grid)
            assert torch.equal(split(pixels, 1), whole)
            # round 0 eager (each range counted), round 1 captures every range, round 2 replays them
            assert calls == ([] if round_ == 0 else ranges)
        assert [g.replays for g, *_ in graphs.entries.values()] == [2] * depth
        # every block in one step: a new range, eager and counted the first time
        assert torch.equal(split(pixels, depth), whole)
        assert graphs.seen == {((24, 8), 0, depth): 1} and calls == ranges
        # every graph is held and the least recently used one (the first block's range) ran 3 times: the
        # new range is captured once it has run more often (its 4th run), and that one is dropped
        for _ in range(2):
            assert torch.equal(split(pixels, depth), whole)
        assert calls == ranges and graphs.num_refused == 2
        assert torch.equal(split(pixels, depth), whole)
        assert calls == [*ranges, ((24, 8), 0, depth)] and not graphs.seen
        assert list(graphs.entries) == [*ranges[1:], ((24, 8), 0, depth)]


def test_vision_cuda_graphs_setting() -> None:
    assert EngineConfig().vision_cuda_graphs is True
    assert EngineConfig(vision_cuda_graphs=False).vision_cuda_graphs is False
    with pytest.raises(ValueError, match=r"^vision_cuda_graphs: 'yes' must be true or false"):
        EngineConfig(vision_cuda_graphs="yes")


def test_vision_attention_setting(vision_config) -> None:
    assert EngineConfig().vision_attention == "auto"
    assert EngineConfig(vision_attention="cudnn").vision_attention == "cudnn"
    with pytest.raises(ValueError, match=r"^vision_attention: 'fa3' must be one of flash, cudnn, auto$"):
        EngineConfig(vision_attention="fa3")
    encoder = VisionEncoder(vision_config)
    with pytest.raises(ValueError, match=r"^vision_attention: 'fa3' must be one of flash, cudnn, auto$"):
        encoder.set_attention("fa3")
    encoder.set_attention("cudnn")  # one object, shared by every block
    assert {id(block.attn.kernels) for block in encoder.blocks} == {id(encoder.attention_kernels)}


def test_auto_attention_kernels_by_length() -> None:
    """ "auto": a length runs flash and waits for its plan (oldest first, bounded) until it is planned, then
    cuDNN; a refused length stays flash and is not queued again. The fixed choices never queue."""
    flash, cudnn = VISION_ATTENTION_BACKENDS["flash"], VISION_ATTENTION_BACKENDS["cudnn"]
    for choice in ("flash", "cudnn"):
        kernels = AttentionKernels(choice)
        assert kernels.backends(16) == VISION_ATTENTION_BACKENDS[choice] and not kernels.pending
    kernels = AttentionKernels("auto")
    assert [kernels.backends(n) for n in (16, 8, 16)] == [flash] * 3
    assert list(kernels.pending) == [16, 8]
    kernels.planned.add(16)
    del kernels.pending[16]
    kernels.refused.add(8)
    del kernels.pending[8]
    assert kernels.backends(16) == cudnn and kernels.backends(8) == flash and not kernels.pending
    for n in range(100, 100 + AttentionKernels.MAX_PENDING + 5):
        assert kernels.backends(n) == flash
    assert list(kernels.pending) == list(range(100, 100 + AttentionKernels.MAX_PENDING))


def test_build_attention_plan_moves_a_length_to_cudnn_and_drops_its_graphs(
    vision_config, monkeypatch
) -> None:
    """The lengths the tower met are planned one per call, oldest first; each call drops the whole-tower
    and block-range graphs whose layout holds that length (they keep the kernel they were captured with),
    and the others stay. Results are unchanged (CPU: SDPA's own kernel either way)."""
    encoder = VisionEncoder(vision_config).eval()
    encoder.set_attention("auto")
    calls: list[tuple] = []
    monkeypatch.setattr(TowerGraphs, "_capture", stand_in_capture(calls))
    encoder.graphs = TowerGraphs(encoder._tower, max_graphs=4, max_patches=64)
    encoder.segment_graphs = TowerGraphs(encoder._tower, max_graphs=4, max_patches=64, capture_after=1)
    hidden, head_dim = vision_config.hidden_size, vision_config.head_dim
    inputs = {n: tower_inputs(n, hidden, head_dim, n) for n in (16, 8)}
    with torch.inference_mode():
        encoder.graphs(*tower_inputs(16, hidden, head_dim, 0), [16])
        encoder.graphs(*tower_inputs(16, hidden, head_dim, 1), [8, 8])
        for _ in range(2):  # eager, then captured
            encoder.segment_graphs(*inputs[16], [16], 0, 1)
        kernels = encoder.attention_kernels
        assert list(kernels.pending) == [16, 8] and not kernels.planned
        assert list(encoder.graphs.entries) == [(16,), (8, 8)]
        assert list(encoder.segment_graphs.entries) == [((16,), 0, 1)]
        assert encoder.build_attention_plan() == 16
        assert kernels.planned == {16} and list(kernels.pending) == [8]
        assert list(encoder.graphs.entries) == [(8, 8)] and not encoder.segment_graphs.entries
        encoder.graphs.pool = pool = object()  # what a capture on CUDA sets (the stand-in sets none)
        assert encoder.build_attention_plan() == 8
        assert kernels.planned == {16, 8} and not encoder.graphs.entries and not kernels.pending
        # the pool's last graph went: the next capture takes a new pool (reusing the old one fails on CUDA)
        assert encoder.graphs.pool is None and pool is not None
        assert encoder.build_attention_plan() is None
        x, cos, sin = inputs[16]
        torch.testing.assert_close(
            encoder.segment_graphs(x, cos, sin, [16], 0, 1), encoder._tower(x, cos, sin, [16], 0, 1)
        )


def test_build_attention_plan_of_an_fp8_vit_uses_the_activations_dtype(vision_config) -> None:
    """With the ViT's linears in FP8 the attention still runs in the activations' dtype: the plan's trial
    call is made in that dtype and the length is planned (FP8 operands would make every length refused, so
    `auto` would keep flash for all of them)."""
    from engine.model.quant import quantize_vision_fp8_

    encoder = VisionEncoder(vision_config).to(torch.bfloat16).eval()
    quantize_vision_fp8_(encoder)
    assert encoder.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    encoder.set_attention("auto")
    kernels = encoder.attention_kernels
    kernels.backends(16)  # the tower met a length of 16 patches
    with torch.inference_mode():
        assert encoder.build_attention_plan() == 16
    assert kernels.planned == {16} and not kernels.refused


def random_cuda_encoder(vision_config) -> tuple[VisionEncoder, list[torch.Tensor], list[torch.Tensor]]:
    """A bf16 ViT on CUDA with random weights, and two images' grids and pixels (24 and 16 + 4 patches)."""
    torch.manual_seed(0)
    encoder = VisionEncoder(vision_config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():  # the patch embedding is allocated uninitialised (weights come from a checkpoint)
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.02)
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[1, 4, 4], [1, 2, 2]])]
    pixels = [torch.randn(int(g.prod(dim=1).sum()), vision_config.patch_dim, device="cuda") for g in grids]
    return encoder, grids, pixels


def eager_then_graphs_equal(encoder: VisionEncoder, grids, pixels) -> list[torch.Tensor]:
    """Each image encoded eagerly, then with graphs on (a capture, then a replay): all equal, and the
    first outputs survive later replays. Returns the eager embeddings."""
    with torch.inference_mode():
        eager = [encoder.encode(p, g) for p, g in zip(pixels, grids, strict=True)]
        encoder.enable_cuda_graphs()
        first = [encoder.encode(p, g) for p, g in zip(pixels, grids, strict=True)]  # captures
        again = [encoder.encode(p, g) for p, g in zip(pixels, grids, strict=True)]  # replays
    assert len(encoder.graphs.entries) == 2 and not encoder.graphs.failed
    for e, f, a in zip(eager, first, again, strict=True):
        assert torch.equal(e, f) and torch.equal(e, a)
    return eager


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flash", "cudnn"])
def test_cuda_graph_replay_equals_eager(vision_config, attention) -> None:
    """With either attention kernel: the replays equal eager exactly, and the two kernels agree to bf16."""
    encoder, grids, pixels = random_cuda_encoder(vision_config)
    encoder.set_attention(attention)
    eager = eager_then_graphs_equal(encoder, grids, pixels)
    encoder.graphs = None
    encoder.set_attention("flash")
    with torch.inference_mode():
        flash = [encoder.encode(p, g) for p, g in zip(pixels, grids, strict=True)]
    for e, f in zip(eager, flash, strict=True):
        torch.testing.assert_close(e, f, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_auto_attention_runs_cudnn_once_its_plan_is_built(vision_config) -> None:
    """ "auto" on CUDA: an image length first runs flash; once its cuDNN plan is built the same image's
    embeddings agree with flash's to bf16, from eager and from a graph captured after the plan."""
    torch.manual_seed(0)
    encoder = VisionEncoder(vision_config).to("cuda", torch.bfloat16).eval()
    encoder.set_attention("auto")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.02)
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, vision_config.patch_dim, device="cuda")
    with torch.inference_mode():
        flash = encoder.encode(pixels, grid)
        encoder.enable_cuda_graphs()
        assert torch.equal(encoder.encode(pixels, grid), flash)  # captured on flash: the pool's only graph
        assert list(encoder.attention_kernels.pending) == [24]
        assert encoder.build_attention_plan() == 24 and encoder.attention_kernels.planned == {24}
        assert not encoder.graphs.entries  # dropped with the pool: captured again, into a new pool
        captured = encoder.encode(pixels, grid)
        replayed = encoder.encode(pixels, grid)
        graphs, encoder.graphs = encoder.graphs, None
        eager = encoder.encode(pixels, grid)
    assert list(graphs.entries) == [(24,)] and not graphs.failed
    assert torch.equal(captured, eager) and torch.equal(replayed, eager)
    torch.testing.assert_close(eager, flash, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_forward_split_by_blocks_equals_encode(vision_config, device) -> None:
    """`start` + `advance` (1, 2 or every block a step) give `encode`'s eager result exactly, for a batch of
    two images; the pass holds no hidden states once done. On CUDA also with its block ranges replayed
    from graphs."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    encoder = VisionEncoder(vision_config).to(device, dtype).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.02)
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), vision_config.patch_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        whole = encoder.encode(pixels, grid)
        for blocks in (1, 2, vision_config.depth):
            vision_pass = encoder.start(pixels, grid)
            steps = 1
            while not encoder.advance(vision_pass, blocks):
                steps += 1
            assert steps == -(-vision_config.depth // blocks) and vision_pass.num_patches == 32
            assert torch.equal(vision_pass.out, whole) and vision_pass.x is None
        if device == "cuda":  # the block ranges from graphs: eager, captured, replayed, all equal to eager
            encoder.enable_cuda_graphs()
            for _ in range(3):
                vision_pass = encoder.start(pixels, grid)
                while not encoder.advance(vision_pass, 1):
                    pass
                assert torch.equal(vision_pass.out, whole)
            assert len(encoder.segment_graphs.entries) == vision_config.depth
            assert not encoder.segment_graphs.failed


@pytest.mark.gpu
def test_fp8_vit_graph_replay_equals_eager(vision_config) -> None:
    """The ViT's linears in FP8 (`quantize_vision_fp8_`): on a GPU with FP8 GEMMs each runs the row-wise
    `_scaled_mm`, in graphs as eagerly (a batch of 24 or 20 patches is within the decoder's tensorwise
    rows), so the replays equal eager exactly; and the embeddings stay near the 16-bit ViT's."""
    from engine.model.quant import Fp8Linear, quantize_vision_fp8_

    encoder, grids, pixels = random_cuda_encoder(vision_config)
    with torch.inference_mode():
        full = [encoder.encode(p, g) for p, g in zip(pixels, grids, strict=True)]
    assert quantize_vision_fp8_(encoder) == 4 * vision_config.depth + 3
    layers = [m for m in encoder.modules() if isinstance(m, Fp8Linear)]
    if any(m.kernel != "scaled_mm" for m in layers):
        pytest.skip("this GPU's torch has no FP8 GEMM for these shapes (the layers dequantize)")
    assert all(m.tensorwise_max_m == 0 for m in layers if m.rowwise)
    for e, b in zip(eager_then_graphs_equal(encoder, grids, pixels), full, strict=True):
        error = float((e.float() - b.float()).norm() / b.float().norm())
        assert 0 < error < 0.1, error
