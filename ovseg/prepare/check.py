"""``ovseg data check``: verify a data root against the benchmarks of a data config.

For every benchmark of an :class:`~ovseg.datamodules.EvaluationDataModule` config it
lists the samples as the DataModule would, then reads every label (and image) and reports, with
file names: missing folders, split files and class-name files, images without a label (and
labels without an image), unreadable files, label values outside the benchmark's classes, and
labels whose size differs from their image's. A table summarises images, labels and classes per
benchmark; the exit code is non-zero when anything is wrong.

Example::

    ovseg data check --data configs/data/eval_caption8.yaml --root data
    ovseg data check --data configs/data/eval_mask5.yaml --root datasets --benchmarks ade847 pc459
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from ovseg.datamodules.benchmark_specs import BenchmarkSpec
from ovseg.datamodules.benchmarks import LabelDecoder, Sample, find_samples
from ovseg.datamodules.decode import DecodeError, decode_image, decode_label, image_size
from ovseg.inference import InferenceSettings

DATAMODULE = "ovseg.datamodules.EvaluationDataModule"


@dataclass
class BenchmarkReport:
    """What :func:`check_benchmark` found for one benchmark.

    Attributes:
        name: the benchmark.
        data_dir: its folder.
        classes: number of classes of its vocabulary (0 if the class names could not be read).
        samples: image/label pairs listed (after ``max_images``).
        images_ok: images that decode (or whose header reads, with ``decode_images=False``).
        labels_ok: labels that decode and whose values are all valid.
        classes_present: classes with at least one pixel in the valid labels.
        problems: one message per problem, each naming the file or folder.
    """

    name: str
    data_dir: str
    classes: int = 0
    samples: int = 0
    images_ok: int = 0
    labels_ok: int = 0
    classes_present: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sample(
    sample: Sample, decoder: LabelDecoder, decode_images: bool
) -> tuple[bool, bool, np.ndarray | None, list[str]]:
    """(image ok, label ok, classes present, problems) of one sample."""
    problems: list[str] = []
    image_hw = label_hw = None
    image_ok = label_ok = False
    present = None
    try:  # the size decode_image gives (EXIF orientation applied), as the DataModule sees it
        image_hw = tuple(decode_image(sample.image).shape[1:]) if decode_images else image_size(sample.image)
        image_ok = True
    except (DecodeError, OSError) as error:  # DecodeError (= DataError) and FileNotFoundError name the file
        problems.append(str(error))
    try:
        label = decoder(decode_label(sample.label), sample.label)
        label_hw = label.shape
        label_ok = True
        valid = label[label != decoder.ignore_index]
        present = np.unique(valid)
    except (DecodeError, OSError) as error:
        problems.append(str(error))
    if image_hw is not None and label_hw is not None and tuple(image_hw) != tuple(label_hw):
        problems.append(
            f"{sample.label}: label size {label_hw[1]}x{label_hw[0]} differs from image "
            f"{sample.image} size {image_hw[1]}x{image_hw[0]}"
        )
        label_ok = False
    return image_ok, label_ok, present, problems


def check_benchmark(
    spec: BenchmarkSpec,
    root: str | Path | None = None,
    decode_images: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> BenchmarkReport:
    """Check one benchmark's files; never raises on bad data, reports it.

    Args:
        spec: the benchmark.
        root: the DataModule root its ``data_root`` is relative to.
        decode_images: decode every image fully (else read only the image headers, with
            :func:`~ovseg.datamodules.decode.image_size`: faster, but a truncated image goes
            unnoticed).
        workers: threads reading files.
        progress: show a tqdm progress bar.
    """
    spec = spec.resolved()
    report = BenchmarkReport(name=str(spec.name), data_dir=str(spec.data_dir(root)))
    try:  # what validate's setup builds: vocabulary (class count), unseen class names, inference settings
        report.classes = len(spec.benchmark(root).vocabulary)
    except (OSError, ValueError) as error:
        report.problems.append(str(error))
    samples, problems = find_samples(spec, root, strict=False)
    report.problems.extend(problems)
    report.samples = len(samples)
    if not report.classes or not samples:
        return report
    decoder = LabelDecoder(
        report.classes,
        spec.ignore_index,
        spec.reduce_zero_label,  # type: ignore[arg-type]
        spec.label_map,
        report.name,
    )
    seen: set[int] = set()

    def job(sample: Sample) -> tuple[bool, bool, np.ndarray | None, list[str]]:
        return _check_sample(sample, decoder, decode_images)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(job, samples)
        bar = tqdm(
            results,
            total=len(samples),
            desc=f"check {report.name}",
            unit="img",
            disable=None if progress else True,
            dynamic_ncols=True,
            leave=False,
        )
        for image_ok, label_ok, classes, sample_problems in bar:
            report.images_ok += image_ok
            report.labels_ok += label_ok
            if classes is not None and label_ok:
                seen.update(classes.tolist())
            report.problems.extend(sample_problems)
    report.classes_present = len(seen)
    return report


def load_data_config(path: str | Path) -> dict[str, Any]:
    """The ``init_args`` of an EvaluationDataModule data config (a ``--data`` YAML, or an
    experiment YAML with a ``data:`` section).

    Raises:
        ValueError: if the file does not configure an EvaluationDataModule.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} does not exist")
    content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if isinstance(content, dict) and "data" in content and "class_path" not in content:
        content = content["data"]
    class_path = content.get("class_path") if isinstance(content, dict) else None
    if class_path not in (DATAMODULE, "ovseg.datamodules.benchmarks.EvaluationDataModule", "EvaluationDataModule"):
        raise ValueError(f"{path}: expected a data config with class_path: {DATAMODULE}, got {class_path!r}")
    return dict(content.get("init_args") or {})


def spec_from_dict(entry: str | dict[str, Any]) -> BenchmarkSpec:
    """A :class:`BenchmarkSpec` from its YAML form (a preset name or a mapping)."""
    if isinstance(entry, str):
        return BenchmarkSpec(preset=entry)
    if not isinstance(entry, dict):
        raise ValueError(f"a benchmark entry must be a mapping or a preset name, got {entry!r}")
    if "class_path" in entry:  # jsonargparse's explicit dataclass form
        entry = dict(entry.get("init_args") or {})
    known = {f.name for f in fields(BenchmarkSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"unknown benchmark spec keys {unknown} in {entry!r}; known: {sorted(known)}")
    values = dict(entry)
    inference = values.get("inference")
    if isinstance(inference, dict):
        inference = dict(inference.get("init_args", inference)) if "class_path" in inference else inference
        values["inference"] = InferenceSettings(**inference)
    if values.get("label_map") is not None:
        values["label_map"] = {int(k): int(v) for k, v in values["label_map"].items()}
    return BenchmarkSpec(**values)


def format_table(reports: Sequence[BenchmarkReport]) -> Any:
    """A :class:`rich.table.Table` with one row per benchmark."""
    from rich.table import Table

    table = Table(title="ovseg data check")
    for column, justify in (
        ("benchmark", "left"),
        ("classes", "right"),
        ("samples", "right"),
        ("images ok", "right"),
        ("labels ok", "right"),
        ("classes in GT", "right"),
        ("problems", "right"),
        ("data dir", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in reports:
        problems = f"[red]{len(r.problems)}[/red]" if r.problems else "[green]0[/green]"
        table.add_row(
            r.name,
            str(r.classes),
            str(r.samples),
            str(r.images_ok),
            str(r.labels_ok),
            str(r.classes_present),
            problems,
            r.data_dir,
        )
    return table


def run_check(
    config: str | Path,
    root: str | None = None,
    benchmarks: Sequence[str] | None = None,
    max_images: int | None = None,
    decode_images: bool = True,
    workers: int | None = None,
    show: int = 20,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> int:
    """Check every benchmark of a data config; print a table and the problems; 0 if all is well.

    Args:
        config: a data YAML (``class_path: ...EvaluationDataModule``) or an experiment YAML.
        root: overrides the config's ``root``.
        benchmarks: only these benchmark names.
        max_images: check only the first N samples of each benchmark.
        decode_images: decode every image (else read the headers only).
        workers: threads reading files (default: the number of CPUs, at most 8).
        show: problems printed per benchmark (the count is always complete).
        progress: tqdm progress bars.
        print_fn: where the problem lines go.

    Returns:
        1 if any problem was found, else 0.
    """
    from rich.console import Console

    init_args = load_data_config(config)
    root = root if root is not None else init_args.get("root")
    specs = [spec_from_dict(entry) for entry in init_args.get("benchmarks") or []]
    resolved = []
    errors: list[str] = []
    for spec in specs:
        try:
            resolved.append(spec.resolved())
        except ValueError as error:
            errors.append(str(error))
    if errors:
        for error in errors:
            print_fn(f"error: {error}")
        return 1
    if benchmarks:
        names = [s.name for s in resolved]
        unknown = [n for n in benchmarks if n not in names]
        if unknown:
            print_fn(f"error: unknown benchmarks {unknown}; the config has {names}")
            return 1
        resolved = [s for s in resolved if s.name in benchmarks]
    cap = max_images if max_images is not None else init_args.get("max_images")
    if cap is not None:
        resolved = [BenchmarkSpec(**{**s.__dict__, "max_images": min(cap, s.max_images or cap)}) for s in resolved]
    workers = workers or min(8, os.cpu_count() or 1)
    reports = [check_benchmark(spec, root, decode_images, workers, progress) for spec in resolved]
    Console(width=max(120, Console().width)).print(format_table(reports))
    total = 0
    for report in reports:
        total += len(report.problems)
        if report.problems:
            print_fn(f"{report.name}: {len(report.problems)} problem(s)")
            for problem in report.problems[:show]:
                print_fn(f"  {problem}")
            if len(report.problems) > show:
                print_fn(f"  ... and {len(report.problems) - show} more")
    print_fn(
        f"{len(reports)} benchmark(s) checked under root {root!r}: "
        + (f"{total} problem(s) found" if total else "no problems found")
    )
    return 1 if total else 0
