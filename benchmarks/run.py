"""Throughput measurements, printed as Markdown tables with the machine they ran on.

    make bench                      # or: python benchmarks/run.py [--quick] [--real-size]
    make bench BENCH_ARGS=--real-size

One table per method, for its tiny config (the synthetic demo; SimZSS: ``configs/experiment/smoke.yaml``)
and, with ``--real-size`` (the default on a GPU), its real-size config built with random weights
(nothing is downloaded): training samples/second, inference images/second (whole image, batched
sliding window and the window-by-window loop kept here only as the baseline), and the peak memory
of a training step and of each inference mode (above the model: resident set on the CPU, allocator
peak on a GPU). The SimZSS table adds concept extraction captions/second, SimZSS training
samples/second and epoch time from images (the frozen ViT-S/14 forward at 224 px each step)
against the same training from a frozen-feature store, and the peak resident memory of a cached
training epoch for two store sizes (each in a fresh subprocess). A last table gives the
images/second of each DataModule reading the synthetic world written in its real format. The same
command runs on a GPU when one is present.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ovseg.concepts import ConceptExtractor
from ovseg.convert import build_model_from_section
from ovseg.datamodules.synthetic import CATEGORIES, SyntheticWorld
from ovseg.datamodules.synthetic.datamodule import SyntheticDataModule
from ovseg.inference import InferenceSettings, infer_scores, window_starts
from ovseg.mask_classification import MaskClassificationModule
from ovseg.methods.simzss import SimZSS
from ovseg.module import MaskPredictions, OVSegModule
from ovseg.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming the hardware and software the figures come from."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = (
            [
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ]
            if cpuinfo.exists()
            else []
        )
        device = names[0] if names else platform.processor() or "CPU"
    return (
        f"{device}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Seconds per call (after warm-up), synchronising the GPU if there is one."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def timed_pair(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds per call of two functions timed alternately (after one warm-up call each)."""
    import statistics

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(first), once(second)
    times = [(once(first), once(second)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _status_kib(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(key))


def memory_kind() -> str:
    """What :func:`peak_memory` measures on this machine."""
    return "CUDA memory" if torch.cuda.is_available() else "RSS"


def peak_memory(fn: Callable[[], object]) -> float | None:
    """Peak memory of one call of ``fn`` above what was in use before it, in MiB: the CUDA
    allocator's peak on a GPU; on the CPU the peak resident set (VmHWM, reset through
    /proc/self/clear_refs after returning freed heap to the system). None if it cannot be read."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = _status_kib("VmRSS")
    except (OSError, AttributeError, StopIteration):
        return None
    fn()
    return (_status_kib("VmHWM") - start) / 1024


#: Per method: its tiny config (trained in minutes on a CPU) and its real-size config.
METHOD_CONFIGS: dict[str, tuple[str, str]] = {
    "SimZSS": ("configs/experiment/smoke.yaml", "configs/simzss/coco_vitb14.yaml"),
    "ZegFormer": ("configs/zegformer/synthetic.yaml", "configs/zegformer/coco_stuff_156_r101.yaml"),
    "CDT": ("configs/cdt/synthetic.yaml", "configs/cdt/coco_stuff_convnext_l.yaml"),
}

#: Sizes of the measurements: (training image px, training batch, inference image px, window px;
#: None: no sliding-window rows). Real-size models run whole images only: on a CPU, ZegFormer's
#: 100 CLIP crops per window would take minutes per sliding-window image.
TINY_SIZES: tuple[int, int, int, int | None] = (112, 8, 448, 112)
REAL_SIZES: tuple[int, int, int, int | None] = (320, 2, 448, None)


def without_pretrained_weights(config: object) -> object:
    """A copy of a config tree with every pretrained-weight source turned off (``pretrained``,
    ``backbone_pretrained``: false or null; ``checkpoint_path``, ``backbone_checkpoint``: null),
    so a real-size model is built with random weights and nothing is downloaded."""
    if isinstance(config, list):
        return [without_pretrained_weights(value) for value in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key in ("pretrained", "backbone_pretrained"):
            value = False if isinstance(value, bool) else None
        elif key in ("checkpoint_path", "backbone_checkpoint"):
            value = None
        out[key] = without_pretrained_weights(value)
    return out


def for_synthetic_training(config: dict) -> dict:
    """A copy of a model config that trains on the synthetic world's label space: training class
    names made for another dataset (CDT's 171 COCO-Stuff names with synonyms) are dropped."""
    init_args = dict(config.get("init_args") or {})
    if init_args.get("training_class_names") is not None:
        init_args["training_class_names"] = None
    return {**config, "init_args": init_args}


def config_model(path: str, device: torch.device) -> OVSegModule:
    """The model section of a shipped config, built as ``ovseg fit`` builds it, with random weights
    (:func:`without_pretrained_weights`: throughput does not depend on them, nothing is downloaded
    and the synthetic CLIP file need not exist) and trained here on the synthetic world
    (:func:`for_synthetic_training`)."""
    config = without_pretrained_weights(for_synthetic_training(yaml.safe_load((REPO / path).read_text())["model"]))
    return build_model_from_section(config).to(device).eval()


def window_loop(images: torch.Tensor, score_fn, window: int, stride: int) -> torch.Tensor:
    """Baseline: mmseg's slide inference one window at a time (for comparison only)."""
    _, _, height, width = images.shape
    total = count = None
    for y in window_starts(height, window, stride).tolist():
        for x in window_starts(width, window, stride).tolist():
            h, w = min(window, height), min(window, width)
            scores = F.interpolate(score_fn(images[:, :, y : y + h, x : x + w]), size=(h, w), mode="bilinear")
            if total is None:
                total = images.new_zeros(images.shape[0], scores.shape[1], height, width)
                count = images.new_zeros(1, 1, height, width)
            total[:, :, y : y + h, x : x + w] += scores
            count[:, :, y : y + h, x : x + w] += 1
    return total / count


def bench_method(
    model: OVSegModule, device: torch.device, repeats: int, sizes: tuple[int, int, int, int | None] = TINY_SIZES
) -> list[tuple[str, float]]:
    """Training and inference rows of one method on synthetic scenes (random images for inference).

    Training: AdamW steps on one batch of ``sizes[1]`` synthetic scenes of ``sizes[0]`` px (mask
    methods with the seen classes as the label space). Inference: one ``sizes[2]`` px image, the
    synthetic world's 13 classes, whole and (unless ``sizes[3]`` is None) in ``sizes[3]`` px
    windows at half-window stride, the windows as one batch and one by one.
    """
    train_px, batch_size, image_px, window = sizes
    data = SyntheticDataModule(
        num_train=batch_size, batch_size=batch_size, image_size=train_px, unseen_in_training="ignored"
    )
    if isinstance(model, MaskClassificationModule):
        model.set_training_classes(data.training_classes)
    batch = next(iter(data.train_dataloader()))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        model.training_loss(batch)["loss"].backward()
        optimizer.step()

    seconds = timed(step, repeats, warmup=2)
    rows = [(f"training, batch {batch_size} at {train_px} px (samples/s)", batch_size / seconds)]
    memory = peak_memory(step)
    if memory is not None:
        rows.append((f"peak {memory_kind()} of one training step, above the model (MiB)", memory))
    optimizer.state.clear()  # free the Adam moments before the inference rows
    model.eval()

    vocabulary = Vocabulary.from_names([c.name for c in CATEGORIES])
    embeddings = model.text_embeddings(vocabulary)
    image = torch.rand(1, 3, image_px, image_px, device=device)

    def score_fn(images: torch.Tensor) -> torch.Tensor:
        output = model.predict_scores(images, embeddings, vocabulary=vocabulary)
        return output.float().pixel_scores() if isinstance(output, MaskPredictions) else output

    whole_name = f"inference, whole image {image_px}x{image_px}"
    modes = {whole_name: lambda: infer_scores(image, score_fn, InferenceSettings())}
    with torch.no_grad():
        rows.append((f"{whole_name} (images/s)", 1 / timed(modes[whole_name], repeats)))
        if window is not None:
            stride = window // 2
            count = len(window_starts(image_px, window, stride)) ** 2
            name = f"inference, sliding window {window}/{stride} ({count} windows)"
            settings = InferenceSettings(window=window, stride=stride)
            modes[f"{name}, batched"] = lambda: infer_scores(image, score_fn, settings)
            modes[f"{name}, window-by-window loop"] = lambda: window_loop(image, score_fn, window, stride)
            # batched and loop alternate, and each takes its median, so that a change of load on
            # the machine during the measurement hits both sides alike
            sliding, loop = timed_pair(modes[f"{name}, batched"], modes[f"{name}, window-by-window loop"], 2 * repeats)
            rows += [
                (f"{name}, batched (images/s)", 1 / sliding),
                (f"{name}, window-by-window loop (images/s)", 1 / loop),
                ("batched sliding window speed-up over the loop (x)", loop / sliding),
            ]
        for name, run in modes.items():
            memory = peak_memory(run)
            if memory is not None:
                rows.append((f"peak {memory_kind()} of one {name}, above the model (MiB)", memory))
    return rows


def bench_concepts(count: int) -> list[tuple[str, float]]:
    world = SyntheticWorld(seed=1)
    captions = [caption for i in range(count // 5 + 1) for caption in world.scene(i).captions][:count]
    rows = []
    for workers in (0, 2):
        extractor = ConceptExtractor()
        extractor.extract(captions[0])  # load the tagger outside the timing
        start = time.perf_counter()
        extractor.extract_many(captions, num_workers=workers)
        rows.append((f"concept extraction, {workers} workers (captions/s)", count / (time.perf_counter() - start)))
    return rows


def _images_per_second(loader, limit: int) -> float:
    """Images/second over one pass of ``loader`` (at most ``limit`` images), after one batch."""
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch["image"])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def bench_loading(count: int, workdir: Path) -> list[tuple[str, float]]:
    """Each DataModule over the synthetic world written in its real on-disk format (512 px)."""
    from ovseg.datamodules.benchmark_specs import BenchmarkSpec
    from ovseg.datamodules.benchmarks import EvaluationDataModule
    from ovseg.datamodules.coco_captions import CocoCaptionsDataModule
    from ovseg.datamodules.webdataset import WebDatasetDataModule
    from ovseg.prepare.synthetic import make_synthetic

    size = 512
    coco = make_synthetic("coco", workdir / "coco", count, None, size, 0, progress=False)
    shards = make_synthetic("wds", workdir / "wds", count, None, size, 0, progress=False)
    mmseg = make_synthetic("mmseg", workdir / "mmseg", count, None, size, 0, progress=False)
    rows = []
    for workers in (0, 2):
        loaders = {
            "COCO Captions + RandomResizedCrop 224": CocoCaptionsDataModule(
                coco, batch_size=32, num_workers=workers, concepts=None
            ),
            "WebDataset shards + RandomResizedCrop 224": WebDatasetDataModule(
                str(shards / f"{{00000..{len(list(shards.glob('*.tar'))) - 1:05d}}}.tar"),
                epoch_length=count,
                batch_size=32,
                num_workers=workers,
                shuffle_buffer=100,
            ),
            "evaluation (mmseg folder, native size)": EvaluationDataModule(
                [BenchmarkSpec(name="synthetic", data_root=".", class_names="class_names.txt")],
                root=str(mmseg),
                batch_size=8,
                num_workers=workers,
            ),
        }
        for name, datamodule in loaders.items():
            datamodule.setup("fit" if "evaluation" not in name else "validate")
            loader = datamodule.val_dataloader()[0] if "evaluation" in name else datamodule.train_dataloader()
            rows.append((f"loader: {name}, {size} px, {workers} workers (images/s)", _images_per_second(loader, count)))
    synthetic = SyntheticDataModule(num_train=count, batch_size=32).train_dataloader()
    rows.append(
        (
            "loader: synthetic world generated on the fly, 112 px, 0 workers (images/s)",
            _images_per_second(synthetic, count),
        )
    )
    return rows


def bench_predict(
    model: OVSegModule, workdir: Path, count: int = 100, size: int = 112, batch_size: int = 8
) -> list[tuple[str, float]]:
    """``ovseg predict`` end to end on a folder of ``count`` synthetic JPEGs (``ImageFolderDataModule``,
    the synthetic world's class names), without and with the prediction writer (label PNG, overlay
    with legend, JSON line per image): images/second of ``trainer.predict`` and its peak memory."""
    import lightning as L

    from ovseg.datamodules.image_folder import ImageFolderDataModule
    from ovseg.prepare.synthetic import make_synthetic
    from ovseg.writer import PredictionWriter

    root = make_synthetic("mmseg", workdir / f"predict_{count}_{size}", count, None, size, 0, progress=False)
    images = root / "images" / "validation"
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"

    def predict(writer: bool, folder: Path = images) -> float:
        callbacks = [PredictionWriter(output_dir=str(workdir / "predictions"))] if writer else []
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=False,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        datamodule = ImageFolderDataModule(str(folder), str(root / "class_names.txt"), batch_size=batch_size)
        start = time.perf_counter()
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    predict(True, images)  # warm-up (allocator, text embeddings, lazy imports)
    rows = []
    for writer, label in ((False, "writer off"), (True, "writer on: label PNG + overlay + JSON line")):
        seconds: list[float] = []
        peak = peak_memory(lambda seconds=seconds, writer=writer: seconds.append(predict(writer)))
        rows.append(
            (
                f"predict, folder of {count} JPEGs {size}x{size}, batch {batch_size}, {label} (images/s)",
                count / seconds[0],
            )
        )
        if peak is not None:
            rows.append((f"peak {memory_kind()} of that predict, {label} (MiB)", peak))
    return rows


def _vit_s_simzss(device: torch.device) -> SimZSS:
    """SimZSS with a randomly initialised DINOv2 ViT-S/14 backbone (224 px) and the smoke text tower."""
    from ovseg.encoders import CLIPTextTransformer, TimmViT

    image_encoder = TimmViT("vit_small_patch14_dinov2", model_kwargs={"img_size": 224})
    text_encoder = CLIPTextTransformer(
        width=64, layers=2, heads=2, context_length=32, output_dim=image_encoder.embed_dim
    )
    return SimZSS(image_encoder, text_encoder, lambda_local=1.0, class_embedding="concept").to(device)


def bench_cached_training(device: torch.device, repeats: int, workdir: Path) -> list[tuple[str, float]]:
    """Samples/second of the same SimZSS training step from images and from a feature store."""
    from torch.utils.data import DataLoader

    from ovseg.datamodules.base import collate_samples
    from ovseg.datamodules.feature_store import CachedFeaturesDataset
    from ovseg.prepare.feature_cache import CacheViews, build_feature_cache

    torch.manual_seed(0)
    model = _vit_s_simzss(device)
    dataset = SyntheticDataModule(num_train=64, batch_size=32).train_dataset()
    views = CacheViews("center", size=224)
    images = torch.stack([views.view(dataset[i]["image"], i, 0) for i in range(32)])
    image_batch = {"image": images.to(device), "caption": [dataset[i]["caption"] for i in range(32)]}
    store = build_feature_cache(
        model.model.image_encoder, dataset, workdir / "vits_store", views, batch_size=32, device=device, progress=False
    )
    loader = DataLoader(
        CachedFeaturesDataset(store), batch_size=32, shuffle=True, drop_last=True, collate_fn=collate_samples
    )
    for captions in loader.dataset.captions:  # concepts of every caption, outside the timing
        model.concept_batch(captions)
    model.concept_batch(image_batch["caption"])
    batches = iter(())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        optimizer.zero_grad()
        model.training_loss(batch)["loss"].backward()
        optimizer.step()

    def cached_step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        step(batch)

    uncached = timed(lambda: step(image_batch), max(2, repeats // 2), warmup=1)
    cached = timed(cached_step, 10 * repeats, warmup=4)

    class ImageViews(torch.utils.data.Dataset):
        """The uncached epoch's data: each image's view made as it is loaded."""

        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> dict:
            sample = dataset[index]
            return {"image": views.view(sample["image"], index, 0), "caption": sample["caption"]}

    def epoch_seconds(epoch_loader) -> float:
        start = time.perf_counter()
        for batch in epoch_loader:
            step({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    image_loader = DataLoader(ImageViews(), batch_size=32, shuffle=True, drop_last=True, collate_fn=collate_samples)
    count = len(dataset)
    return [
        ("SimZSS training from images, frozen ViT-S/14 at 224 px, batch 32 (samples/s)", 32 / uncached),
        ("SimZSS training from the feature store, same model, batch 32 (samples/s)", 32 / cached),
        ("feature-store speed-up of SimZSS training (x)", uncached / cached),
        (
            f"SimZSS epoch of {count} images from images, views made while loading, batch 32 (s)",
            epoch_seconds(image_loader),
        ),
        (f"SimZSS epoch of the same {count} images from the feature store, batch 32 (s)", epoch_seconds(loader)),
    ]


def write_random_store(path: Path, num_images: int, num_patches: int = 256, dim: int = 384) -> float:
    """A feature store of random normalised features (the ViT-S/14 224-px shapes); returns MiB."""
    import json

    import numpy as np

    from ovseg.prepare.feature_cache import FeatureStoreWriter

    world = SyntheticWorld(seed=2)
    captions = [world.scene(i).captions for i in range(8)]
    writer = FeatureStoreWriter(
        path,
        num_images,
        1,
        num_patches,
        dim,
        (16, 16),
        shard_size=1024,
        meta={"encoder": "random", "views": {"mode": "center"}},
    )
    rng = np.random.default_rng(0)
    for start in range(0, num_images, 200):
        count = min(200, num_images - start)
        patches = rng.standard_normal((count, 1, num_patches, dim), dtype=np.float32)
        patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
        pooled = patches.mean(2)
        writer.append(
            patches.astype(np.float16),
            pooled.astype(np.float16),
            [captions[(start + i) % len(captions)] for i in range(count)],
        )
    json.loads((path / "index.json").read_text())
    return sum(f.stat().st_size for f in path.glob("*.npy")) / 2**20


def rss_child(store: str) -> None:
    """One cached training epoch over ``store`` (batch 32); prints the peak RSS (VmHWM) in MiB."""
    from torch.utils.data import DataLoader

    from ovseg.datamodules.base import collate_samples
    from ovseg.datamodules.feature_store import CachedFeaturesDataset
    from ovseg.encoders import CLIPTextTransformer, TimmViT

    torch.manual_seed(0)
    image_encoder = TimmViT("vit_small_patch14_dinov2", model_kwargs={"img_size": 224})
    model = SimZSS(
        image_encoder,
        CLIPTextTransformer(width=64, layers=2, heads=2, context_length=32, output_dim=384),
        lambda_local=1.0,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = DataLoader(
        CachedFeaturesDataset(store), batch_size=32, shuffle=True, drop_last=True, collate_fn=collate_samples
    )
    for batch in loader:
        optimizer.zero_grad()
        model.training_loss(batch)["loss"].backward()
        optimizer.step()
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(f"VmHWM_MiB {peak / 1024:.1f}")


def bench_cached_memory(workdir: Path, sizes: tuple[int, ...]) -> list[tuple[str, float]]:
    """Peak RSS of a cached training epoch, in a fresh CPU subprocess per store size."""
    import subprocess
    import sys

    rows = []
    for size in sizes:
        path = workdir / f"rss_store_{size}"
        mib = write_random_store(path, size)
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(path)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        ).stdout
        peak = float(out.split("VmHWM_MiB")[1].split()[0])
        rows.append((f"peak RSS, one cached training epoch, {size}-image store of {mib:,.0f} MiB (MiB)", peak))
    return rows


def bench_command_line(repeats: int) -> list[tuple[str, float]]:
    """Seconds for ``ovseg --help`` (no torch import: target under 2 s) and ``ovseg fit --help`` (builds
    LightningCLI's parser, imports torch and Lightning), each the best of ``repeats`` fresh processes."""
    import subprocess
    import sys

    rows = []
    for args in (["--help"], ["data", "--help"], ["fit", "--help"]):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ovseg", *args], check=True, capture_output=True, cwd=REPO)
            best = min(best, time.perf_counter() - start)
        rows.append((f"ovseg {' '.join(args)} (s)", best))
    return rows


def print_table(title: str, rows: list[tuple[str, float]]) -> None:
    print(f"\n### {title}\n\n| measurement | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.1f} |" if abs(value) >= 10 else f"| {name} | {value:.3g} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough check)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHOD_CONFIGS),
        default=list(METHOD_CONFIGS),
        help="the methods to measure (default: all)",
    )
    parser.add_argument(
        "--real-size",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the real-size configs with random weights "
        "(default: on a GPU only; on a CPU they take minutes)",
    )
    parser.add_argument("--no-loading", action="store_true", help="skip the DataModule table")
    parser.add_argument("--rss-child", metavar="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    repeats = 2 if args.quick else 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real_size = torch.cuda.is_available() if args.real_size is None else args.real_size
    print(f"machine: {machine()}", flush=True)
    print_table("command line", bench_command_line(1 if args.quick else 3))
    with tempfile.TemporaryDirectory() as workdir:
        for method in args.methods:
            tiny, real = METHOD_CONFIGS[method]
            torch.manual_seed(0)
            model = config_model(tiny, device)
            rows = bench_method(model, device, repeats)
            if method == "SimZSS":
                rows += [
                    *bench_predict(model, Path(workdir), 20 if args.quick else 100),
                    *bench_concepts(500 if args.quick else 2000),
                    *bench_cached_training(device, repeats, Path(workdir)),
                    *bench_cached_memory(Path(workdir), (200, 2000)),
                ]
            print_table(f"{method}, tiny: {tiny}", rows)
            if real_size:
                torch.manual_seed(0)
                model = config_model(real, device)
                rows = bench_method(model, device, max(1, repeats // 2), REAL_SIZES)
                print_table(f"{method}, real size: {real} (random weights)", rows)
                del model
        if not args.no_loading:
            print_table("data loading", bench_loading(128 if args.quick else 512, Path(workdir)))


if __name__ == "__main__":
    main()
