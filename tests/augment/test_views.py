"""The view pipeline (``ssl_zoo.augment.views``): the fast pipeline computes what the torchvision recipe computes,
the reduced-scale JPEG decode gives the crops of a full decode up to resampling, blur kernel sizes, multi-view
stacking.

References: torchvision's own ``Compose`` of the same steps under the same seed, torchvision's 2-D
``gaussian_blur``, ``ToTensor`` + ``Normalize``, and a full-scale decode followed by the same crop.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ssl_zoo.augment import (
    BlockwiseAugmentation,
    MultiViewTransform,
    SeparableGaussianBlur,
    TwoViewTransform,
    ViewPipeline,
    blur_kernel_size,
    byol_view,
    gaussian_blur_separable,
    simsiam_view,
)
from ssl_zoo.augment.views import _adjust_hue, largest_reduction
from ssl_zoo.data.decode import BadImageError, EncodedImage, load_image


@pytest.mark.parametrize(("size", "expected"), [(224, 23), (96, 9), (64, 7), (32, 3), (10, 3)])
def test_blur_kernel_size(size, expected):
    assert blur_kernel_size(size) == expected


def test_blur_kernel_is_odd_and_about_ten_percent():
    for size in range(40, 400):
        k = blur_kernel_size(size)
        assert k % 2 == 1 and abs(k - 0.1 * size) <= 1.0


def test_multi_view_transform_stacks_in_order(photo):
    first = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    second = T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Lambda(lambda x: 1 - x)])
    out = MultiViewTransform([first, second, first])(photo)["views"]
    assert out.shape == (3, 3, 8, 8)
    assert torch.equal(out[0], out[2]) and torch.allclose(out[1], 1 - out[0])
    assert TwoViewTransform(first)(photo)["views"].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="at least one"):
        MultiViewTransform([])


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A real photograph upscaled to 1920 x 1281 and saved as JPEG: large enough for 1/2 and 1/4 decodes."""
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("flower.jpg")).resize((1920, 1281), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _as_uint8(view: torch.Tensor, mean, std) -> torch.Tensor:
    return (view * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
@pytest.mark.parametrize("size", [(224, 224), (40, 56)])
def test_separable_blur_equals_torchvision_2d_blur(sigma, size, photo):
    img = photo.resize(size)
    kernel = [23, 23] if min(size) > 23 else [9, 9]
    reference = np.asarray(F.gaussian_blur(img, kernel, [sigma, sigma])).astype(int)
    fast = np.asarray(gaussian_blur_separable(img, kernel, sigma)).astype(int)
    difference = np.abs(fast - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float summation order only


def test_hue_lookup_table_equals_torchvision(photo):
    img = photo.resize((64, 48))
    for factor in (-0.5, -0.1, -0.0039, 0.0, 0.05, 0.37, 0.5):
        assert np.array_equal(np.asarray(_adjust_hue(img, factor)), np.asarray(F.adjust_hue(img, factor)))


@pytest.mark.parametrize("make", [lambda: simsiam_view(64), lambda: simsiam_view(64, blur="kernel"),
                                  lambda: byol_view(64, blur_p=1.0, solarize_p=0.5),
                                  lambda: byol_view(32, blur_p=0.1, solarize_p=0.2, normalize="clip", blur="kernel")])
def test_view_pipeline_draws_and_computes_what_the_compose_does(make, photo):
    view = make()
    reference = T.Compose(view.transforms)  # torchvision's own forward for every step
    mean, std = view.transforms[-1].mean, view.transforms[-1].std
    for seed in range(6):
        torch.manual_seed(seed)
        fast = view(photo)
        after_fast = torch.rand(1)
        torch.manual_seed(seed)
        slow = reference(photo)
        assert torch.equal(torch.rand(1), after_fast)  # the same number of draws
        difference = (_as_uint8(fast, mean, std) - _as_uint8(slow, mean, std)).abs()
        assert difference.max() < 1 + 1e-3  # at most one level, from the blur's float rounding
        assert (difference > 1e-3).float().mean() < 1e-3
    # without a blur the result is bit for bit torchvision's (ToTensor + Normalize by lookup table included)
    no_blur = ViewPipeline([t for t in view.transforms
                            if not (isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.GaussianBlur))])
    torch.manual_seed(0)
    a = no_blur(photo)
    torch.manual_seed(0)
    assert torch.equal(a, T.Compose(no_blur.transforms)(photo))


def test_view_pipeline_rejects_steps_it_cannot_run():
    with pytest.raises(TypeError, match="starts with RandomResizedCrop"):
        ViewPipeline([T.ToTensor()])
    with pytest.raises(TypeError, match="cannot run"):
        ViewPipeline([T.RandomResizedCrop(8), T.RandomRotation(5)])


def test_bam_without_block_copies_equals_the_block_path(photo):
    """BAM crops each view from the whole image at its block's offset: the pixels of cropping the block first."""
    fast = BlockwiseAugmentation(size=32)
    slow = BlockwiseAugmentation(size=32, view_transform=T.Compose(fast.view_transform.transforms))
    torch.manual_seed(4)
    a = fast(photo)["views"]
    torch.manual_seed(4)
    b = slow(photo)["views"]
    assert (a - b).abs().max() < 0.05  # one grey level after normalisation (blur rounding), nothing else


def test_largest_reduction_never_upsamples():
    assert largest_reduction((1000, 800), 223, 224) == 1
    assert largest_reduction((1000, 800), 448, 224) == 2
    assert largest_reduction((1000, 800), 900, 224) == 4
    assert largest_reduction((4000, 3000), 5000, 224) == 8


def test_reduced_scale_decode_gives_the_full_decode_crop(big_jpeg):
    """Views whose crops allow a 1/4 or 1/8 decode equal the same crops of the full decode up to resampling: they
    differ less than three times as much as the full-decode crops resized bicubic instead of bilinear do (and by
    a few grey levels on average), and less than the same crop shifted by one pixel of the reduced image."""
    encoded = EncodedImage(big_jpeg, "big.jpg")
    assert encoded.size == (1920, 1281) and encoded.format == "JPEG"
    assert encoded.decode(4).size == (480, 321)
    full = encoded.decode()
    crop = T.RandomResizedCrop(128, scale=(0.6, 1.0))
    transform = BlockwiseAugmentation(size=128, bam=False, view_transform=ViewPipeline([crop, T.PILToTensor()]))
    for seed in range(4):
        torch.manual_seed(seed)
        reduced = transform(encoded)["views"].float()  # decoded at 1/4 or 1/8 scale (crops of 900-1281 px)
        torch.manual_seed(seed)
        boxes = [crop.get_params(full, crop.scale, crop.ratio) for _ in range(2)]  # the same two crops
        for view, (top, left, h, w) in zip(reduced, boxes, strict=True):
            reference = F.pil_to_tensor(F.resized_crop(full, top, left, h, w, [128, 128])).float()
            bicubic = F.pil_to_tensor(F.resized_crop(full, top, left, h, w, [128, 128],
                                                     F.InterpolationMode.BICUBIC)).float()
            shifted = F.pil_to_tensor(F.resized_crop(full, top + 8, left + 8, h, w, [128, 128])).float()
            difference = (view - reference).abs().mean()
            assert difference < 8.0
            assert difference < 3 * (bicubic - reference).abs().mean()
            assert difference < (shifted - reference).abs().mean()


def test_reduced_decode_is_used_only_when_every_crop_allows_it(big_jpeg, monkeypatch):
    encoded = EncodedImage(big_jpeg, "big.jpg")
    asked = []
    real_decode = EncodedImage.decode
    monkeypatch.setattr(EncodedImage, "decode", lambda self, reduce=1: asked.append(reduce) or real_decode(self, reduce))

    def geometric(size: int, min_scale: float) -> ViewPipeline:
        return ViewPipeline([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.PILToTensor()])

    torch.manual_seed(0)
    for _ in range(3):
        # crops of 20-100 % of 1920 x 1281 (sides >= 560 px) for 224 px views: 1/2 at least
        BlockwiseAugmentation(size=224, bam=False, view_transform=geometric(224, 0.2))(encoded)
        # BAM: blocks of 70 %, crops of 20-100 % of a block (sides >= 390 px): 1/2 at least
        BlockwiseAugmentation(size=224, view_transform=geometric(224, 0.2))(encoded)
        # 1000 px views: no crop is 2000 px wide, so full scale
        BlockwiseAugmentation(size=1000, bam=False, view_transform=geometric(1000, 0.5))(encoded)
    assert all(reduce >= 2 for reduce in asked[0::3] + asked[1::3]) and asked[2::3] == [1, 1, 1]


def test_encoded_and_decoded_inputs_give_the_same_views_at_full_scale(photo):
    """On a 640 x 427 photo no crop of a 160 px BAM view allows a reduced decode (a block is 448 x 299): the views
    from the bytes are bit for bit those from the decoded image."""
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    encoded = EncodedImage(buffer.getvalue(), "photo.jpg")
    decoded = encoded.decode()
    transform = BlockwiseAugmentation(size=160)
    torch.manual_seed(3)
    a = transform(encoded)["views"]
    torch.manual_seed(3)
    assert torch.equal(a, transform(decoded)["views"])


def test_encoded_image_follows_exif_orientation_and_reports_bad_bodies(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 640 x 427, shown 427 x 640
    path = tmp_path / "rotated.jpg"
    photo.save(path, format="JPEG", exif=exif)
    encoded = EncodedImage.read(path)
    assert encoded.size == (427, 640)
    assert encoded.decode().size == (427, 640) and encoded.decode(2).size == (214, 320)
    assert np.array_equal(np.asarray(encoded.decode()), np.asarray(load_image(path)))
    truncated = path.read_bytes()[:5000]
    broken = EncodedImage(truncated, "cut.jpg")  # the header is fine...
    with pytest.raises(BadImageError, match="cut.jpg"):
        broken.decode(8)  # ...the body is not, even at 1/8 scale
    with pytest.raises(BadImageError, match="empty"):
        EncodedImage(b"", "empty.jpg")
    with pytest.raises(BadImageError, match="not a recognised image"):
        EncodedImage(b"<html></html>", "page.jpg")


def test_pil_blur_is_the_reference_codes_filter_with_torchvision_s_sigma_draw(photo):
    """SimSiam / MoCo's ``GaussianBlur``: ``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in [0.1, 2]."""
    from PIL import ImageFilter

    from ssl_zoo.augment import PILGaussianBlur, blur_step

    img = photo.resize((48, 40))
    blur = blur_step(48)
    assert isinstance(blur, PILGaussianBlur) and blur.sigma == (0.1, 2.0)
    for seed in range(3):
        torch.manual_seed(seed)
        sigma = torch.empty(1).uniform_(0.1, 2.0).item()  # T.GaussianBlur.get_params
        after = torch.rand(1)
        torch.manual_seed(seed)
        out = blur(img)
        assert torch.equal(torch.rand(1), after)  # one draw, as torchvision's GaussianBlur
        assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))
    assert isinstance(blur_step(48, "kernel"), SeparableGaussianBlur)
    with pytest.raises(ValueError, match="blur must be 'pil' or 'kernel'"):
        blur_step(48, "box")
