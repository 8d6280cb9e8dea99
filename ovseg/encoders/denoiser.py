"""The DVT "generalizable denoiser" (Yang et al., Denoising Vision Transformers, 2024) as a frozen
wrapper around any :class:`~ovseg.encoders.base.ImageEncoder`.

The official SimZSS release (``--denoiser_type transformer``) passes the frozen DINOv2 patch tokens
through one pre-norm transformer block (width D, D/64 heads, MLP ratio 4, LayerNorm eps 1e-6) after
adding a learned positional embedding defined on a 37 x 37 grid and resampled (bicubic, as timm's
``resample_abs_pos_embed``) to the token grid. The global feature ([CLS]) is not denoised.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, Mlp
from torch import Tensor, nn

from ovseg.encoders.base import ImageEncoder, ImageFeatures

#: Keys of a denoiser state dict (the DVT release file's ``"denoiser"`` entry, or a SimZSS
#: checkpoint's ``visual.*`` less ``visual.vit.*``): ``pos_embed`` and ``denoiser.<Block keys>``.
DENOISER_PREFIXES = ("pos_embed", "denoiser.")


class DVTDenoiser(ImageEncoder):
    """A frozen image encoder whose patch tokens go through the DVT denoiser block.

    Args:
        encoder: the wrapped (frozen) image encoder; its normalisation statistics are used.
        checkpoint_path: the DVT release file (``{"denoiser": {"pos_embed", "denoiser.*", ...}}``,
            e.g. ``voc_denoised/vit_base_patch14_reg4_dinov2.lvd142m.pth``) or a plain denoiser
            state dict; ``None`` keeps the random initialisation (tests; a SimZSS checkpoint
            converted with ``ovseg convert simzss`` brings its own denoiser).
        grid_size: side of the positional-embedding grid of the DVT weights (37).
        num_heads: attention heads of the block (``embed_dim // 64`` if ``None``, as the release).
        trust_pickle: read a ``checkpoint_path`` that pickles Python objects (only for files you trust;
            without it such a file is refused with a message, never loaded unsafely).
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        checkpoint_path: str | None = None,
        grid_size: int = 37,
        num_heads: int | None = None,
        trust_pickle: bool = False,
    ) -> None:
        super().__init__(tuple(encoder.mean.flatten().tolist()), tuple(encoder.std.flatten().tolist()))
        dim = int(encoder.embed_dim)
        self.encoder = encoder
        self.embed_dim: int = dim
        self.patch_size: int = int(encoder.patch_size)
        self.model_name = f"dvt_denoiser({getattr(encoder, 'model_name', type(encoder).__name__)})"
        self.denoiser = Block(
            dim=dim,
            num_heads=num_heads or max(1, dim // 64),
            mlp_ratio=4,
            qkv_bias=True,
            qk_norm=False,
            init_values=None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            mlp_layer=Mlp,
        )
        self.pos_embed = nn.Parameter(torch.randn(1, grid_size * grid_size, dim) * 0.02)
        if checkpoint_path is not None:
            self.load_denoiser(checkpoint_path, trust_pickle)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> DVTDenoiser:
        """Always in eval mode (frozen with the backbone)."""
        return super().train(False)

    def load_denoiser(self, path: str, trust_pickle: bool = False) -> None:
        """Load the denoiser weights strictly from a DVT release file or a denoiser state dict."""
        from ovseg.encoders.base import load_state_dict_strict

        load_state_dict_strict(self, {**self.encoder_state(), **read_denoiser_file(path, trust_pickle)}, path)

    def encoder_state(self) -> dict[str, Tensor]:
        """The wrapped encoder's own state, under this module's ``encoder.`` prefix."""
        return {f"encoder.{key}": value for key, value in self.encoder.state_dict().items()}

    def denoise(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, h*w, D) patch tokens on an (h, w) grid -> (B, h*w, D) denoised tokens."""
        pos_embed = resample_abs_pos_embed(self.pos_embed, list(grid), num_prefix_tokens=0)
        return self.denoiser(patches + pos_embed.to(patches.dtype))

    def encode(self, normalized_images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised images -> denoised dense (B, D, h, w) and the encoder's pooled (B, D)."""
        features = self.encoder.encode(normalized_images)
        batch, dim, height, width = features.dense.shape
        patches = self.denoise(features.dense.flatten(2).transpose(1, 2), (height, width))
        dense = patches.transpose(1, 2).reshape(batch, dim, height, width)
        return ImageFeatures(dense=dense, pooled=features.pooled)


def read_denoiser_file(path: str, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The denoiser state dict (``pos_embed``, ``denoiser.*``) of a DVT release file.

    The DVT files nest it under ``"denoiser"``; keys of other parts (a ViT copy) are dropped, and a
    file with neither ``pos_embed`` nor ``denoiser.*`` keys is an error naming the file. The file is
    read with ``weights_only=True`` unless ``trust_pickle``.
    """
    from pathlib import Path

    from ovseg.convert import ConversionError, _read_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"DVT denoiser file not found: {path}")
    state = _read_file(Path(path), trust_pickle)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds no state dict (got {type(state).__name__})")
    if all(isinstance(key, str) and key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    if isinstance(state.get("denoiser"), dict):
        state = state["denoiser"]
    kept = {
        key: value
        for key, value in state.items()
        if isinstance(key, str) and key.startswith(DENOISER_PREFIXES) and isinstance(value, Tensor)
    }
    if "pos_embed" not in kept or not any(key.startswith("denoiser.") for key in kept):
        raise ConversionError(
            f"{path} holds no DVT denoiser weights (expected keys 'pos_embed' and 'denoiser.*', "
            f"got {sorted(state)[:8]}...)"
        )
    return kept
