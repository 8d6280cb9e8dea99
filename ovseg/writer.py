"""``PredictionWriter``: what ``ovseg predict`` leaves on disk.

In ``output_dir`` (a sub-folder per benchmark when the DataModule has several dataloaders):

- ``labels/NAME.png``: the label map, pixel value = class index into the vocabulary (a palette
  PNG coloured like the overlays; 16-bit grayscale beyond 256 classes);
- ``overlays/NAME.png``: the image tinted by class colour, with a legend of the classes present;
- ``scores/NAME.npy`` (``scores: true``): (K, H, W) float16 class probabilities;
- ``predictions.jsonl``: one JSON line per image, in dataset order: ``name``, ``path`` (if the
  dataset gives one), ``index``, ``height``, ``width``, the files written, and ``classes``: the
  classes present, most frequent first, each with ``index``, ``name``, ``fraction`` (share of the
  pixels) and ``confidence`` (mean probability of the winning class over its pixels);
- ``vocabulary.json``: class names (synonyms, templates, background threshold) and the palette.

Under DDP each rank writes the images of its own shard (the unpadded evaluation sampler gives
disjoint shards, so each image is written once) and its own ``predictions.rank{R}.jsonl``; at the
end of the epoch rank 0 merges them into ``predictions.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from ovseg.benchmark import Benchmark
from ovseg.visualize import overlay, palette, save_label_png


class PredictionWriter(BasePredictionWriter):
    """Writes label PNGs, overlays, per-image JSON lines (and optionally raw scores) during predict.

    Args:
        output_dir: where to write (default: ``<trainer.default_root_dir>/predictions``).
        overlays: write the colour overlays with legend.
        scores: write (K, H, W) float16 class probabilities as ``.npy``.
        alpha: weight of the class colours in the overlays.
    """

    def __init__(
        self, output_dir: str | None = None, overlays: bool = True, scores: bool = False, alpha: float = 0.5
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = output_dir
        self.overlays = overlays
        self.scores = scores
        self.alpha = alpha
        self.root: Path | None = None
        self._benchmarks: list[Benchmark] = []
        self._colours: list[np.ndarray] = []
        self._files: dict[int, IO[str]] = {}
        self.written = 0

    # ------------------------------------------------------------------ layout
    def folder(self, dataloader_idx: int) -> Path:
        """Output folder of a dataloader's predictions."""
        assert self.root is not None
        if len(self._benchmarks) <= 1:
            return self.root
        return self.root / self._benchmarks[dataloader_idx].name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":
            pl_module.predict_probabilities = self.scores  # type: ignore[assignment]

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.root = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        self._benchmarks = list(pl_module.benchmarks())  # type: ignore[operator]
        self._colours = [
            palette(len(b.vocabulary), b.vocabulary.background_threshold is not None) for b in self._benchmarks
        ]
        self.written = 0
        for index, benchmark in enumerate(self._benchmarks):
            folder = self.folder(index)
            folder.mkdir(parents=True, exist_ok=True)
            if trainer.is_global_zero:
                self._write_vocabulary(folder / "vocabulary.json", benchmark, self._colours[index])
            # kept open across batches, closed in on_predict_epoch_end
            self._files[index] = open(
                folder / f"predictions.rank{trainer.global_rank}.jsonl",
                "w",  # noqa: SIM115
                encoding="utf-8",
            )

    @staticmethod
    def _write_vocabulary(path: Path, benchmark: Benchmark, colours: np.ndarray) -> None:
        vocabulary = benchmark.vocabulary
        info = {
            "names": list(vocabulary.display_names),
            "synonyms": [list(c) for c in vocabulary.classes],
            "templates": list(vocabulary.templates),
            "background_threshold": vocabulary.background_threshold,
            "palette": colours.tolist(),
            "label_png": "palette (P) PNG, value = class index"
            if len(colours) <= 256
            else "16-bit grayscale PNG, value = class index",
        }
        path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ per batch
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels = prediction["prediction"]
        indices = _per_image(prediction.get("index"), len(labels)) or list(batch_indices or [])
        names = _per_image(prediction.get("name"), len(labels))
        paths = _per_image(prediction.get("path"), len(labels))
        images = batch["image"] if self.overlays else None
        folder = self.folder(dataloader_idx)
        vocabulary = self._benchmarks[dataloader_idx].vocabulary
        colours = self._colours[dataloader_idx]
        for i, label in enumerate(labels):
            index = int(indices[i]) if i < len(indices) else None
            name = str(names[i]) if names else f"{index if index is not None else self.written:06d}"
            record: dict[str, Any] = {"name": name}
            if paths:
                record["path"] = str(paths[i])
            record.update(index=index, height=int(label.shape[0]), width=int(label.shape[1]))
            save_label_png(label, colours, folder / "labels" / f"{name}.png")
            record["label"] = f"labels/{name}.png"
            pixels = prediction["pixels"][i].numpy()
            fractions = pixels / max(int(pixels.sum()), 1)
            confidence = prediction["confidence"][i].numpy()
            if images is not None:
                target = folder / "overlays" / f"{name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                overlay(images[i], label, vocabulary.display_names, colours, self.alpha, fractions).save(target)
                record["overlay"] = f"overlays/{name}.png"
            probabilities = prediction.get("probabilities")
            if self.scores and probabilities is not None and probabilities[i] is not None:
                target = folder / "scores" / f"{name}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, probabilities[i].numpy())
                record["scores"] = f"scores/{name}.npy"
            present = [int(k) for k in np.argsort(-fractions, kind="stable") if pixels[k] > 0]
            record["classes"] = [
                {
                    "index": k,
                    "name": vocabulary.display_names[k],
                    "fraction": round(float(fractions[k]), 6),
                    "confidence": round(float(confidence[k]), 6),
                }
                for k in present
            ]
            self._files[dataloader_idx].write(json.dumps(record) + "\n")
            self.written += 1

    # ------------------------------------------------------------------ end
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        trainer.strategy.barrier("ovseg_prediction_writer")
        if not trainer.is_global_zero:
            return
        total = sum(merge_rank_files(self.folder(index)) for index in range(len(self._benchmarks)))
        rank_zero_info(f"ovseg: predictions of {total} images written to {self.root}")


def merge_rank_files(folder: Path) -> int:
    """Merge ``predictions.rank*.jsonl`` of ``folder`` into ``predictions.jsonl`` in dataset order
    (by ``index``), delete them, and return the number of lines."""
    parts = sorted(folder.glob("predictions.rank*.jsonl"))
    records = [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines() if line]
    records.sort(key=lambda r: (r.get("index") is None, r.get("index") or 0, r["name"]))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for part in parts:
        part.unlink()
    return len(records)


def _per_image(values: Any, count: int) -> list:
    """A batch's per-image values (a tensor or a list) as a list, or [] if absent."""
    if values is None:
        return []
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return values if len(values) == count else []
