"""The dense transfer recipes: the paths the papers' table manifests name exist."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_recipes_the_paper_manifests_name_exist():
    """The papers' table manifests point at these paths; tests/cli/test_lightning_cli.py parses every one of them."""
    names = ["detect_demo", "segment_demo", "coco_maskrcnn_r50_c4_1x", "coco_maskrcnn_r50_fpn_1x",
             "coco_maskrcnn_swint_fpn_1x", "coco_maskrcnn_swins_fpn_1x", "coco_maskrcnn_swinb_fpn_1x",
             "coco_maskrcnn_vitb_simplefpn_1x", "voc_fasterrcnn_r50_c4_24k", "ade20k_upernet_vitb_160k",
             "ade20k_upernet_vitb_160k_mvp", "ade20k_upernet_beit_base_160k", "ade20k_upernet_vitl_160k", "ade20k_upernet_swinb_160k",
             # BAM+IA-CLoss Table 3: MoCo's R50-C4 recipes at the paper's batch of 8
             "voc_fasterrcnn_r50_c4_24k_batch8", "coco_maskrcnn_r50_c4_1x_batch8"]
    found = {p.stem for p in (ROOT / "experiments" / "transfer").glob("*.yaml")}
    assert found == set(names)
