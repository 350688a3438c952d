"""Frozen teachers (``ssl_zoo.models.teachers``): OpenAI CLIP's visual tower gives the tokens a hand-written pass
gives (``ln_post`` and ``proj`` on every token), local checkpoints, timm teachers, a random teacher warns."""

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ssl_zoo.models import Backbone
from ssl_zoo.models.teachers import CLIPTeacher, TimmTeacher
from tests.helpers.tiny_mvp import IMAGE_SIDE, TINY_CLIP, mvp_batch, quiet, tiny_mvp


def _clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return quiet(open_clip.create_model, "ViT-B-16", pretrained=None, **TINY_CLIP)


def _hand_written_targets(visual: torch.nn.Module, x: torch.Tensor, project: bool = True) -> torch.Tensor:
    """The open_clip ViT written out: patchify, CLS + positions, ln_pre, blocks, then ln_post and proj on
    every token."""
    p = visual.patch_size[0]
    b = x.shape[0]
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, 3*p*p], raster order
    w = visual.conv1.weight.reshape(visual.conv1.out_channels, -1)  # [W, 3*p*p]
    tokens = patches @ w.T  # [B, N, W] (conv1 has no bias)
    tokens = torch.cat([visual.class_embedding.expand(b, 1, -1), tokens], dim=1) + visual.positional_embedding
    tokens = visual.ln_pre(tokens)
    for block in visual.transformer.resblocks:
        tokens = block(tokens)
    ln = visual.ln_post
    tokens = F.layer_norm(tokens, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return tokens @ visual.proj if project else tokens


def test_clip_targets_equal_a_hand_written_pass_with_ln_post_and_proj_on_every_token():
    clip = _clip()
    teacher = quiet(CLIPTeacher, model_cfg=TINY_CLIP, image_size=IMAGE_SIDE)
    teacher.visual.load_state_dict(clip.visual.state_dict())
    x = torch.randn(3, 3, IMAGE_SIDE, IMAGE_SIDE)
    targets = teacher(x)
    assert targets.shape == (3, 1 + 4, 32) and not targets.requires_grad
    with torch.no_grad():
        expected = _hand_written_targets(clip.visual, x)
        image_embedding = clip.encode_image(x)
        # open_clip's own forward: the pooled CLS embedding (projected) and the unprojected patch tokens.
        clip.visual.output_tokens = True
        pooled, patch_tokens = clip.visual(x)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets[:, 0], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets[:, 1:], patch_tokens @ clip.visual.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets[:, 0], image_embedding, rtol=1e-5, atol=1e-5)


def test_unprojected_targets_keep_the_tower_width():
    clip = _clip()
    teacher = quiet(CLIPTeacher, model_cfg=TINY_CLIP, image_size=IMAGE_SIDE, project_targets=False)
    teacher.visual.load_state_dict(clip.visual.state_dict())
    x = torch.randn(2, 3, IMAGE_SIDE, IMAGE_SIDE)
    with torch.no_grad():
        expected = _hand_written_targets(clip.visual, x, project=False)
    assert teacher.out_dim == 64
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    assert tiny_mvp(project_targets=False).head.out_features == 64


def test_local_open_clip_checkpoint_gives_the_in_memory_models_targets(tmp_path):
    clip = _clip(seed=1)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    torch.manual_seed(2)  # a different random init, overwritten by the checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = CLIPTeacher(pretrained=str(path), model_cfg=TINY_CLIP, image_size=IMAGE_SIDE)
    assert not [w for w in caught if "RANDOMLY" in str(w.message)]
    x = torch.randn(2, 3, IMAGE_SIDE, IMAGE_SIDE)
    with torch.no_grad():
        expected = _hand_written_targets(clip.visual, x)
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    random_teacher = quiet(CLIPTeacher, model_cfg=TINY_CLIP, image_size=IMAGE_SIDE)
    assert not torch.allclose(random_teacher(x), expected, atol=1e-3)


def test_random_teacher_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        CLIPTeacher(model_cfg=TINY_CLIP, image_size=IMAGE_SIDE)


def test_unknown_pretrained_value_is_rejected():
    with pytest.raises(ValueError, match="neither a local file nor an open_clip tag"):
        CLIPTeacher(pretrained="no_such_tag", model_cfg=TINY_CLIP, image_size=IMAGE_SIDE)


def test_timm_teacher_from_a_local_checkpoint(tmp_path):
    torch.manual_seed(3)
    depth = {"model_kwargs": {"depth": 2}}
    reference = Backbone("vit_tiny_patch16_224", img_size=IMAGE_SIDE, **depth)
    path = tmp_path / "vit.pt"
    torch.save(reference.model.state_dict(), path)
    teacher = TimmTeacher("vit_tiny_patch16_224", pretrained=str(path), image_size=IMAGE_SIDE, backbone_kwargs=depth)
    x = torch.randn(2, 3, IMAGE_SIDE, IMAGE_SIDE)
    with torch.no_grad():
        expected = reference.eval().forward_tokens(x)  # CLS + patches after the final norm
    torch.testing.assert_close(teacher(x), expected)
    # In MVP the timm teacher reads the ImageNet-normalised student view.
    model = tiny_mvp(teacher="timm", teacher_name="vit_tiny_patch16_224", teacher_pretrained=str(path),
                   teacher_kwargs=depth)
    batch = mvp_batch(2)
    teacher_targets = model.teacher_backbone(model.teacher_input(batch))
    torch.testing.assert_close(teacher_targets, teacher(batch["views"][:, 0]))
    assert torch.isfinite(model.training_step(batch, 0))
