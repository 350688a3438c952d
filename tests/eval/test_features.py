"""Feature extraction (``ssl_zoo.eval.features``): the pooling switch on ResNet maps and ViT patch grids, and the
loader order and eval mode of ``extract_features``."""

import torch

from ssl_zoo.eval.features import embed, extract_features
from ssl_zoo.models import Backbone
from tests.helpers.toy_images import ToyImageDataset


def test_pooling_switch_changes_the_features_as_defined():
    torch.manual_seed(0)
    backbone = Backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = backbone.forward_map(images)  # [2, 512, 2, 2]
        feats = {p: embed(backbone, images, p) for p in ("gap", "gmp", "gamp", "backbone")}
    torch.testing.assert_close(feats["gap"], fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(feats["gmp"], fmap.amax(dim=(2, 3)))
    torch.testing.assert_close(feats["gamp"], (feats["gap"] + feats["gmp"]) / 2)
    torch.testing.assert_close(feats["backbone"], feats["gap"])  # timm's ResNet head is an average pool
    assert not torch.allclose(feats["gap"], feats["gmp"])


def test_pooling_of_vit_uses_the_patch_grid():
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.forward_tokens(images)  # [2, 1 + 4, 192]
        got = embed(backbone, images, "gamp")
    patches = tokens[:, 1:]
    torch.testing.assert_close(got, (patches.mean(1) + patches.amax(1)) / 2)


def test_extract_features_keeps_loader_order_and_eval_mode():
    torch.manual_seed(0)
    backbone = Backbone("resnet18")
    data = ToyImageDataset(n=7)
    feats, labels = extract_features(backbone, torch.utils.data.DataLoader(data, batch_size=3))
    backbone.eval()
    with torch.no_grad():
        want = backbone(data.images)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == data.labels.tolist()
