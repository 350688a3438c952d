"""``Mp`` projection heads on one backbone feature, with shared or separate hidden layers (MPCL §3.1).

Each projector ``g^m`` is ``hidden layers -> output layer``. With ``shared_hidden`` the projectors share their
hidden layers and own only their output layer, so every extra projector adds one ``Linear(H, out)``: this is
the layout whose size the MPCL paper reports (ResNet-50 + projectors: 27.97 / 28.23 / 28.75 / 29.80 M
parameters for 1 / 2 / 4 / 8 projectors, i.e. one shared 2048 -> 2048 layer and one 2048 -> 128 layer per
projector). Without it every projector is a whole MLP of its own (the paper's "Different" hidden width rows,
which need one width per projector).

The Table II alternatives to PCR that act on the projectors live here too: dropout in front of each output
layer (an independent mask per projector), mixed initialisation (Kaiming and Xavier, alternating over the
projectors) and the weights that the orthogonality constraint reads (:meth:`MultiProjector.distinct_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.models.heads import non_affine_norm

__all__ = ["MIXED_INITS", "MultiProjector", "count_parameters"]

ProjectorInit = Literal["default", "mixed"]
# Table II, 'Mix Init.': "different projectors use different initialization methods ..., namely Kaiming [29] and
# Xavier [30]". Projector m initialises its own layers with scheme m mod 2, each in the form its paper proposes:
# He et al. 2015's zero-mean Gaussian with std sqrt(2 / fan_in) (ReLU gain), Glorot & Bengio 2010's "normalized
# initialization" U(+-sqrt(6 / (fan_in + fan_out))); biases zero.
MIXED_INITS = ("kaiming_normal", "xavier_uniform")


def _hidden_stack(input_dim: int, width: int, depth: int, norm_layer: type[nn.Module] | None) -> nn.Sequential:
    """``(Linear -> [norm] -> ReLU) x depth``; a bias before a normalisation layer is redundant."""
    layers: list[nn.Module] = []
    d_in = input_dim
    for _ in range(depth):
        layers.append(nn.Linear(d_in, width, bias=norm_layer is None))
        if norm_layer is not None:
            layers.append(norm_layer(width))
        layers.append(nn.ReLU(inplace=True))
        d_in = width
    return nn.Sequential(*layers)


@torch.no_grad()
def _init_linears(module: nn.Module, scheme: str) -> None:
    """Initialise every ``nn.Linear`` of ``module`` with one of :data:`MIXED_INITS`, biases zero."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if scheme == "kaiming_normal":  # He et al. 2015: N(0, 2 / fan_in)
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        elif scheme == "xavier_uniform":  # Glorot & Bengio 2010: U(+-sqrt(6 / (fan_in + fan_out)))
            nn.init.xavier_uniform_(layer.weight)
        else:
            raise ValueError(f"unknown init scheme '{scheme}'")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class MultiProjector(nn.Module):
    """``Mp`` projectors ``g^m`` over one feature vector: ``forward([B, D_in]) -> [Mp, B, output_dim]``.

    Args:
        input_dim: width of the backbone feature.
        hidden_dims: one hidden width per projector (``Mp`` of them); all equal when ``shared_hidden``.
        depth: hidden layers per projector (1: MoCo v2's 2-layer MLP; 2: MoCo v3's / Barlow Twins' 3-layer MLP).
        output_dim: width of every projector's output.
        norm_layer: normalisation after each hidden linear layer (``None``: none, as MoCo v2).
        last_norm: a non-affine ``norm_layer`` after each output layer (MoCo v3).
        shared_hidden: one set of hidden layers for all projectors; each owns only its output layer.
        output_bias: bias of the output layers; ``None``: unless followed by a norm (Barlow Twins: ``False``).
        dropout: dropout probability on each projector's input to its output layer, drawn independently per
            projector (only in training mode, and only while :attr:`dropout` is above 0: the momentum copy of
            a key encoder sets it to 0).
        init: ``default`` (PyTorch's) or ``mixed`` (projector ``m`` with scheme ``MIXED_INITS[m % 2]``: Kaiming,
            Xavier, Kaiming, ...; with shared hidden layers only the output layers are the projectors' own, and
            the shared ones keep PyTorch's init).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        depth: int,
        output_dim: int,
        norm_layer: type[nn.Module] | None = None,
        last_norm: bool = False,
        shared_hidden: bool = True,
        output_bias: bool | None = None,
        dropout: float = 0.0,
        init: ProjectorInit = "default",
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims or any(h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be one positive width per projector, got {hidden_dims}")
        if shared_hidden and len(set(hidden_dims)) > 1:
            raise ValueError(f"projectors sharing their hidden layers have one hidden width, got {hidden_dims}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if init not in ("default", "mixed"):
            raise ValueError(f"init must be 'default' or 'mixed', got '{init}'")
        self.num_projectors = len(hidden_dims)
        self.shared_hidden = shared_hidden
        self.dropout = dropout
        use_last_norm = last_norm and norm_layer is not None
        bias = (not use_last_norm) if output_bias is None else output_bias
        # hidden[0] serves every projector when shared; hidden[m] serves projector m otherwise.
        stacks = hidden_dims[:1] if shared_hidden else hidden_dims
        self.hidden = nn.ModuleList(_hidden_stack(input_dim, h, depth, norm_layer) for h in stacks)
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Linear(h, output_dim, bias=bias),
                          *([non_affine_norm(norm_layer, output_dim)] if use_last_norm else []))
            for h in hidden_dims
        )
        if init == "mixed":
            for m, out in enumerate(self.outputs):
                scheme = MIXED_INITS[m % len(MIXED_INITS)]
                _init_linears(out, scheme)
                if not shared_hidden:
                    _init_linears(self.hidden[m], scheme)
        self.input_dim = input_dim
        self.output_dim = output_dim

    def forward(self, h: Tensor) -> Tensor:
        """``h [B, input_dim]`` -> ``[Mp, B, output_dim]``."""
        hidden = [stack(h) for stack in self.hidden]  # 1 or Mp tensors [B, H_m]
        out = []
        for m, layer in enumerate(self.outputs):
            x = hidden[0 if self.shared_hidden else m]
            if self.dropout > 0 and self.training:  # a fresh mask for each projector
                x = F.dropout(x, self.dropout, training=True)
            out.append(layer(x))
        return torch.stack(out)

    def distinct_weights(self) -> list[Tensor]:
        """Per projector, the weight ``[d_m, D]`` of the first layer it owns, which reads the input common to all
        projectors: the output layer with shared hidden layers, the first hidden layer of a separate MLP (the
        weights the Table II orthogonality constraint acts on)."""
        if self.shared_hidden:
            return [out[0].weight for out in self.outputs]
        return [stack[0].weight for stack in self.hidden]

    def extra_repr(self) -> str:
        return f"num_projectors={self.num_projectors}, shared_hidden={self.shared_hidden}, dropout={self.dropout}"


def count_parameters(*modules: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of the modules, each tensor counted once."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad or not trainable_only:
                seen[id(p)] = p.numel()
    return sum(seen.values())

