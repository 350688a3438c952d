"""Semantic segmentation (``ssl_zoo.transfer.segmentation``): sliding windows cover the image as mmseg's do."""

import math

import numpy as np

from ssl_zoo.transfer.segmentation import slide_windows


def test_slide_windows_cover_the_image_like_mmseg():
    windows = slide_windows(600, 1000, 512, 341)
    assert len(windows) == 2 * 3 and all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in windows)
    cover = np.zeros((600, 1000), dtype=int)
    for y1, y2, x1, x2 in windows:
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert slide_windows(100, 200, 512, 341) == [(0, 100, 0, 200)]
    assert math.isclose(len(slide_windows(512, 512, 512, 341)), 1)
