"""Evaluation transforms (``ssl_zoo.eval.transforms``): BEiT's bicubic resize, the multi-label probe crops and
RandAugment's zero-bit posterize."""

import numpy as np
import pytest
import torch

from ssl_zoo.eval.finetune import FineTune
from ssl_zoo.eval.transforms import center_crop_transform, finetune_train_transform


def test_bicubic_evaluation_resize_is_pils_bicubic_then_centre_crop():
    from PIL import Image as PILImage

    from ssl_zoo.data.datamodule import eval_transform

    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = center_crop_transform(32, interpolation="bicubic")(image)
    short = int(round(32 / 0.875))  # 37: BEiT's int(224 / (224 / 256)) at 224 px
    long = int(short * 70 / 50)  # torchvision (and so BEiT) truncates the long side
    resized = np.asarray(image.resize((long, short), PILImage.Resampling.BICUBIC), dtype=np.float32)
    top, left = int(round((short - 32) / 2)), int(round((resized.shape[1] - 32) / 2))
    crop = torch.from_numpy(resized[top : top + 32, left : left + 32] / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(out, (crop - mean) / std, rtol=0, atol=1e-5)
    bilinear = center_crop_transform(32)(image)
    torch.testing.assert_close(bilinear, eval_transform(32)(image))  # the default is unchanged
    assert not torch.allclose(out, bilinear)
    model = FineTune(backbone="resnet18", num_classes=3, img_size=32, val_interpolation="bicubic")
    model.hparams.multilabel = False
    torch.testing.assert_close(model.val_transform()(image)["views"][0], out)
    with pytest.raises(ValueError, match="val_interpolation"):
        FineTune(backbone="resnet18", val_interpolation="lanczos")


def test_finetune_randaugment_survives_zero_bit_posterize():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    transform = finetune_train_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops
           if op.name.startswith("Posterize")]
    assert ops
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the maximum magnitude keeps 0 bits
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits: 200 -> 192, 100 -> 64, 50 -> 0
    assert op(image).getpixel((0, 0)) == (192, 64, 0)


def _three_bands(width: int = 96, height: int = 32):
    """A wide image: a red band on the left quarter, blue on the right quarter, green between."""
    from PIL import Image

    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[:, : width // 4, 0] = 255
    pixels[:, width // 4 : 3 * width // 4, 1] = 255
    pixels[:, 3 * width // 4 :, 2] = 255
    return Image.fromarray(pixels.numpy())


def _colours(view: torch.Tensor) -> list[int]:
    """The dominant channel (0 red, 1 green, 2 blue) of each column of a normalised view ``[1, 3, S, S]``."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    image = view[0] * std + mean  # [3, S, S] in [0, 1]
    return image.mean(dim=1).argmax(dim=0).tolist()  # [S]


def test_multilabel_probe_crops():
    """Squash keeps the whole image (both side bands), the centre crop cuts them away, RandomResizedCrop
    trains on random parts of the image, squash training only flips the whole image."""
    from ssl_zoo.eval.linear import MultiLabelLinearProbe

    image = _three_bands()
    squash = MultiLabelLinearProbe(backbone="resnet18", img_size=32)
    columns = _colours(squash.val_transform()(image)["views"])
    assert columns[0] == 0 and columns[-1] == 2 and columns[16] == 1

    cropped = MultiLabelLinearProbe(backbone="resnet18", img_size=32, val_crop="center_crop",
                                    train_crop="random_resized_crop")
    view = cropped.val_transform()(image)["views"]
    assert view.shape == (1, 3, 32, 32)
    assert set(_colours(view)) == {1}  # 96x32 -> short side 37 (111x37) -> the middle 32 columns: green only

    torch.manual_seed(0)
    whole = [_colours(squash.train_transform()(image)["views"]) for _ in range(8)]
    assert all(c in (columns, columns[::-1]) for c in whole)
    crops = [_colours(cropped.train_transform()(image)["views"]) for _ in range(8)]
    assert any(c not in (columns, columns[::-1]) for c in crops)
    with pytest.raises(ValueError, match="model.train_crop"):
        MultiLabelLinearProbe(backbone="resnet18", train_crop="center_crop")
