"""Projection / prediction heads, configured by dimensions and layer classes (writable in YAML)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

NORM_LAYERS: dict[str, type[nn.Module] | None] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}


def norm_layer_by_name(name: str) -> type[nn.Module] | None:
    """``batch`` -> BatchNorm1d, ``layer`` -> LayerNorm, ``none`` -> None (config-friendly names)."""
    if name not in NORM_LAYERS:
        raise ValueError(f"head norm must be one of {sorted(NORM_LAYERS)}, got '{name}'")
    return NORM_LAYERS[name]


def non_affine_norm(norm_layer: type[nn.Module], dim: int) -> nn.Module:
    """A normalisation layer without learnable scale/shift (BatchNorm ``affine``, LayerNorm ``elementwise_affine``)."""
    if issubclass(norm_layer, nn.LayerNorm):
        return norm_layer(dim, elementwise_affine=False)
    return norm_layer(dim, affine=False)


class MLPHead(nn.Sequential):
    """``Linear -> [norm] -> act`` for each hidden width, then ``Linear -> [norm without affine]``.

    Covers the heads of the methods in this project:

    * SimSiam projector: ``MLPHead(2048, [2048, 2048], 2048, last_norm=True)``; predictor:
      ``MLPHead(2048, [512], 2048)`` (Chen & He 2021, §3).
    * MoCo v2 projector: ``MLPHead(2048, [2048], 128, norm_layer=None)`` (2-layer MLP, no BN).
    * MoCo v3 projector: ``MLPHead(d, [4096, 4096], 256, last_norm=True)``; predictor
      ``MLPHead(256, [4096], 256)``.

    Args:
        input_dim: width of the input features.
        hidden_dims: width of each hidden layer (``[]`` makes a single linear layer).
        output_dim: width of the output.
        norm_layer: normalisation after each hidden linear layer, ``None`` for none.
        act_layer: activation after each hidden layer.
        last_norm: add a non-affine ``norm_layer`` after the output layer (SimSiam/MoCo v3 projectors).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.ReLU,
        last_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        dims = [input_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            # A bias before a normalisation layer is redundant.
            layers.append(nn.Linear(d_in, d_out, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(d_out))
            layers.append(act_layer(inplace=True) if act_layer is nn.ReLU else act_layer())
        use_last_norm = last_norm and norm_layer is not None
        layers.append(nn.Linear(dims[-1], output_dim, bias=not use_last_norm))
        if use_last_norm:
            layers.append(non_affine_norm(norm_layer, output_dim))
        super().__init__(*layers)
        self.input_dim = input_dim
        self.output_dim = output_dim

    def forward(self, x: Tensor) -> Tensor:  # [B, input_dim] -> [B, output_dim]
        return super().forward(x)
