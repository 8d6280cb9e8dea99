"""``Conv2d`` with optional norm and activation, ``get_norm``, ``ShapeSpec``."""

from dataclasses import dataclass

from torch import nn


@dataclass
class ShapeSpec:
    channels: int = None
    height: int = None
    width: int = None
    stride: int = None


class Conv2d(nn.Conv2d):
    """conv -> ``norm`` (a module, key prefix ``norm.``) -> ``activation``."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def get_norm(norm, out_channels):
    """``"GN"`` -> GroupNorm(32, C); empty -> None."""
    if not norm:
        return None
    if norm == "GN":
        return nn.GroupNorm(32, out_channels)
    raise NotImplementedError(f"norm {norm!r} is not in the stand-in")
