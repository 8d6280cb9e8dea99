"""Parameter groups (learning-rate multipliers, freezing, weight-decay exclusions) and schedulers.

Optimizers and schedulers are injected as callables from YAML (LightningCLI), e.g.::

    model:
      init_args:
        optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1e-4, weight_decay: 0.05}}
        lr_scheduler: {class_path: ovseg.optim.WarmupCosineLR, init_args: {warmup: 0.1}}
        lr_multipliers: {image_encoder.: 0.1}
        freeze: [text_encoder.]

Schedulers here take ``total_steps``; left unset, the module fills it with the trainer's
estimated number of optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def longest_prefix(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that ``name`` starts with, or None."""
    matches = [prefix for prefix in prefixes if name.startswith(prefix)]
    return max(matches, key=len) if matches else None


def freeze_by_prefix(module: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name starts with a prefix.

    Returns the frozen names. A prefix that matches nothing raises ``ValueError`` (a typo would
    otherwise silently train what the user meant to freeze).
    """
    prefixes = list(prefixes)
    names = [name for name, _ in module.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(
                f"freeze prefix {prefix!r} matches no parameter; names start with "
                f"{sorted({name.split('.')[0] for name in names})}"
            )
    frozen = []
    for name, parameter in module.named_parameters():
        if longest_prefix(name, prefixes) is not None:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


#: normalisation layers (their subclasses included, e.g. timm's LayerNorm2d) for ``no_decay_on_norms``
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def parameter_groups(
    module: nn.Module,
    lr_multipliers: Mapping[str, float] | None = None,
    no_weight_decay: Iterable[str] = (),
    no_decay_on_1d: bool = True,
    no_decay_on_norms: bool = False,
) -> list[dict]:
    """Trainable parameters grouped by (learning-rate multiplier, weight decay on/off).

    Args:
        lr_multipliers: name prefix -> multiplier of the base learning rate (longest prefix wins).
        no_weight_decay: name substrings whose parameters get weight decay 0.
        no_decay_on_1d: also no weight decay on 1-d and scalar parameters (biases, norms,
            logit scales), as CLIP and SimZSS do.
        no_decay_on_norms: also no weight decay on the parameters of normalisation layers
            (:data:`NORM_LAYERS`), as detectron2's ``WEIGHT_DECAY_NORM: 0``.

    Returns:
        groups with keys ``params``, ``names``, ``lr_multiplier`` and, where decay is off,
        ``weight_decay: 0.0``. Apply the multipliers with :func:`apply_lr_multipliers` after the
        optimizer is built.
    """
    lr_multipliers = dict(lr_multipliers or {})
    unknown = [p for p in lr_multipliers if not any(n.startswith(p) for n, _ in module.named_parameters())]
    if unknown:
        raise ValueError(f"lr_multipliers prefixes {unknown} match no parameter")
    no_weight_decay = tuple(no_weight_decay)
    norm_parameters = (
        {id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
        if no_decay_on_norms
        else set()
    )
    groups: dict[tuple[float, bool], dict] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        prefix = longest_prefix(name, lr_multipliers)
        multiplier = lr_multipliers[prefix] if prefix is not None else 1.0
        decay = not (
            (no_decay_on_1d and parameter.ndim <= 1)
            or id(parameter) in norm_parameters
            or any(key in name for key in no_weight_decay)
        )
        group = groups.setdefault(
            (multiplier, decay),
            {
                "params": [],
                "names": [],
                "lr_multiplier": multiplier,
                **({} if decay else {"weight_decay": 0.0}),
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return list(groups.values())


def apply_lr_multipliers(optimizer: Optimizer, scale: float = 1.0) -> None:
    """Multiply each group's learning rate by ``scale * group['lr_multiplier']``."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale * group.get("lr_multiplier", 1.0)
        if "initial_lr" in group:
            group["initial_lr"] = group["lr"]


class _StepsLR(LambdaLR):
    """A LambdaLR whose factor depends on the fraction of ``total_steps`` done."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, warmup: float = 0.0) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be a fraction in [0, 1) or a number of steps, got {warmup}")
        self.total_steps = total_steps
        self.warmup = warmup
        self._constructed = False
        super().__init__(optimizer, self._factor)
        self._constructed = True

    def step(self, epoch: int | None = None) -> None:
        if self.total_steps is None and self._constructed:
            raise RuntimeError(
                f"{type(self).__name__}.total_steps is not set: pass it, or let OVSegModule fill it from the trainer"
            )
        super().step(epoch)

    def _warmup_steps(self) -> int:
        assert self.total_steps is not None
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.total_steps))

    def _factor(self, step: int) -> float:
        if self.total_steps is None:  # only while constructing, before the module sets it
            return 1.0
        warmup_steps = self._warmup_steps()
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(self.total_steps - warmup_steps, 1)
        return self._decay(min((step - warmup_steps) / span, 1.0))

    def _decay(self, progress: float) -> float:
        return 1.0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state


class WarmupCosineLR(_StepsLR):
    """Linear warm-up (a fraction of the steps, or a number of steps), then cosine decay."""

    def __init__(
        self, optimizer: Optimizer, warmup: float = 0.1, total_steps: int | None = None, min_lr_ratio: float = 0.0
    ) -> None:
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, total_steps, warmup)

    def _decay(self, progress: float) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PolyLR(_StepsLR):
    """detectron2's WarmupPolyLR: factor (1 - progress) ** power after an optional warm-up."""

    def __init__(
        self, optimizer: Optimizer, power: float = 0.9, total_steps: int | None = None, warmup: float = 0.0
    ) -> None:
        self.power = power
        super().__init__(optimizer, total_steps, warmup)

    def _decay(self, progress: float) -> float:
        return (1.0 - progress) ** self.power


def needs_total_steps(scheduler: object) -> bool:
    """True for an ovseg scheduler built without ``total_steps``."""
    return isinstance(scheduler, _StepsLR) and scheduler.total_steps is None


def set_total_steps(scheduler: _StepsLR, total_steps: int) -> None:
    """Fill ``total_steps`` and recompute the current learning rates."""
    scheduler.total_steps = int(total_steps)
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * scheduler._factor(scheduler.last_epoch)
