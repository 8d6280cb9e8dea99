"""Whole-image and sliding-window inference against an independent window-by-window loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg.inference import InferenceSettings, infer_scores, resized_shape, sliding_window_scores, window_starts


def conv_score_fn(num_queries: int = 3, stride: int = 4):
    """A position-dependent, non-trivial scorer: a fixed random conv with a downsampling stride."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(num_queries, 3, 5, 5, generator=generator)

    def score(images: torch.Tensor) -> torch.Tensor:
        return F.conv2d(images, weight, stride=stride, padding=2)

    return score


def loop_reference(image, score_fn, window, stride):
    """mmseg slide_inference written plainly: one window at a time, sum then divide by counts."""
    _, _, height, width = image.shape
    h_crop, w_crop = min(window, height), min(window, width)
    h_grids = max(height - h_crop + stride - 1, 0) // stride + 1
    w_grids = max(width - w_crop + stride - 1, 0) // stride + 1
    total, count = None, torch.zeros(1, 1, height, width)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + h_crop, height), min(x1 + w_crop, width)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_scores = score_fn(image[:, :, y1:y2, x1:x2])
            crop_scores = F.interpolate(crop_scores, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            if total is None:
                total = torch.zeros(image.shape[0], crop_scores.shape[1], height, width)
            total[:, :, y1:y2, x1:x2] += crop_scores
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@pytest.mark.parametrize(
    "size,window,stride",
    [
        ((37, 53), 16, 8),
        ((40, 40), 16, 16),
        ((31, 29), 12, 5),
        ((20, 50), 32, 7),
        ((64, 48), 24, 24),
    ],
)
def test_sliding_window_equals_loop_reference(size, window, stride):
    image = torch.rand(2, 3, *size)
    score_fn = conv_score_fn()
    ours = sliding_window_scores(image, score_fn, window, stride)
    assert ours.shape == (2, 3, *size)
    torch.testing.assert_close(ours, loop_reference(image, score_fn, window, stride), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scorer", ["full_resolution", "upsampled", "non_square"])
def test_sliding_window_equals_loop_reference_at_any_score_resolution(scorer):
    """Scores at the window's size (no resizing), larger than it (resized down), or of a
    different factor per axis: the separable resize-and-add equals the window loop."""
    image = torch.rand(3, 3, 41, 57)
    conv = conv_score_fn(num_queries=4, stride=1)

    def score_fn(batch):
        scores = conv(batch)
        if scorer == "upsampled":
            return F.interpolate(scores, scale_factor=1.5, mode="nearest")
        if scorer == "non_square":
            return scores[:, :, ::3, ::2]
        return scores

    ours = sliding_window_scores(image, score_fn, 20, 9, max_batch=7)
    torch.testing.assert_close(ours, loop_reference(image, score_fn, 20, 9), atol=1e-5, rtol=1e-5)


def test_windows_run_as_one_batch_or_in_chunks():
    image = torch.rand(1, 3, 45, 33)
    calls = []
    score_fn = conv_score_fn()

    def counting(batch):
        calls.append(batch.shape[0])
        return score_fn(batch)

    full = sliding_window_scores(image, counting, 16, 8)
    assert calls == [len(window_starts(45, 16, 8)) * len(window_starts(33, 16, 8))]
    calls.clear()
    chunked = sliding_window_scores(image, counting, 16, 8, max_batch=4)
    assert max(calls) == 4 and sum(calls) == 5 * 4  # 5 rows x 4 columns of windows
    torch.testing.assert_close(full, chunked)


@pytest.mark.parametrize("size", [(33, 47), (48, 48), (17, 61)])
def test_window_covering_the_image_equals_whole_image(size):
    image = torch.rand(2, 3, *size)
    score_fn = conv_score_fn()
    whole = infer_scores(image, score_fn, InferenceSettings(), output_size=(50, 70))
    slide = infer_scores(image, score_fn, InferenceSettings(window=64, stride=32), output_size=(50, 70))
    torch.testing.assert_close(whole, slide)
    assert whole.shape == (2, 3, 50, 70)


def test_window_starts_clamped_like_mmseg():
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(11, 4, 3).tolist() == [0, 3, 6, 7]
    assert window_starts(3, 8, 4).tolist() == [0]  # window larger than the image: one window


def test_resize_short_side_with_long_side_cap():
    assert resized_shape(100, 200, 50, 2048) == (50, 100)
    assert resized_shape(100, 1000, 448, 2048) == (205, 2048)  # the long-side cap wins
    assert resized_shape(30, 40, None, 2048) == (30, 40)
    image = torch.rand(1, 3, 30, 60)
    seen = []

    def record(batch):
        seen.append(tuple(batch.shape[-2:]))
        return batch[:, :1]

    out = infer_scores(image, record, InferenceSettings(short_side=60))
    assert seen == [(60, 120)] and out.shape == (1, 1, 30, 60)


def test_settings_validation():
    with pytest.raises(ValueError, match="stride"):
        InferenceSettings(stride=4)
    with pytest.raises(ValueError, match="window"):
        InferenceSettings(window=0)
