"""Throughput measurements, printed as Markdown tables with the machine they ran on.

    make bench                      # or: python benchmarks/run.py [--quick]

Measures, for the tiny SimZSS of ``configs/experiment/smoke.yaml`` on the synthetic world:
training samples/second, inference images/second (whole image, batched sliding window and the
window-by-window loop kept here only as the baseline), concept extraction captions/second, and the
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
        sliding = timed(lambda: infer_scores(image, score_fn, InferenceSettings(window=112, stride=56)), repeats)
        loop = timed(lambda: window_loop(image, score_fn, 112, 56), repeats)
    return [("inference, whole image 448x448 (images/s)", 1 / whole),
            ("inference, sliding window 112/56, batched (images/s)", 1 / sliding),
            ("inference, sliding window 112/56, window-by-window loop (images/s)", 1 / loop),
            ("batched sliding window speed-up over the loop (x)", loop / sliding)]


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
    return [("SimZSS tiny training, batch 32 (samples/s)", 32 / seconds)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough check)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = smoke_model(device)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [*bench_training(model, device, repeats), *bench_inference(model, device, repeats),
                *bench_concepts(500 if args.quick else 2000),
                *bench_loading(128 if args.quick else 512, Path(workdir))]
    print(f"machine: {machine()}\n")
    print("| measurement | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.1f} |")


if __name__ == "__main__":
    main()
