"""The encoder protocol shared by every method.

An image encoder maps images to dense patch features on a grid plus one global feature; a text
encoder maps token ids to per-token features plus one pooled feature. Methods only talk to these
two interfaces, so any backbone that implements them can be swapped in from YAML.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ovseg.errors import UserError


@dataclass
class ImageFeatures:
    """Output of an :class:`ImageEncoder`.

    Attributes:
        dense: (B, D, h, w) patch features on the encoder's output grid.
        pooled: (B, D) global image feature (e.g. the [CLS] token).
    """

    dense: Tensor
    pooled: Tensor


@dataclass
class TextFeatures:
    """Output of a :class:`TextEncoder`.

    Attributes:
        tokens: (B, L, D) per-token features (after the final norm and projection, if any).
        pooled: (B, D) pooled text feature (e.g. the end-of-text token).
        token_ids: (B, L) the token ids that produced them.
    """

    tokens: Tensor
    pooled: Tensor
    token_ids: Tensor


class ImageEncoder(nn.Module, ABC):
    """Base class of image encoders.

    Subclasses set ``mean``/``std`` (RGB, in [0, 1] units), ``embed_dim`` and ``patch_size`` and
    implement :meth:`encode`. :meth:`forward` takes images in [0, 1] and normalises them with the
    encoder's own statistics, so datasets never need to know which encoder is used.
    """

    embed_dim: int
    patch_size: int

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> normalised with the encoder's mean and std."""
        return (images - self.mean) / self.std

    @abstractmethod
    def encode(self, normalized_images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised images -> :class:`ImageFeatures`."""

    def forward(self, images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) images in [0, 1] -> :class:`ImageFeatures`."""
        return self.encode(self.normalize(images))


class TextEncoder(nn.Module, ABC):
    """Base class of text encoders: ``tokenize`` strings, then ``forward`` token ids."""

    embed_dim: int
    context_length: int

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Tensor:
        """Strings -> (B, context_length) int64 token ids (truncated, padded)."""

    @abstractmethod
    def forward(self, token_ids: Tensor) -> TextFeatures:
        """(B, L) token ids -> :class:`TextFeatures`."""

    def encode_texts(self, texts: list[str]) -> TextFeatures:
        """Tokenise and encode on the encoder's device."""
        device = next(self.parameters()).device
        return self(self.tokenize(texts).to(device))


# --------------------------------------------------------------------------------------------------
# Small checkpoint helpers shared by the encoders.


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a state dict from a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file (on CPU).

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a ``module.``
    prefix that every key carries (DDP) is stripped.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict)`` strictly, with an error naming ``source`` and the keys."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserError(f"could not load checkpoint {source} into {type(module).__name__}: {err}") from err
    if result.missing_keys or result.unexpected_keys:

        def _short(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")

        raise UserError(
            f"checkpoint {source} does not match {type(module).__name__}: "
            f"missing keys [{_short(result.missing_keys)}], "
            f"unexpected keys [{_short(result.unexpected_keys)}]"
        )
