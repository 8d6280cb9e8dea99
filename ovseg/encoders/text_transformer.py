"""A CLIP-style text transformer trained from scratch (SimZSS-style text tower)."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from ovseg.encoders.base import TextEncoder, TextFeatures, load_state_dict_file, load_state_dict_strict


def projection_dim(projection: nn.Module | Tensor | None, width: int) -> int:
    """Output dimension of an open_clip projection (``nn.Linear``, ``(W, D)`` matrix or None)."""
    if projection is None:
        return width
    if isinstance(projection, nn.Linear):
        return projection.out_features
    return int(projection.shape[-1])


def project_tokens(x: Tensor, projection: nn.Module | Tensor | None) -> Tensor:
    """Apply an open_clip text/image projection (``nn.Linear``, ``(W, D)`` matrix or None) to (..., W)."""
    if projection is None:
        return x
    if isinstance(projection, nn.Module):
        return projection(x)
    return x @ projection


def run_clip_text_tower(
    token_ids: Tensor,
    token_embedding: nn.Embedding,
    positional_embedding: Tensor,
    transformer: nn.Module,
    ln_final: nn.Module,
    text_projection: nn.Module | Tensor | None,
    attn_mask: Tensor | None,
    pool_type: str = "argmax",
    eos_id: int | None = None,
) -> TextFeatures:
    """Run an open_clip-style text tower on (B, L) ids, L <= context length.

    Returns per-token features after ``ln_final`` and the projection, (B, L, D), and the pooled
    feature (B, D) at the pooled position (``argmax``: the EOT token, the largest id, as in CLIP),
    computed exactly as ``open_clip``'s ``encode_text`` (pool, then project). The
    causal mask is cropped to L, so shorter sequences give the same features as padded ones.
    """
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be (B, L), got {tuple(token_ids.shape)}")
    length = token_ids.shape[1]
    if length > positional_embedding.shape[0]:
        raise ValueError(f"sequence length {length} exceeds the context length {positional_embedding.shape[0]}")
    get_cast = getattr(transformer, "get_cast_dtype", None)
    cast_dtype = get_cast() if get_cast is not None else positional_embedding.dtype
    x = token_embedding(token_ids).to(cast_dtype) + positional_embedding[:length].to(cast_dtype)
    mask = attn_mask[:length, :length] if attn_mask is not None else None
    x = ln_final(transformer(x, attn_mask=mask))
    # pool, then project (exactly as open_clip's encode_text); the projection is linear, so the
    # pooled feature equals the projected token at the pooled position up to rounding
    pooled = project_tokens(text_global_pool(x, token_ids, pool_type=pool_type, eos_token_id=eos_id), text_projection)
    tokens = project_tokens(x, text_projection)
    return TextFeatures(tokens=tokens, pooled=pooled, token_ids=token_ids)


class CLIPTextTransformer(TextEncoder):
    """CLIP-style causal text transformer with a per-token linear projection.

    Built on ``open_clip.transformer.TextTransformer`` (its blocks, causal mask and init). Every
    token is projected ``width -> output_dim`` by ``text_projection``; the pooled feature is the EOT
    token (the argmax of the ids, as in CLIP). Tokenisation uses the real CLIP BPE
    (``open_clip.tokenizer.SimpleTokenizer``, bundled with open_clip, no network), whose truncation
    keeps EOT as the last token.

    Args:
        width: transformer width.
        layers: number of residual attention blocks.
        heads: attention heads.
        context_length: maximum sequence length (positional embeddings).
        vocab_size: token vocabulary (>= 49408 for the CLIP BPE).
        output_dim: output dimension ``D`` of the projection.
        checkpoint_path: optional local state-dict file of this module, loaded strictly.
    """

    def __init__(
        self,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        context_length: int = 77,
        vocab_size: int = 49408,
        output_dim: int = 768,
        checkpoint_path: str | None = None,
    ) -> None:
        super().__init__()
        self.bpe_tokenizer = SimpleTokenizer(context_length=context_length)
        if vocab_size < self.bpe_tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} < CLIP BPE vocabulary {self.bpe_tokenizer.vocab_size}")
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=output_dim,
            pool_type="argmax",
            proj_type="linear",
            proj_bias=False,
        )
        self.embed_dim: int = output_dim
        self.context_length: int = context_length
        self.width = width
        if checkpoint_path is not None:
            load_state_dict_strict(self, load_state_dict_file(checkpoint_path), checkpoint_path)

    @property
    def sot_token_id(self) -> int:
        return self.bpe_tokenizer.sot_token_id

    @property
    def eot_token_id(self) -> int:
        return self.bpe_tokenizer.eot_token_id

    def tokenize(self, texts: list[str]) -> Tensor:
        """Strings -> (B, context_length) int64 ids: SOT, BPE tokens, EOT, zero padding."""
        if isinstance(texts, str):
            texts = [texts]
        return self.bpe_tokenizer(list(texts), context_length=self.context_length).long()

    def forward(self, token_ids: Tensor) -> TextFeatures:
        """(B, L) ids -> tokens (B, L, output_dim), pooled (B, output_dim) at the EOT (argmax) token."""
        t = self.text
        return run_clip_text_tower(
            token_ids,
            token_embedding=t.token_embedding,
            positional_embedding=t.positional_embedding,
            transformer=t.transformer,
            ln_final=t.ln_final,
            text_projection=t.text_projection,
            attn_mask=t.attn_mask,
            pool_type="argmax",
        )

    @classmethod
    def tiny(cls, **overrides: int | str | None) -> CLIPTextTransformer:
        """A tiny random instance for tests: 2 layers, width 32, 2 heads, output 48."""
        kwargs: dict = {"width": 32, "layers": 2, "heads": 2, "output_dim": 48}
        kwargs.update(overrides)
        return cls(**kwargs)
