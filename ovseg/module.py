"""``OVSegModule``: the LightningModule every method derives from.

A method implements three hooks:

- :meth:`OVSegModule.encode_text`: texts -> (N, D) embeddings;
- :meth:`OVSegModule.predict_scores`: images in [0, 1] and (Q, D) query embeddings -> per-pixel
  query logits (B, Q, h, w), or :class:`MaskPredictions` (masks with class probabilities) that the
  base turns into per-pixel scores;
- :meth:`OVSegModule.training_loss`: a training batch -> a dict of loss terms with ``"loss"``.

Everything else is shared: evaluation on one or several dataloaders, each with its own
:class:`~ovseg.benchmark.Benchmark` (vocabulary, inference settings, metric convention), prompt
templates and synonyms, the text-embedding cache, whole-image and sliding-window inference,
background by threshold, metrics, logging, and optimizers with per-prefix learning-rate
multipliers and freezing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ovseg.benchmark import Benchmark, check_unique_names
from ovseg.errors import UserError
from ovseg.images import ImageLike, as_image_list
from ovseg.inference import InferenceSettings, infer_scores
from ovseg.metrics import SegmentationMetrics
from ovseg.optim import (
    apply_lr_multipliers,
    freeze_by_prefix,
    needs_total_steps,
    parameter_groups,
    set_total_steps,
)
from ovseg.vocabulary import Prompt, TextEmbeddingCache, Vocabulary, reduce_synonyms

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
SUMMARY_METRICS = (
    "mIoU",
    "pAcc",
    "mAcc",
    "fwIoU",
    "mIoU_seen",
    "mIoU_unseen",
    "hIoU",
    "mIoU_unseen_swapped",
    "zs_margin",
)


@dataclass
class MaskPredictions:
    """Mask proposals with class probabilities, as mask-classification methods produce them.

    Attributes:
        mask_logits: (B, M, h, w) mask logits (sigmoid gives the mask probability).
        class_probs: (B, M, Q) probability of each query name for each mask (no-object removed).
        query_offsets: optional (B, Q) or (Q,) constant added to every pixel's score of a query
            after the sum over masks (e.g. ZegFormer's calibration, -0.1 on seen classes).
    """

    mask_logits: Tensor
    class_probs: Tensor
    query_offsets: Tensor | None = None

    def pixel_scores(self) -> Tensor:
        """(B, Q, h, w): per pixel, sum over masks of class probability x mask probability
        (MaskFormer's semantic inference), plus :attr:`query_offsets`."""
        scores = torch.einsum("bmq,bmhw->bqhw", self.class_probs, self.mask_logits.sigmoid())
        if self.query_offsets is not None:
            offsets = self.query_offsets.to(scores.dtype)
            scores = scores + offsets.view(-1 if offsets.dim() == 2 else 1, scores.shape[1], 1, 1)
        return scores

    def upsampled_before_sigmoid(self, padded_size: tuple[int, int], image_size: tuple[int, int]) -> MaskPredictions:
        """A copy whose mask logits, predicted on a padded input at any stride, are upsampled
        (bilinear) to the ``padded_size`` input and cropped to the top-left ``image_size``, so that
        the sigmoid and the sum over masks happen at input resolution (MaskFormer-family releases;
        the default sums at the prediction stride and upsamples the scores).

        Args:
            padded_size: (H_p, W_p) of the padded input the masks were predicted on.
            image_size: (H, W) of the image inside it (top-left).
        """
        masks = F.interpolate(self.mask_logits, size=padded_size, mode="bilinear", align_corners=False)
        return MaskPredictions(masks[..., : image_size[0], : image_size[1]], self.class_probs, self.query_offsets)

    def float(self) -> MaskPredictions:
        """A float32 copy (after autocast)."""
        offsets = None if self.query_offsets is None else self.query_offsets.float()
        return MaskPredictions(self.mask_logits.float(), self.class_probs.float(), offsets)


@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        labels: (H, W) int64 class indices (background by threshold applied).
        confidence: (H, W) float32 probability of the most probable class at each pixel.
        probabilities: (K, H, W) float32 class probabilities, when asked for.
    """

    labels: Tensor
    confidence: Tensor
    probabilities: Tensor | None = None

    def class_statistics(self, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per class: (K,) int64 pixel count, and (K,) float32 mean :attr:`confidence` over the
        class's pixels (NaN where the class is absent); on the CPU."""
        labels = self.labels.flatten()
        count = torch.bincount(labels, minlength=num_classes)
        total = torch.bincount(labels, weights=self.confidence.flatten().double(), minlength=num_classes)
        return count.cpu(), (total / count).float().cpu()  # 0/0 = NaN for absent classes


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] or float images in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
    return images.float()


class OVSegModule(L.LightningModule, ABC):
    """Shared Lightning glue of every open-vocabulary segmentation method.

    Args:
        optimizer: optimizer callable (from YAML: ``class_path`` + ``init_args``).
        lr_scheduler: scheduler callable; ovseg schedulers without ``total_steps`` get the
            trainer's estimated number of optimizer steps.
        lr_multipliers: parameter-name prefix -> learning-rate multiplier (longest prefix wins).
        freeze: parameter-name prefixes to freeze before the optimizer is built.
        no_weight_decay: parameter-name substrings without weight decay.
        no_decay_on_1d: no weight decay on biases, norms and scalars.
        no_decay_on_norms: no weight decay on the parameters of normalisation layers (LayerNorm,
            GroupNorm, BatchNorm, ...), as detectron2's ``WEIGHT_DECAY_NORM: 0``; with
            ``no_decay_on_1d: false`` this leaves biases decayed (Mask2Former-family releases).
        lr_reference_batch: if set, the learning rate is multiplied by
            (global batch size / lr_reference_batch), e.g. 256 for CLIP-style linear scaling.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        text_batch_size: texts per forward pass when a vocabulary is encoded.
        print_metrics: print a metrics table after each validation/test epoch.
        inference_precision: ``"32"``, ``"bf16"`` or ``"16"``: autocast around
            :meth:`predict_scores` at inference (scores are returned in float32).
        compile: run :meth:`predict_scores` through ``torch.compile`` at inference (off by
            default; worth it on GPUs for long evaluations).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_multipliers: dict[str, float] | None = None,
        freeze: list[str] | None = None,
        no_weight_decay: list[str] | None = None,
        no_decay_on_1d: bool = True,
        no_decay_on_norms: bool = False,
        lr_reference_batch: int | None = None,
        scheduler_interval: str = "step",
        text_batch_size: int = 1024,
        print_metrics: bool = True,
        inference_precision: str = "32",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_multipliers = dict(lr_multipliers or {})
        self.freeze = list(freeze or [])
        self.no_weight_decay = list(no_weight_decay or [])
        self.no_decay_on_1d = no_decay_on_1d
        self.no_decay_on_norms = no_decay_on_norms
        self.lr_reference_batch = lr_reference_batch
        self.scheduler_interval = scheduler_interval
        self.text_batch_size = text_batch_size
        self.print_metrics = print_metrics
        if inference_precision not in AUTOCAST_DTYPES:
            raise ValueError(
                f"inference_precision must be one of {sorted(AUTOCAST_DTYPES)}, got {inference_precision!r}"
            )
        self.inference_precision = inference_precision
        self.compile_inference = compile
        self._compiled_predict_scores: Any = None
        if _given_hyperparameters.get() is not None:
            # Built by LightningCLI: store its configuration so that
            # `Method.load_from_checkpoint(path)` rebuilds the model without the YAML.
            self.save_hyperparameters()
        self.text_cache = TextEmbeddingCache()
        self._metrics: dict[str, SegmentationMetrics] = {}
        self.last_results: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ method hooks
    @abstractmethod
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) embeddings in the space :meth:`predict_scores` compares with."""

    @abstractmethod
    def predict_scores(
        self, images: Tensor, text_embeddings: Tensor, vocabulary: Vocabulary | None = None
    ) -> Tensor | MaskPredictions:
        """Per-pixel query scores of a batch.

        Args:
            images: (B, 3, H, W) float in [0, 1]; the method normalises them itself.
            text_embeddings: (Q, D) L2-normalised query embeddings (one per class name).
            vocabulary: the vocabulary the Q queries come from (``vocabulary.queries``, synonyms
                as separate queries), for methods whose scoring depends on which classes were
                trained on (ZegFormer's seen/unseen fusion); None when called outside
                :meth:`class_probabilities`.

        Returns:
            (B, Q, h, w) logits whose softmax over Q is the class probability (at any
            resolution; the base upsamples), or :class:`MaskPredictions`. Permuting the names
            among the unseen classes must permute the scores the same way (the zero-shot margin,
            ``Benchmark.name_swap_control``, reads renamings off the confusion matrix); every
            method here does (``tests/test_name_swap.py``).
        """

    @abstractmethod
    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Loss terms of a training batch; ``"loss"`` is the one optimised."""

    # ------------------------------------------------------------------ text embeddings
    def encode_prompts(self, prompts: list[Prompt]) -> Tensor:
        """Class names in templates -> (N, D) embeddings; by default :meth:`encode_text` of the
        formatted texts. Override when the embedding depends on where the name sits in the prompt."""
        return self.encode_text([prompt.text for prompt in prompts])

    def text_embeddings(self, vocabulary: Vocabulary) -> Tensor:
        """(Q, D) query embeddings of ``vocabulary``, from the cache when the encoder is unchanged."""
        was_training = self.training
        self.eval()
        try:
            return self.text_cache.get(vocabulary, self.encode_prompts, self.device, self.text_batch_size)
        finally:
            self.train(was_training)

    #: whether training changes the text embeddings (then the cache is dropped after every step);
    #: methods with a frozen text encoder set it to False and keep their embeddings.
    text_encoder_trained: bool = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.text_encoder_trained:
            self.text_cache.invalidate()

    # ------------------------------------------------------------------ checkpoints
    #: checkpoint key holding the class path of the method that saved it
    CHECKPOINT_METHOD_KEY = "ovseg_method"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which method saved the checkpoint (checked when it is loaded)."""
        checkpoint[self.CHECKPOINT_METHOD_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method (clear message instead of a state-dict error).

        Runs before Lightning loads the weights, under ``fit/validate/test/predict --ckpt_path``
        and ``load_from_checkpoint``. Checkpoints without ``ovseg_method`` (older or foreign ones)
        are checked by their state-dict keys in :meth:`load_state_dict`.
        """
        self.text_cache.invalidate()
        self.check_checkpoint_method(checkpoint, type(self), self._checkpoint_source())
        self._loading_method = self.checkpoint_method(checkpoint)
        self._checkpoint_position = (checkpoint.get("epoch"), checkpoint.get("global_step"))

    @classmethod
    def checkpoint_method(cls, checkpoint: Mapping[str, Any]) -> str | None:
        """Class path of the method that saved ``checkpoint``: ovseg's own record, else the
        ``_class_path`` LightningCLI keeps in the hyper-parameters; None if neither is there."""
        method = checkpoint.get(cls.CHECKPOINT_METHOD_KEY)
        if method is None:
            hparams = checkpoint.get("hyper_parameters")
            method = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
        return None if method is None else str(method)

    @staticmethod
    def check_checkpoint_method(
        checkpoint: Mapping[str, Any], method: type, source: str | None = None, configured: str | None = None
    ) -> None:
        """Raise :class:`~ovseg.errors.UserError` naming both methods if ``checkpoint`` was saved by a method that is
        neither ``method`` nor a subclass or base class of it (class paths are compared after
        import, so ``ovseg.methods.simzss.SimZSS`` and its defining module's path are the same).
        ``configured`` is how the configuration names ``method`` (default: its class path)."""
        from jsonargparse.typing import import_object

        stored = OVSegModule.checkpoint_method(checkpoint)
        configured = configured or f"{method.__module__}.{method.__qualname__}"
        if stored is None or stored == configured:
            return
        try:
            stored_class = import_object(stored)
        except (ImportError, AttributeError, ValueError):  # a method that no longer exists
            stored_class = None
        if isinstance(stored_class, type) and (issubclass(method, stored_class) or issubclass(stored_class, method)):
            return
        raise UserError(
            f"{source or 'the checkpoint'} was saved by the method {stored}, but the model configured "
            f"is {configured}: evaluate or resume it with its own method's config "
            f"(model.class_path: {stored}), or give a checkpoint of {method.__name__}"
        )

    # Hugging Face Hub (ovseg.hub): safetensors weights + config.json + model card
    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> OVSegModule:
        """The model :meth:`save_pretrained` wrote to a folder or Hub repo (see :func:`ovseg.hub.from_pretrained`)."""
        from ovseg import hub

        return hub.from_pretrained(cls, name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        """Weights, configuration and model card to a folder (see :func:`ovseg.hub.save_pretrained`)."""
        from ovseg import hub

        return hub.save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """:meth:`save_pretrained` and upload to the Hub repo ``repo_id`` (see :func:`ovseg.hub.push_to_hub`)."""
        from ovseg import hub

        return hub.push_to_hub(self, repo_id, **kwargs)

    def _checkpoint_source(self) -> str | None:
        """'checkpoint PATH' when the trainer is restoring one, for error messages."""
        connector = getattr(self._trainer, "_checkpoint_connector", None)
        path = getattr(connector, "_ckpt_path", None)
        return None if path is None else f"checkpoint {path}"

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self.text_cache.invalidate()
        method, self._loading_method = getattr(self, "_loading_method", None), None
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            message = self._state_dict_mismatch(state_dict, strict, method)
            if message is None:
                raise
            raise UserError(message) from error

    def _state_dict_mismatch(
        self, state_dict: Mapping[str, Any], strict: bool, method: str | None, shown: int = 4
    ) -> str | None:
        """A short account of missing / unexpected / reshaped tensors (None if there are none)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict] if strict else []
        unexpected = [k for k in state_dict if k not in own] if strict else []
        reshaped = [
            f"{k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} here"
            for k, v in own.items()
            if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
        ]
        if not (missing or unexpected or reshaped):
            return None

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(own)} tensors are missing ({some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors of the checkpoint are unknown to the model ({some(unexpected)})")
        if reshaped:
            parts.append(f"{len(reshaped)} have another shape ({some(reshaped)})")
        origin = (
            f"saved by {method}, another configuration of it?"
            if method is not None
            else "a checkpoint of another method or another configuration?"
        )
        source = self._checkpoint_source() or "the state dict"
        return f"{source} does not fit {type(self).__name__} ({origin}): " + "; ".join(parts)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def class_probabilities(
        self,
        images: Tensor,
        vocabulary: Vocabulary,
        settings: InferenceSettings | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """(B, K, H_out, W_out) class probabilities of equal-size images (max over synonyms).

        Args:
            images: (B, 3, H, W) uint8 or float in [0, 1].
            vocabulary: the classes to segment.
            settings: resize / sliding-window settings (default: whole image, native size).
            output_size: (H_out, W_out), default the input size.
        """
        embeddings = self.text_embeddings(vocabulary)
        kinds: set[str] = set()
        predict_scores = self.inference_predict_scores()
        dtype = AUTOCAST_DTYPES[self.inference_precision]

        def score_fn(batch: Tensor) -> Tensor:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                output = predict_scores(batch, embeddings, vocabulary=vocabulary)
            if isinstance(output, MaskPredictions):
                kinds.add("probs")
                return output.float().pixel_scores()
            kinds.add("logits")
            return output.float()

        scores = infer_scores(to_unit_float(images), score_fn, settings or InferenceSettings(), output_size).float()
        probs = scores.softmax(1) if kinds == {"logits"} else scores
        return reduce_synonyms(probs, vocabulary.query_to_class, len(vocabulary))

    def inference_predict_scores(self) -> Any:
        """:meth:`predict_scores`, compiled once with ``torch.compile`` if ``compile`` is on."""
        if not self.compile_inference:
            return self.predict_scores
        if self._compiled_predict_scores is None:
            self._compiled_predict_scores = torch.compile(self.predict_scores)
        return self._compiled_predict_scores

    @staticmethod
    def labels_from_probabilities(probs: Tensor, vocabulary: Vocabulary) -> Tensor:
        """(B, K, H, W) probabilities -> (B, H, W) int64 labels, background by threshold."""
        best, labels = probs.max(1)
        if vocabulary.background_threshold is not None:
            labels = torch.where(best < vocabulary.background_threshold, torch.zeros_like(labels), labels)
        return labels

    @torch.no_grad()
    def segment(
        self,
        images: ImageLike | Sequence[ImageLike],
        vocabulary: Vocabulary | Sequence[str],
        settings: InferenceSettings | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Tensor]:
        """Label maps for images of any sizes.

        Args:
            images: one image or a list of them, each a file path, a PIL image, an (H, W, 3)
                uint8 numpy array, or a (3, H, W) tensor (uint8, or float in [0, 1]); or a
                (B, 3, H, W) tensor. Anything ambiguous (a float array, a float tensor outside
                [0, 1], a channels-last tensor) is refused with a message (:mod:`ovseg.images`).
            vocabulary: a :class:`Vocabulary` or a list of class names.
            settings: resize / sliding-window settings.
            output_sizes: per image, the size of the returned map (default: the image size).

        Returns:
            one (H_i, W_i) int64 map per image, values = class indices of ``vocabulary``.

        Example::

            labels = model.segment("photo.jpg", ["sky", "grass", "a red ball"])[0]
        """
        return [result.labels for result in self.segment_detailed(images, vocabulary, settings, output_sizes)]

    @torch.no_grad()
    def segment_detailed(
        self,
        images: ImageLike | Sequence[ImageLike],
        vocabulary: Vocabulary | Sequence[str],
        settings: InferenceSettings | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        keep_probabilities: bool = False,
    ) -> list[Segmentation]:
        """As :meth:`segment`, with each pixel's confidence (and, if asked, every class probability)."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_names(list(vocabulary))
        return self.segment_tensors(as_image_list(images), vocabulary, settings, output_sizes, keep_probabilities)

    def segment_tensors(
        self,
        images: Tensor | Sequence[Tensor],
        vocabulary: Vocabulary,
        settings: InferenceSettings | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        keep_probabilities: bool = False,
    ) -> list[Segmentation]:
        """:meth:`segment_detailed` of (B, 3, H, W) or a list of (3, H_i, W_i) uint8 / [0, 1] float
        tensors, unchecked (evaluation and prediction batches from DataModules)."""
        images = list(images) if not isinstance(images, Tensor) or images.dim() == 4 else [images]
        sizes = list(output_sizes) if output_sizes is not None else [tuple(i.shape[-2:]) for i in images]
        results: list[Segmentation | None] = [None] * len(images)
        # Images of the same size and output size run as one batch.
        groups: dict[tuple, list[int]] = {}
        for index, (image, size) in enumerate(zip(images, sizes)):
            groups.setdefault((tuple(image.shape), tuple(size)), []).append(index)
        for (_, size), indices in groups.items():
            batch = torch.stack([images[i] for i in indices]).to(self.device)
            probs = self.class_probabilities(batch, vocabulary, settings, size)
            labels = self.labels_from_probabilities(probs, vocabulary)
            confidence = probs.amax(1)
            for j, i in enumerate(indices):
                results[i] = Segmentation(labels[j], confidence[j], probs[j] if keep_probabilities else None)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ evaluation
    def benchmarks(self) -> list[Benchmark]:
        """The evaluation sets of the attached DataModule, one per dataloader."""
        datamodule = getattr(self.trainer, "datamodule", None)
        benchmarks = getattr(datamodule, "benchmarks", None)
        if benchmarks is None:
            raise RuntimeError(
                "evaluation needs a DataModule with a `benchmarks` list (one Benchmark per "
                f"evaluation dataloader); got {type(datamodule).__name__}"
            )
        check_unique_names(benchmarks)
        return list(benchmarks)

    def _reset_metrics(self) -> None:
        def metrics(benchmark: Benchmark) -> SegmentationMetrics:
            return SegmentationMetrics(
                num_classes=len(benchmark.vocabulary),
                ignore_index=benchmark.ignore_index,
                absent_policy=benchmark.absent_policy,
                unseen_classes=benchmark.unseen_indices,
                name_swap_control=benchmark.name_swap_control,
            ).to(self.device)

        self._metrics = {benchmark.name: metrics(benchmark) for benchmark in self.benchmarks()}

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def _evaluate_batch(self, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        benchmark = self.benchmarks()[dataloader_idx]
        labels = list(batch["label"])
        predictions = self.segment_tensors(
            batch["image"], benchmark.vocabulary, benchmark.inference, [tuple(label.shape[-2:]) for label in labels]
        )
        metric = self._metrics[benchmark.name]
        for prediction, label in zip(predictions, labels):
            metric.update(prediction.labels, label.to(prediction.labels.device))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_batch(batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_batch(batch, dataloader_idx)

    def _log_metrics(self, stage: str) -> None:
        self.last_results = {name: metric.compute() for name, metric in self._metrics.items()}
        summary: dict[str, float] = {}
        for name, results in self.last_results.items():
            for key in SUMMARY_METRICS:
                if key in results:
                    summary[f"{stage}/{name}/{key}"] = float(results[key])
        if self.last_results:
            summary[f"{stage}/mIoU"] = sum(float(r["mIoU"]) for r in self.last_results.values()) / len(
                self.last_results
            )
        self.log_dict(summary, add_dataloader_idx=False, sync_dist=False)
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if self.print_metrics and not sanity:
            self._print_table(stage)

    @rank_zero_only
    def _print_table(self, stage: str) -> None:
        from rich.console import Console
        from rich.table import Table

        columns = [key for key in SUMMARY_METRICS if any(key in r for r in self.last_results.values())]
        epoch, step = self.current_epoch, self.global_step
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        position = getattr(self, "_checkpoint_position", None)
        if not fitting and position is not None and None not in position:  # validate/test --ckpt_path
            epoch, step = position  # the trainer's counters start at 0 outside fit
        title = f"{stage} metrics (%), epoch {epoch}, step {step}"
        table = Table(title=title)
        table.add_column("benchmark")
        for key in columns:
            table.add_column(key, justify="right")
        for name, results in self.last_results.items():
            table.add_row(name, *[f"{float(results[key]):.2f}" if key in results else "-" for key in columns])
        Console().print(table)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    #: set by :class:`ovseg.writer.PredictionWriter` when it saves raw scores: ``predict_step`` then
    #: returns every class probability too
    predict_probabilities: bool = False

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Label maps of a batch, with per-image class statistics.

        Returns a dict of per-image lists: ``prediction`` (H, W) int64 labels; ``pixels`` (K,)
        int64 pixel count per class; ``confidence`` (K,) float32 mean probability of the winning
        class over each class's pixels (NaN where absent); ``probabilities`` (K, H, W) float16 when
        :attr:`predict_probabilities` is set, else None; and the batch's ``index`` / ``name`` /
        ``path`` when the dataset gives them.
        """
        benchmark = self.benchmarks()[dataloader_idx]
        results = self.segment_tensors(
            batch["image"], benchmark.vocabulary, benchmark.inference, keep_probabilities=self.predict_probabilities
        )
        pixels, confidence = zip(*[result.class_statistics(len(benchmark.vocabulary)) for result in results])
        return {
            "prediction": [r.labels.cpu() for r in results],
            "pixels": list(pixels),
            "confidence": list(confidence),
            "probabilities": [None if r.probabilities is None else r.probabilities.half().cpu() for r in results],
            "index": batch.get("index"),
            "name": batch.get("name"),
            "path": batch.get("path"),
        }

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        terms = self.training_loss(batch)
        if "loss" not in terms:
            raise KeyError(f"{type(self).__name__}.training_loss must return a 'loss' term, got {list(terms)}")
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()):
            values = {key: float(value.detach()) for key, value in terms.items()}
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {values}")
        batch_size = len(batch["image"]) if "image" in batch else None
        self.log_dict(
            {f"train/{key}": value.detach() for key, value in terms.items()}, prog_bar=False, batch_size=batch_size
        )
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def setup(self, stage: str) -> None:
        """Freeze by prefix; check the DataModule's benchmarks early, before any training."""
        if self.freeze:
            freeze_by_prefix(self, self.freeze)
        benchmarks = getattr(getattr(self._trainer, "datamodule", None), "benchmarks", None)
        if benchmarks is not None:
            check_unique_names(benchmarks)
        elif stage in ("validate", "test", "predict"):
            self.benchmarks()  # raises with a clear message

    def _lr_scale(self) -> float:
        """Linear learning-rate scaling by the global batch size, if ``lr_reference_batch`` is set."""
        if self.lr_reference_batch is None:
            return 1.0
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise RuntimeError("lr_reference_batch needs a DataModule with a `batch_size` attribute")
        world = self.trainer.world_size * self.trainer.accumulate_grad_batches
        return batch_size * world / self.lr_reference_batch

    def configure_optimizers(self) -> Any:
        groups = parameter_groups(
            self, self.lr_multipliers, self.no_weight_decay, self.no_decay_on_1d, self.no_decay_on_norms
        )
        optimizer = self.optimizer(groups)
        apply_lr_multipliers(optimizer, self._lr_scale())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if needs_total_steps(scheduler):
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise RuntimeError(
                    "the scheduler needs total_steps, and the trainer cannot estimate "
                    "them: set trainer.max_steps or the scheduler's total_steps"
                )
            set_total_steps(scheduler, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
