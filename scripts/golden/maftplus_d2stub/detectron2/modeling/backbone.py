from torch import nn


class Backbone(nn.Module):
    """Base class only."""
