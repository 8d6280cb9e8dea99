"""Throughput measurements, printed as Markdown tables with the machine they ran on.

    make bench                      # or: python benchmarks/run.py [--quick]

Measures, for the tiny SimZSS of ``configs/experiment/smoke.yaml`` on the synthetic world:
training samples/second, inference images/second (whole image, batched sliding window and the
window-by-window loop kept here only as the baseline), the peak memory of a training step and of
each inference mode (above the model: resident set on the CPU, allocator peak on a GPU), concept
extraction captions/second, the images/second of each DataModule reading the synthetic world
written in its real format, SimZSS training samples/second and epoch time from images (the frozen
ViT-S/14 forward at 224 px each step) against the same training from a frozen-feature store, and
the peak resident memory of a cached training epoch for two store sizes (each in a fresh
subprocess). The same command runs on a GPU when one is present.
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
from jsonargparse import ArgumentParser

from ovseg.datamodules.synthetic import CATEGORIES, SyntheticWorld
from ovseg.datamodules.synthetic.datamodule import SyntheticDataModule
from ovseg.inference import InferenceSettings, infer_scores, window_starts
from ovseg.methods.simzss import SimZSS
from ovseg.methods.simzss.concepts import ConceptExtractor
from ovseg.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming the hardware and software the figures come from."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        device = names[0] if names else platform.processor() or "CPU"
    return (f"{device}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


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


def smoke_model(device: torch.device) -> SimZSS:
    """The SimZSS of the smoke config, built from its YAML."""
    config = yaml.safe_load((REPO / "configs/experiment/smoke.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(SimZSS, "model")
    cfg = parser.parse_object({"model": config["model"]})
    return parser.instantiate(cfg).model.to(device).eval()


def window_loop(images: torch.Tensor, score_fn, window: int, stride: int) -> torch.Tensor:
    """Baseline: mmseg's slide inference one window at a time (for comparison only)."""
    _, _, height, width = images.shape
    total = count = None
    for y in window_starts(height, window, stride).tolist():
        for x in window_starts(width, window, stride).tolist():
            h, w = min(window, height), min(window, width)
            scores = F.interpolate(score_fn(images[:, :, y:y + h, x:x + w]), size=(h, w), mode="bilinear")
            if total is None:
                total = images.new_zeros(images.shape[0], scores.shape[1], height, width)
                count = images.new_zeros(1, 1, height, width)
            total[:, :, y:y + h, x:x + w] += scores
            count[:, :, y:y + h, x:x + w] += 1
    return total / count


def bench_inference(model: SimZSS, device: torch.device, repeats: int) -> list[tuple[str, float]]:
    vocabulary = Vocabulary.from_names([c.name for c in CATEGORIES])
    embeddings = model.text_embeddings(vocabulary)
    image = torch.rand(1, 3, 448, 448, device=device)

    def score_fn(batch: torch.Tensor) -> torch.Tensor:
        return model.predict_scores(batch, embeddings)

    with torch.no_grad():
        whole = timed(lambda: infer_scores(image, score_fn, InferenceSettings()), repeats)
        # batched and loop alternate, and each takes its median, so that a change of load on the
        # machine during the measurement hits both sides alike
        sliding, loop = timed_pair(lambda: infer_scores(image, score_fn, InferenceSettings(window=112, stride=56)),
                                   lambda: window_loop(image, score_fn, 112, 56), 2 * repeats)
        memory = [peak_memory(lambda: infer_scores(image, score_fn, InferenceSettings())),
                  peak_memory(lambda: infer_scores(image, score_fn, InferenceSettings(window=112, stride=56))),
                  peak_memory(lambda: window_loop(image, score_fn, 112, 56))]
    rows = [("inference, whole image 448x448 (images/s)", 1 / whole),
            ("inference, sliding window 112/56, batched (images/s)", 1 / sliding),
            ("inference, sliding window 112/56, window-by-window loop (images/s)", 1 / loop),
            ("batched sliding window speed-up over the loop (x)", loop / sliding)]
    names = ("inference, whole image 448x448", "inference, sliding window 112/56, batched",
             "inference, sliding window 112/56, window-by-window loop")
    rows += [(f"peak {memory_kind()} of one {name}, above the model (MiB)", value)
             for name, value in zip(names, memory) if value is not None]
    return rows


def bench_training(model: SimZSS, device: torch.device, repeats: int) -> list[tuple[str, float]]:
    data = SyntheticDataModule(num_train=64, batch_size=32)
    batch = next(iter(data.train_dataloader()))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        model.training_loss(batch)["loss"].backward()
        optimizer.step()

    seconds = timed(step, repeats, warmup=2)
    rows = [("SimZSS tiny training, batch 32 (samples/s)", 32 / seconds)]
    memory = peak_memory(step)
    if memory is not None:
        rows.append((f"peak {memory_kind()} of one SimZSS tiny training step, batch 32, above the model (MiB)",
                     memory))
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
    from ovseg.datamodules.benchmarks import BenchmarkSpec, EvaluationDataModule
    from ovseg.datamodules.coco import CocoCaptionsDataModule
    from ovseg.datamodules.synthetic import make_synthetic
    from ovseg.datamodules.webdataset import WebDatasetDataModule

    size = 512
    coco = make_synthetic("coco", workdir / "coco", count, None, size, 0, progress=False)
    shards = make_synthetic("wds", workdir / "wds", count, None, size, 0, progress=False)
    mmseg = make_synthetic("mmseg", workdir / "mmseg", count, None, size, 0, progress=False)
    rows = []
    for workers in (0, 2):
        loaders = {
            "COCO Captions + RandomResizedCrop 224": CocoCaptionsDataModule(
                coco, batch_size=32, num_workers=workers, concepts=None),
            "WebDataset shards + RandomResizedCrop 224": WebDatasetDataModule(
                str(shards / f"{{00000..{len(list(shards.glob('*.tar'))) - 1:05d}}}.tar"), epoch_length=count, batch_size=32,
                num_workers=workers, shuffle_buffer=100),
            "evaluation (mmseg folder, native size)": EvaluationDataModule(
                [BenchmarkSpec(name="synthetic", data_root=".", class_names="class_names.txt")],
                root=str(mmseg), batch_size=8, num_workers=workers),
        }
        for name, datamodule in loaders.items():
            datamodule.setup("fit" if "evaluation" not in name else "validate")
            loader = datamodule.val_dataloader()[0] if "evaluation" in name else datamodule.train_dataloader()
            rows.append((f"loader: {name}, {size} px, {workers} workers (images/s)",
                         _images_per_second(loader, count)))
    synthetic = SyntheticDataModule(num_train=count, batch_size=32).train_dataloader()
    rows.append(("loader: synthetic world generated on the fly, 112 px, 0 workers (images/s)",
                 _images_per_second(synthetic, count)))
    return rows


def _vit_s_simzss(device: torch.device) -> SimZSS:
    """SimZSS with a randomly initialised DINOv2 ViT-S/14 backbone (224 px) and the smoke text tower."""
    from ovseg.encoders import CLIPTextTransformer, TimmViT

    image_encoder = TimmViT("vit_small_patch14_dinov2", model_kwargs={"img_size": 224})
    text_encoder = CLIPTextTransformer(width=64, layers=2, heads=2, context_length=32,
                                       output_dim=image_encoder.embed_dim)
    return SimZSS(image_encoder, text_encoder, lambda_local=1.0, class_embedding="concept").to(device)


def bench_cached_training(device: torch.device, repeats: int, workdir: Path) -> list[tuple[str, float]]:
    """Samples/second of the same SimZSS training step from images and from a feature store."""
    from torch.utils.data import DataLoader

    from ovseg.datamodules.common import collate_samples
    from ovseg.datamodules.feature_cache import CachedFeaturesDataset, CacheViews, build_feature_cache

    torch.manual_seed(0)
    model = _vit_s_simzss(device)
    dataset = SyntheticDataModule(num_train=64, batch_size=32).train_dataset()
    views = CacheViews("center", size=224)
    images = torch.stack([views.view(dataset[i]["image"], i, 0) for i in range(32)])
    image_batch = {"image": images.to(device), "caption": [dataset[i]["caption"] for i in range(32)]}
    store = build_feature_cache(model.model.image_encoder, dataset, workdir / "vits_store", views,
                                batch_size=32, device=device, progress=False)
    loader = DataLoader(CachedFeaturesDataset(store), batch_size=32, shuffle=True, drop_last=True,
                        collate_fn=collate_samples)
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
    return [("SimZSS training from images, frozen ViT-S/14 at 224 px, batch 32 (samples/s)", 32 / uncached),
            ("SimZSS training from the feature store, same model, batch 32 (samples/s)", 32 / cached),
            ("feature-store speed-up of SimZSS training (x)", uncached / cached),
            (f"SimZSS epoch of {count} images from images, views made while loading, batch 32 (s)",
             epoch_seconds(image_loader)),
            (f"SimZSS epoch of the same {count} images from the feature store, batch 32 (s)",
             epoch_seconds(loader))]


def write_random_store(path: Path, num_images: int, num_patches: int = 256, dim: int = 384) -> float:
    """A feature store of random normalised features (the ViT-S/14 224-px shapes); returns MiB."""
    import json

    import numpy as np

    from ovseg.datamodules.feature_cache import FeatureStoreWriter

    world = SyntheticWorld(seed=2)
    captions = [world.scene(i).captions for i in range(8)]
    writer = FeatureStoreWriter(path, num_images, 1, num_patches, dim, (16, 16), shard_size=1024,
                                meta={"encoder": "random", "views": {"mode": "center"}})
    rng = np.random.default_rng(0)
    for start in range(0, num_images, 200):
        count = min(200, num_images - start)
        patches = rng.standard_normal((count, 1, num_patches, dim), dtype=np.float32)
        patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
        pooled = patches.mean(2)
        writer.append(patches.astype(np.float16), pooled.astype(np.float16),
                      [captions[(start + i) % len(captions)] for i in range(count)])
    json.loads((path / "index.json").read_text())
    return sum(f.stat().st_size for f in path.glob("*.npy")) / 2**20


def rss_child(store: str) -> None:
    """One cached training epoch over ``store`` (batch 32); prints the peak RSS (VmHWM) in MiB."""
    from torch.utils.data import DataLoader

    from ovseg.datamodules.common import collate_samples
    from ovseg.datamodules.feature_cache import CachedFeaturesDataset
    from ovseg.encoders import CLIPTextTransformer, TimmViT

    torch.manual_seed(0)
    image_encoder = TimmViT("vit_small_patch14_dinov2", model_kwargs={"img_size": 224})
    model = SimZSS(image_encoder, CLIPTextTransformer(width=64, layers=2, heads=2, context_length=32,
                                                      output_dim=384), lambda_local=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = DataLoader(CachedFeaturesDataset(store), batch_size=32, shuffle=True, drop_last=True,
                        collate_fn=collate_samples)
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
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path)], check=True,
                             capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
        peak = float(out.split("VmHWM_MiB")[1].split()[0])
        rows.append((f"peak RSS, one cached training epoch, {size}-image store of {mib:,.0f} MiB (MiB)", peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough check)")
    parser.add_argument("--rss-child", metavar="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    repeats = 2 if args.quick else 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = smoke_model(device)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [*bench_training(model, device, repeats), *bench_inference(model, device, repeats),
                *bench_concepts(500 if args.quick else 2000),
                *bench_loading(128 if args.quick else 512, Path(workdir)),
                *bench_cached_training(device, repeats, Path(workdir)),
                *bench_cached_memory(Path(workdir), (200, 2000))]
    print(f"machine: {machine()}\n")
    print("| measurement | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.1f} |")


if __name__ == "__main__":
    main()
