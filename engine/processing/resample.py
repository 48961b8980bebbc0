"""PIL's 8-bit bicubic resize (``Image.resize(size, Image.Resampling.BICUBIC)`` on an RGB or L image),
reproduced bit for bit in torch, so that it can run on the engine's GPU with the pixels transformers'
image processor gives.

Pillow's libImaging/Resample.c (13.0): per output pixel the source window and filter weights in doubles
(``precompute_coeffs``), turned into 22-bit fixed point (``normalize_coeffs_8bpc``); a horizontal and a
vertical pass, each summing in 32-bit integers from 2**21 and clipped to uint8; the horizontal pass first
(over the rows the vertical one reads) unless the height shrinks by more than twice what the width does
(Pillow 13; Pillow 12 always begins with the horizontal pass: the order here is the installed Pillow's,
the one preprocessing's own resize would take). ``resize_bicubic(rgb [H, W, C] uint8, (w, h)) -> [h, w, C]``
does the same with gathers, one per filter tap: the sums are exact integers on any device."""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c
SUPPORT = 2.0  # bicubic
VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS = int(PIL.__version__.split(".")[0]) >= 13


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xmin [out], count [out], fixed-point weights int64 [out, ksize]) as Pillow's precompute_coeffs and
    normalize_coeffs_8bpc compute them for the box (0, in_size)."""
    scale = float(np.float32(in_size) - np.float32(0.0)) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.trunc(center - support + 0.5).astype(np.int64)
    xmin = np.maximum(xmin, 0)
    xmax = np.trunc(center + support + 0.5).astype(np.int64)
    xmax = np.minimum(xmax, in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    w = _bicubic(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    used = taps[None, :] < xmax[:, None]
    w = np.where(used, w, 0.0)
    ww = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # in order, as the C loop sums
        ww = ww + w[:, j]
    w = np.where((ww != 0.0)[:, None] & used, w / np.where(ww != 0.0, ww, 1.0)[:, None], w)
    one = float(1 << PRECISION_BITS)
    kk = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    kk = np.where(used, kk, 0)
    return xmin, xmax, kk


def _clip8_(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of int32 sums, in place until the uint8 copy: 255 from 2**30 on, 0 up to 0, else the
    sum >> PRECISION_BITS."""
    acc.clamp_(0, (1 << PRECISION_BITS << 8) - 1)
    acc >>= PRECISION_BITS
    return acc.to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _taps(
    device: torch.device, in_size: int, out_size: int, shift: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """(source index [ksize, out] int64, weights [ksize, out] int32, the event after their copy or None) on
    ``device`` for a pass from ``in_size`` to ``out_size`` over a source of ``length`` starting at
    ``shift``; a CUDA device gets them from pinned memory without the host waiting for the copy."""
    xmin, _, kk = coefficients(in_size, out_size)
    ksize = kk.shape[1]
    index = np.minimum(xmin[None, :] - shift + np.arange(ksize)[:, None], length - 1)  # unused taps weigh 0
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (index, kk.T.astype(np.int32))]
    if device.type != "cuda":
        return tensors[0].to(device), tensors[1].to(device), None
    tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record()
    return tensors[0], tensors[1], copied


def _pass(src: torch.Tensor, in_size: int, out_size: int, dim: int, shift: int = 0) -> torch.Tensor:
    """One pass along ``dim`` of uint8 ``src`` (channels last), from ``in_size`` to ``out_size`` (``src``
    holds the source from index ``shift`` on)."""
    index, weights, copied = _taps(src.device, in_size, out_size, shift, src.shape[dim])
    if copied is not None:
        torch.cuda.current_stream(src.device).wait_event(copied)
    shape = [1] * src.dim()
    shape[dim] = -1
    acc = None
    for j in range(index.shape[0]):  # in place: at most the sum, one tap's int32 term and its uint8 rows
        term = src.index_select(dim, index[j]).to(torch.int32).mul_(weights[j].view(shape))
        if acc is None:
            acc = term.add_(1 << (PRECISION_BITS - 1))
        else:
            acc += term
    return _clip8_(acc)


def resize_bicubic(
    rgb: torch.Tensor, size: tuple[int, int], vertical_first_rule: bool = VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS
) -> torch.Tensor:
    """uint8 [H, W, C] -> [h, w, C] for size (w, h): PIL.Image.resize(size, BICUBIC)'s pixels. With
    ``vertical_first_rule`` (Pillow 13, the default where it is installed) the vertical pass goes first when
    the height shrinks by more than twice what the width does; without it (Pillow 12) never."""
    height, width = rgb.shape[:2]
    w, h = size
    horizontal_first = not (vertical_first_rule and height - h > 0 and height - h > (width - w) * 2)
    out = rgb
    if horizontal_first:
        first = 0
        if w != width:  # over the rows the vertical pass reads
            xmin_v, xmax_v, _ = coefficients(height, h)
            first, last = int(xmin_v[0]), int(xmin_v[-1] + xmax_v[-1])
            out = _pass(out[first:last], width, w, dim=1)
        if h != height:
            out = _pass(out, height, h, dim=0, shift=first)
    else:
        out = _pass(out, height, h, dim=0)
        if w != width:
            out = _pass(out, width, w, dim=1)
    return out
