"""Dense transfer augmentations (``ssl_zoo.transfer.data.transforms``): the segmentation crop's geometry."""

import numpy as np
import torch
from PIL import Image

from ssl_zoo.transfer.data.transforms import (
    SegmentationTrainTransform,
    rescale_size,
)


def test_segmentation_train_transform_geometry():
    """A crop of the rescaled image; the label moves with the image; small images are padded with 255."""
    torch.manual_seed(0)
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (30, 1, 3)))
    label = np.tile(np.arange(40, dtype=np.uint8)[None, :] // 10, (30, 1))  # 4 vertical bands
    transform = SegmentationTrainTransform(crop_size=32, scale=(40, 30), ratio_range=(1.0, 1.0), photometric=False,
                                           flip_prob=0.0)
    pixels, target = transform(image, label)
    assert pixels.shape == (3, 32, 32) and target.shape == (32, 32)
    assert (target[30:] == 255).all()  # 30 rows, padded to 32
    # every column of the crop holds one band, and the image's grey level agrees with it
    grey = pixels[0, 0] * 0.229 * 255 + 0.485 * 255
    assert torch.equal(target[0], (grey.round().long() // 10).clamp(max=3))
    assert rescale_size(2000, 1000, (2048, 512)) == (1024, 512)
    assert rescale_size(500, 400, (2048, 512)) == (640, 512)
