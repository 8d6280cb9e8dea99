"""Thread-count invariant forms of torch operations whose CPU kernels split a sum among threads.

On the CPU, some kernels divide a reduction among the intra-op threads, so the last bits of their
results change with the thread count (``torch.set_num_threads``, ``OMP_NUM_THREADS``); training
amplifies such differences over hundreds of steps into runs as different as two seeds. Found op by
op (``scripts/diagnostics/thread_dependence.py``) on torch 2.14: LayerNorm's weight and bias
gradients, oneDNN's convolutions, softmax's backward along a last dimension of some sizes (196
patches, not 64), and BLAS products with a long inner dimension (on Intel CPUs with AVX-512, Intel
MKL splits the inner dimension of every long matrix product, so Linear and convolution weight
gradients too). This module holds replacements: :class:`ovseg.callbacks.ThreadCountInvariance`
swaps in the LayerNorms, turns oneDNN off (or, with ``onednn_convolutions=True``, swaps in
one-thread convolutions, :class:`OneThreadConv2d`) and asks MKL for strict reproducibility
(:func:`strict_mkl_reproducibility`); the methods call :func:`softmax` where it matters (SimZSS's
concept pooling); CDT's soft IoU sums in float64 instead.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the environment setting that makes MKL's products thread-count invariant from a process's start
MKL_CBWR_STRICT_ENV = "AUTO,STRICT"
# mkl_cbwr.h: the branch to read, the automatic code branch, the strict flag, the success code
_MKL_CBWR_ALL, _MKL_CBWR_AUTO, _MKL_CBWR_STRICT, _MKL_CBWR_SUCCESS = -1, 2, 0x10000, 0


@cache
def _mkl_cbwr_functions() -> tuple[object, object] | None:
    """MKL's (cbwr_set, cbwr_get) in torch's CPU library, or None where torch's BLAS is not MKL."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    except OSError:
        return None
    for prefix in ("mkl_", "mkl_serv_"):  # the public name, or MKL's internal one that torch exports
        if hasattr(library, prefix + "cbwr_set") and hasattr(library, prefix + "cbwr_get"):
            return getattr(library, prefix + "cbwr_set"), getattr(library, prefix + "cbwr_get")
    return None


def strict_mkl_reproducibility() -> bool | None:
    """Put Intel MKL, torch's CPU BLAS, in strict conditional numerical reproducibility mode.

    In that mode MKL's matrix products give the same bits with any number of threads (MKL's
    ``MKL_CBWR=AUTO,STRICT``); without it, on Intel CPUs with AVX-512, MKL splits the inner dimension
    among the threads. MKL fixes its mode at its first call in a process, so this works before any
    matrix product, or when the process started with ``MKL_CBWR=AUTO,STRICT`` in its environment.

    Returns:
        True: MKL is in strict mode (set now or already); False: MKL already ran in another mode
        (start the process with ``MKL_CBWR=AUTO,STRICT``); None: torch's BLAS is not MKL here.
    """
    functions = _mkl_cbwr_functions()
    if functions is None:
        return None
    if mkl_is_strict():
        return True
    return functions[0](_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) == _MKL_CBWR_SUCCESS  # type: ignore[operator]


def mkl_is_strict() -> bool | None:
    """Whether MKL is in strict reproducibility mode (None where torch's BLAS is not MKL)."""
    functions = _mkl_cbwr_functions()
    if functions is None:
        return None
    return bool(functions[1](_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)  # type: ignore[operator]


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``x.softmax(dim)`` from elementary operations: exp(x - max) / sum, whose backward does not
    depend on the thread count (torch's fused softmax backward does, for some sizes)."""
    shifted = (x - x.detach().amax(dim, keepdim=True)).exp()
    return shifted / shifted.sum(dim, keepdim=True)


class ThreadInvariantLayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` whose parameter gradients do not depend on the thread count.

    torch's CPU LayerNorm backward sums the weight and bias gradients over rows that it splits among
    the threads, so their last bits change with the number of threads. Here the rows are normalised
    without the affine part and the affine part is a product and a sum, whose gradients autograd
    reduces the same way for any thread count. Same parameters and state dict; the output equals
    :class:`~torch.nn.LayerNorm`'s up to float rounding (about 1e-7).
    """

    def forward(self, x: Tensor) -> Tensor:  # (..., *normalized_shape) -> same
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class ThreadInvariantLayerNorm2d(ThreadInvariantLayerNorm):
    """:class:`ThreadInvariantLayerNorm` over the channels of (B, C, H, W) maps, as timm's ``LayerNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> same
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


#: LayerNorm classes whose forward is F.layer_norm over the last dimensions in the input's dtype
#: (open_clip's casts back to it, timm's may call its fused kernel), and the thread-invariant class
#: for each; the float32-upcasting ones (open_clip's and timm's LayerNormFp32) are left alone
_THREAD_INVARIANT_FORMS: dict[str, type[nn.LayerNorm]] = {
    "torch.nn.modules.normalization.LayerNorm": ThreadInvariantLayerNorm,
    "open_clip.transformer.LayerNorm": ThreadInvariantLayerNorm,
    "timm.layers.norm.LayerNorm": ThreadInvariantLayerNorm,
    "timm.layers.norm.LayerNorm2d": ThreadInvariantLayerNorm2d,
}


@dataclass
class ModuleSwap:
    """What :func:`make_layer_norms_thread_invariant` or :func:`make_convolutions_thread_invariant`
    changed, and how to undo it.

    Attributes:
        swapped: each changed module with its original class.
        unknown: ``"name (class)"`` of the subclasses left as they were.
    """

    swapped: list[tuple[nn.Module, type[nn.Module]]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def restore(self) -> None:
        """Give every changed module its original class back (outputs as before, to the bit)."""
        for module, original in self.swapped:
            module.__class__ = original
        self.swapped = []


def make_layer_norms_thread_invariant(module: nn.Module) -> ModuleSwap:
    """Turn the LayerNorms of ``module`` into :class:`ThreadInvariantLayerNorm` (or its 2-d form)
    in place: torch's, open_clip's and timm's. LayerNorm subclasses it does not know are left as
    they are (their forward may not be a plain normalisation of the last dimensions) and named in
    the returned :class:`ModuleSwap`, whose ``restore()`` undoes the change."""
    swap = ModuleSwap()
    for name, child in module.named_modules():
        if not isinstance(child, nn.LayerNorm) or isinstance(child, ThreadInvariantLayerNorm):
            continue
        kind = f"{type(child).__module__}.{type(child).__qualname__}"
        if kind in _THREAD_INVARIANT_FORMS:
            swap.swapped.append((child, type(child)))
            child.__class__ = _THREAD_INVARIANT_FORMS[kind]
        else:
            swap.unknown.append(f"{name} ({kind})")
    return swap


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (``torch.set_num_threads``), then restore the
    count; nothing to set when it already is ``threads``."""
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _OneThreadConvolution(torch.autograd.Function):
    """``aten::convolution`` and its backward, each with one intra-op thread (no double backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        # aten's layout options: stride, padding, dilation, transposed, output_padding, groups
        ctx.layout = (stride, padding, dilation, False, [0] * len(stride), groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        with intra_op_threads(1):
            return torch.ops.aten.convolution(x, weight, bias, *ctx.layout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        wanted = [*ctx.needs_input_grad[:2], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        with intra_op_threads(1):
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, ctx.bias_sizes, *ctx.layout, wanted
            )
        return grad_x, grad_weight, grad_bias, None, None, None, None


class OneThreadConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed with one intra-op thread, forward and backward.

    oneDNN's convolution kernels (torch's default on the CPU) split their work among the threads,
    so their results, the weight gradients above all, change in the last bits with the thread
    count. With one thread each, a run computes the same convolutions whatever its thread count,
    at oneDNN's speed (``ThreadCountInvariance(onednn_convolutions=True)``; its default, torch's own
    kernels, made a synthetic ZegFormer step 1.3 times as long with one thread). Same parameters
    and state dict, the same outputs and gradients as :class:`~torch.nn.Conv2d` with one thread,
    to the bit.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # (B, C, H, W)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):  # "same" / "valid" padding as well
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return _OneThreadConvolution.apply(input, weight, bias, self.stride, padding, self.dilation, self.groups)


def make_convolutions_thread_invariant(module: nn.Module) -> ModuleSwap:
    """Turn the :class:`torch.nn.Conv2d` modules of ``module`` into :class:`OneThreadConv2d` in
    place. Subclasses of Conv2d and other convolutions (Conv1d, ConvTranspose2d, ...) are left as
    they are and named in the returned :class:`ModuleSwap`, whose ``restore()`` undoes the change."""
    swap = ModuleSwap()
    for name, child in module.named_modules():
        if type(child) is nn.Conv2d:
            swap.swapped.append((child, nn.Conv2d))
            child.__class__ = OneThreadConv2d
        elif isinstance(child, nn.modules.conv._ConvNd) and not isinstance(child, OneThreadConv2d):
            swap.unknown.append(f"{name} ({type(child).__module__}.{type(child).__qualname__})")
    return swap
