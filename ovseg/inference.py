"""Whole-image and sliding-window inference, shared by every method.

Follows mmseg's ``EncoderDecoder.slide_inference`` (../shared/reference/eval_protocol.md, 1.2):
the image is resized so that its short side is ``short_side`` (long side capped), windows of
``window`` pixels are taken every ``stride`` pixels with the last window clamped to the image
border (no padding; a window never exceeds the image), the scores of overlapping windows are
averaged, and the result is bilinearly upsampled (align_corners=False) to the label's size.

All windows of a batch of images run through the model as one batch (or in chunks of
``max_batch`` windows); crops are gathered with index tensors, and the window scores are resized
and overlap-added one axis at a time (two small interpolation matrices and two ``index_add_``), so
there is no Python loop over windows or pixels and no full-size score map per window in memory.
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


def resized_shape(height: int, width: int, short_side: int | None, max_long_side: int | None) -> tuple[int, int]:
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
    device = images.device
    ys = window_starts(height, window, stride).to(device)  # (ny,) window rows
    xs = window_starts(width, window, stride).to(device)  # (nx,) window columns
    rows_y, cols_x = len(ys), len(xs)
    # Every crop at once, indexed out of a strided view of all window positions (no copy until
    # the index): (B, 3, ny, nx, win_h, win_w) -> (B*ny*nx, 3, win_h, win_w), windows row-major.
    positions = images.unfold(2, win_h, 1).unfold(3, win_w, 1)
    crops = positions[:, :, ys[:, None], xs[None, :]]
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(batch * rows_y * cols_x, channels, win_h, win_w)

    step = max_batch or crops.shape[0]
    scores = torch.cat([score_fn(crops[start : start + step]) for start in range(0, crops.shape[0], step)])
    num_queries, out_h, out_w = scores.shape[1:]
    # Bilinear upsampling is separable and overlap-adding is too, so neither the per-window
    # full-size score maps nor a per-pixel scatter is needed: along the width, each window's
    # scores are resized by one (win_w, out_w) matrix and added at their columns; then the same
    # along the height. (B, ny, nx, Q, h', w') -> (B, Q, ny, h', nx, w').
    scores = scores.view(batch, rows_y, cols_x, num_queries, out_h, out_w).permute(0, 3, 1, 4, 2, 5)
    if out_w != win_w:
        scores = scores @ interpolation_matrix(win_w, out_w, scores).T  # (..., nx, win_w)
    cols = (xs[:, None] + torch.arange(win_w, device=device)).reshape(-1)  # (nx * win_w,)
    rows = (ys[:, None] + torch.arange(win_h, device=device)).reshape(-1)  # (ny * win_h,)
    band = scores.new_zeros(batch, num_queries, rows_y, out_h, width)
    band.index_add_(4, cols, scores.reshape(batch, num_queries, rows_y, out_h, cols_x * win_w))
    if out_h != win_h:
        band = interpolation_matrix(win_h, out_h, band) @ band  # (B, Q, ny, win_h, W)
    total = band.new_zeros(batch, num_queries, height, width)
    total.index_add_(2, rows, band.reshape(batch, num_queries, rows_y * win_h, width))
    # Windows per pixel: a product grid, so (windows over the row) x (windows over the column).
    counts = torch.bincount(rows, minlength=height)[:, None] * torch.bincount(cols, minlength=width)[None, :]
    return total.div_(counts.to(total.dtype))


def interpolation_matrix(size_out: int, size_in: int, like: Tensor) -> Tensor:
    """(size_out, size_in): the weights of 1-d linear resizing with align_corners=False, i.e. one
    axis of ``F.interpolate(..., mode="bilinear", align_corners=False)`` (dtype and device of ``like``)."""
    eye = torch.eye(size_in, dtype=torch.float32, device=like.device)[None]
    weights = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T
    return weights.to(like.dtype)


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
