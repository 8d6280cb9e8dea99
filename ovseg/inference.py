"""Whole-image and sliding-window inference, shared by every method.

Follows mmseg's ``EncoderDecoder.slide_inference`` (../shared/reference/eval_protocol.md, 1.2):
the image is resized so that its short side is ``short_side`` (long side capped), windows of
``window`` pixels are taken every ``stride`` pixels with the last window clamped to the image
border (no padding; a window never exceeds the image), the scores of overlapping windows are
averaged, and the result is bilinearly upsampled (align_corners=False) to the label's size.

All windows of a batch of images run through the model as one batch (or in chunks of
``max_batch`` windows); crops are gathered and scores scattered back with index tensors, so there
is no Python loop over windows or pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ScoreFn = Callable[[Tensor], Tensor]
"""(N, 3, h, w) images in [0, 1] -> (N, Q, h', w') scores at any resolution."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a benchmark's images are fed to the model.

    Attributes:
        short_side: resize so the short side has this many pixels (None: keep the size).
        max_long_side: cap on the long side after resizing (mmseg uses 2048).
        window: side of the square sliding window (None: whole image at once).
        stride: step between windows (default: ``window``, i.e. no overlap).
        max_batch: at most this many windows per forward pass (None: all windows of the batch).
    """

    short_side: int | None = None
    max_long_side: int | None = 2048
    window: int | None = None
    stride: int | None = None
    max_batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("short_side", "max_long_side", "window", "stride", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"InferenceSettings.{name} must be a positive integer, got {value}")
        if self.stride is not None and self.window is None:
            raise ValueError("InferenceSettings.stride is set but window is not")


def resized_shape(height: int, width: int, short_side: int | None, max_long_side: int | None
                  ) -> tuple[int, int]:
    """Size after mmseg's keep-ratio resize to scale (max_long_side, short_side)."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def window_starts(size: int, window: int, stride: int) -> Tensor:
    """(N,) start offsets of windows along one axis, the last clamped to the border (mmseg)."""
    window = min(window, size)
    count = max(size - window + stride - 1, 0) // stride + 1
    ends = torch.clamp(torch.arange(count) * stride + window, max=size)
    return torch.clamp(ends - window, min=0)


def sliding_window_scores(
    images: Tensor, score_fn: ScoreFn, window: int, stride: int, max_batch: int | None = None
) -> Tensor:
    """Average of window scores, each upsampled to its window, over a batch of equal-size images.

    Args:
        images: (B, 3, H, W).
        score_fn: (N, 3, h, w) -> (N, Q, h', w').
        window, stride: window side and step; windows larger than the image shrink to it.
        max_batch: windows per call of ``score_fn`` (None: all at once).

    Returns:
        (B, Q, H, W) scores.
    """
    batch, channels, height, width = images.shape
    win_h, win_w = min(window, height), min(window, width)
    ys = window_starts(height, window, stride).to(images.device)
    xs = window_starts(width, window, stride).to(images.device)
    # (N,) window origins of the grid, row-major.
    origin_y = ys.repeat_interleave(len(xs))
    origin_x = xs.repeat(len(ys))
    rows = origin_y[:, None] + torch.arange(win_h, device=images.device)  # (N, win_h)
    cols = origin_x[:, None] + torch.arange(win_w, device=images.device)  # (N, win_w)
    # Gather every crop at once: (B, 3, N, win_h, win_w) -> (B*N, 3, win_h, win_w).
    crops = images[:, :, rows[:, :, None], cols[:, None, :]]
    num_windows = rows.shape[0]
    crops = crops.permute(0, 2, 1, 3, 4).reshape(batch * num_windows, channels, win_h, win_w)

    step = max_batch or crops.shape[0]
    scores = torch.cat([
        _upsample(score_fn(crops[start:start + step]), (win_h, win_w))
        for start in range(0, crops.shape[0], step)
    ])
    num_queries = scores.shape[1]
    # Scatter-add into the image: flat pixel index of every window pixel, (N, win_h, win_w).
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)
    scores = scores.view(batch, num_windows, num_queries, win_h * win_w)
    scores = scores.permute(0, 2, 1, 3).reshape(batch, num_queries, -1)
    total = scores.new_zeros(batch, num_queries, height * width).index_add_(2, flat, scores)
    counts = torch.bincount(flat, minlength=height * width).to(total.dtype)
    return (total / counts).view(batch, num_queries, height, width)


def _upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of (N, Q, h, w) scores to ``size``."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def infer_scores(
    images: Tensor,
    score_fn: ScoreFn,
    settings: InferenceSettings,
    output_size: tuple[int, int] | None = None,
) -> Tensor:
    """Scores of a batch of equal-size images at ``output_size`` (default: the input size).

    Args:
        images: (B, 3, H, W) in [0, 1].
        score_fn: (N, 3, h, w) -> (N, Q, h', w') scores.
        settings: resize and window settings.
        output_size: (H_out, W_out), typically the label's size.

    Returns:
        (B, Q, H_out, W_out).
    """
    height, width = images.shape[-2:]
    output_size = output_size or (height, width)
    target = resized_shape(height, width, settings.short_side, settings.max_long_side)
    if target != (height, width):
        images = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
    if settings.window is None:
        # As mmseg's whole mode: upsample to the (resized) input first, then to the output size.
        scores = _upsample(score_fn(images), tuple(images.shape[-2:]))
    else:
        scores = sliding_window_scores(
            images, score_fn, settings.window, settings.stride or settings.window, settings.max_batch
        )
    return _upsample(scores, output_size)
