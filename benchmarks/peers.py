"""lightly's own training steps on our CPU recipes: the peer rows of the quality benchmark (``backbone:
"peer_lightly"``), which say what an independent implementation of the same method learns with the same budget.

Of the methods with a CPU recipe, lightly implements MoCo v2 (``benchmarks/imagenet/resnet50/mocov2.py``,
``examples/pytorch_lightning/moco.py``) and SimSiam (``examples/pytorch_lightning/simsiam.py``); it has no MoCo v3
training step (only MoCo v3's head layout), and MPCL, BAM + IA-CLoss, MVP and HVP-MTL are not lightly methods.
Each peer's step -- heads, loss, memory bank, momentum update -- is lightly's, written as lightly's examples
write it. Everything around the step is the recipe's, so that the two rows differ in the method's implementation
only: the same :class:`~ssl_zoo.models.Backbone`, the recipe's own view transform (the data are identical), its
batch, epochs and time guard (the recipe's ``trainer`` and ``data`` sections, unchanged), its SGD settings and
per-step cosine schedule (:func:`~ssl_zoo.utils.optim.warmup_cosine_scheduler`), and the recipe's values wherever a
lightly default differs (memory bank size, temperature, momentum, head widths).

:func:`benchmarks.recipes.peer_config` turns ``experiments/<method>/cpu.yaml`` into the peer's config: the recipe
with its model replaced by the peer, which takes the recipe's ``init_args`` under the same names (a key the peer
neither takes nor knows to be the method's own is an error, never silently dropped).
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimSiamPredictionHead, SimSiamProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightning.pytorch import LightningModule
from torch import Tensor

from ssl_zoo.augment import BlockwiseAugmentation, mocov2_transform
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.models import Backbone
from ssl_zoo.utils.distributed import world_size
from ssl_zoo.utils.optim import global_batch_size, scaled_lr, warmup_cosine_scheduler


class LightlyMoCoV2(LightningModule):
    """lightly's MoCo v2 step (``benchmarks/imagenet/resnet50/mocov2.py``) on the MoCo v2 CPU recipe.

    lightly's parts: ``MoCoProjectionHead`` (Linear-ReLU-Linear), ``NTXentLoss`` with a memory bank (InfoNCE of
    each query against its key and the bank, the bank filled with the keys), ``update_momentum`` between query and
    key encoding, ``batch_shuffle`` around the key encoder. Defaults are MoCo v2's as our
    :class:`~ssl_zoo.methods.MPCLMoCoV2` states them; argument names are its names, so that the
    recipe's values come in unchanged. Weight decay on every parameter as MoCo's code and our recipe (lightly's
    benchmark exempts norms and biases).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        projector_hidden_dims: int = 2048,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 65536,
        ema_momentum: float = 0.999,
        base_lr: float = 0.03,
        lr_batch_size: int | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        min_scale: float | None = None,
        blur: BlurKind = "pil",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        d = self.backbone.num_features
        self.projection_head = MoCoProjectionHead(d, projector_hidden_dims, proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        # lightly's examples use a 4096-key bank (65536 in its benchmark) and tau 0.1-0.2: the recipe's values here.
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, proj_dim))

    def train_transform(self):
        """The MoCo v2 recipe's own views (:func:`~ssl_zoo.augment.mocov2_transform`)."""
        options = {} if self.hparams.min_scale is None else {"min_scale": self.hparams.min_scale}
        return mocov2_transform(self.hparams.img_size, blur=self.hparams.blur, **options)

    def min_batch_size(self) -> tuple[int, str]:
        return 1, ""

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def forward_key_encoder(self, x: Tensor) -> Tensor:
        distributed = world_size() > 1  # lightly asks the Trainer (num_devices); this also runs outside one
        x, shuffle = batch_shuffle(batch=x, distributed=distributed)
        projections = self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))
        return batch_unshuffle(batch=projections, shuffle=shuffle, distributed=distributed)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        views = batch["views"]  # [B, 2, 3, S, S]
        query = self.projection_head(self.backbone(views[:, 1]).flatten(start_dim=1))  # [B, proj_dim]
        # Momentum update between query and key encoding, as lightly's benchmark (after MoCo's builder.py).
        update_momentum(self.backbone, self.backbone_momentum, m=self.hparams.ema_momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=self.hparams.ema_momentum)
        key = self.forward_key_encoder(views[:, 0])  # [B, proj_dim]
        loss = self.criterion(query, key)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=views.shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = warmup_cosine_scheduler(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LightlySimSiam(LightningModule):
    """lightly's SimSiam step (``examples/pytorch_lightning/simsiam.py``) on the SimSiam CPU recipe.

    lightly's parts: ``SimSiamProjectionHead`` (three Linear layers with BN, the last BN without affine),
    ``SimSiamPredictionHead`` (bottleneck with BN), ``NegativeCosineSimilarity`` with the stop-gradient on the
    projection: ``0.5 * (D(z0, p1) + D(z1, p0))``. Defaults are SimSiam's as our :class:`~ssl_zoo.methods.BAMIA`
    (``bam: false, ia_loss: none``) states them, under its argument names; the predictor keeps its initial lr
    (SimSiam §4.2, our recipe; lightly's example decays nothing).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 2048,
        pred_hidden_dim: int = 512,
        min_scale: float = 0.2,
        blur: BlurKind = "pil",
        base_lr: float = 0.05,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        fix_predictor_lr: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        d = self.backbone.num_features
        # lightly's example: 512-512-128 and 128-64-128 for its ResNet-18; the recipe's widths here.
        self.projection_head = SimSiamProjectionHead(d, proj_hidden_dim, proj_dim)
        self.prediction_head = SimSiamPredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def train_transform(self):
        """The SimSiam recipe's own views (:class:`~ssl_zoo.augment.BlockwiseAugmentation` without blocks)."""
        return BlockwiseAugmentation(size=self.hparams.img_size, min_scale=self.hparams.min_scale, bam=False,
                                     blur=self.hparams.blur)

    def min_batch_size(self) -> tuple[int, str]:
        return 2, "lightly's SimSiam heads normalise with BatchNorm over the batch"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(f)
        p = self.prediction_head(z)
        z = z.detach()
        return z, p

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        views = batch["views"]  # [B, 2, 3, S, S]
        z0, p0 = self(views[:, 0])
        z1, p1 = self(views[:, 1])
        loss = 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=views.shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        groups = [{"params": [*self.backbone.parameters(), *self.projection_head.parameters()]},
                  {"params": list(self.prediction_head.parameters())}]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = warmup_cosine_scheduler(optimizer, self.trainer.estimated_stepping_batches,
                                            constant_groups=(1,) if hp.fix_predictor_lr else ())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
