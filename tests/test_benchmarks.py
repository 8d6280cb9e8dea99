"""Evaluation benchmarks on disk: the synthetic world written in every benchmark layout (mmseg,
palette PNG, reduce_zero_label, COCO-Object, detectron2 16-bit TIFF), read back through
EvaluationDataModule and compared with the generator's ground truth; presets and shipped data
YAMLs; errors naming the file; image modes; ``ovseg data check``; an end-to-end ``ovseg validate``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning import LightningDataModule
from PIL import Image

from ovseg.cli import run
from ovseg.datamodules.benchmark_specs import CAPTION_BENCHMARKS, MASK_BENCHMARKS, PRESETS, BenchmarkSpec, preset
from ovseg.datamodules.benchmarks import DataError, EvaluationDataModule, LabelDecoder
from ovseg.datamodules.decode import DecodeError, decode_image, decode_label
from ovseg.datamodules.synthetic import SyntheticWorld
from ovseg.prepare.check import check_benchmark, load_data_config, spec_from_dict
from ovseg.prepare.synthetic import write_mmseg

REPO = Path(__file__).resolve().parents[1]
DATA_CONFIGS = sorted((REPO / "configs" / "data").glob("*.yaml"))
SIZE = (36, 52)  # small, not square
NUM_CLASSES = 16  # the synthetic world's categories

CLASS_COUNTS = {
    "voc21": 21,
    "voc20": 20,
    "context59": 59,
    "context60": 60,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
    "ade150": 150,
    "pc59": 59,
    "pas20": 20,
    "ade847": 847,
    "pc459": 459,
}

# A VOC-like colour map: palette index i has a colour whose luminance is not i.
VOC_PALETTE = [c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53 + 128) % 256)]


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(image_size=SIZE, seed=3)


@pytest.fixture(scope="module")
def mmseg_root(tmp_path_factory, world) -> Path:
    """``write_mmseg``'s folder: images/validation/*.jpg, annotations/validation/*.png, class_names.txt."""
    return write_mmseg(world, tmp_path_factory.mktemp("mmseg"), num_images=5, progress=False)


def synthetic_spec(**overrides) -> BenchmarkSpec:
    return BenchmarkSpec(**{"name": "synthetic", "class_names": "class_names.txt", **overrides})


def all_samples(dm: EvaluationDataModule, loader_index: int = 0) -> list[dict]:
    """Every sample of one dataloader, unbatched."""
    samples = []
    for batch in dm.val_dataloader()[loader_index]:
        for i in range(len(batch["label"])):
            samples.append({key: batch[key][i] for key in ("image", "label", "name", "index")})
    return samples


# ------------------------------------------------------------------------------------------ writers
def save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def save_label(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    """PNG ('L', or 'P' with a colour palette) or 16-bit TIFF, by the raw array's dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", (raw.shape[1], raw.shape[0]), np.ascontiguousarray(raw, np.uint8).tobytes())
        image.putpalette(VOC_PALETTE)
    else:
        image = Image.fromarray(raw)
    image.save(path)


def encode(spec: BenchmarkSpec, gt: np.ndarray) -> np.ndarray:
    """The raw file values that decode to the ground truth ``gt`` (0..12, 255) under ``spec``."""
    if spec.reduce_zero_label:
        return np.where(gt == 255, 0, gt.astype(np.int64) + 1).astype(np.uint8)
    if spec.ignore_index == 65535:  # A-847 / PC-459: spread the classes over 16 bits
        scale = spec.num_classes // NUM_CLASSES
        return np.where(gt == 255, 65535, gt.astype(np.int64) * scale).astype(np.uint16)
    return gt.copy()


def reference_decode(spec: BenchmarkSpec, raw: np.ndarray) -> np.ndarray:
    """What a spec must make of raw values (written out independently of LabelDecoder)."""
    values = raw.astype(np.int64)
    for key, value in (spec.label_map or {}).items():
        values = np.where(raw == key, value, values)
    if spec.reduce_zero_label:
        values = np.where((values == 0) | (values == spec.ignore_index), spec.ignore_index, values - 1)
    return values


def write_benchmark(
    spec: BenchmarkSpec, root: Path, world: SyntheticWorld, n: int = 2, written: dict[Path, np.ndarray] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``n`` synthetic scenes in ``spec``'s layout; returns stem -> (image, expected label).

    ``written`` remembers label files shared by several specs (VOC-21 and VOC-20 read the same
    PNGs): a shared file is written once and each spec's expectation decoded from it.
    """
    spec = spec.resolved()
    written = {} if written is None else written
    data_dir = spec.data_dir(root)
    truth = {}
    stems = []
    for i in range(n):
        scene = world.scene(i, "val")
        stem = f"frankfurt/frankfurt_{i:06d}_000019" if spec.name == "cityscapes" else f"{i:012d}"
        stems.append(stem)
        save_image(data_dir / spec.image_dir / f"{stem}{spec.image_suffix}", scene.image)
        label_path = data_dir / spec.label_dir / f"{stem}{spec.label_suffix}"
        if label_path not in written:
            written[label_path] = encode(spec, scene.label)
            save_label(label_path, written[label_path], palette=spec.label_dir == "SegmentationClass")
        truth[stem] = (scene.image, reference_decode(spec, written[label_path]))
    if spec.split_file:
        split = data_dir / spec.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        previous = split.read_text().split() if split.is_file() else []
        split.write_text("\n".join(dict.fromkeys(previous + stems)) + "\n")
    return truth


def write_class_file(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"class{i}\n" for i in range(count)))


# ------------------------------------------------------------------------------------------ reading
def test_mmseg_folder_reads_back_the_generator_ground_truth(mmseg_root, world):
    dm = EvaluationDataModule([synthetic_spec()], root=str(mmseg_root), batch_size=2)
    assert [b.name for b in dm.benchmarks] == ["synthetic"]
    assert len(dm.benchmarks[0].vocabulary) == NUM_CLASSES
    dm.setup("validate")
    samples = all_samples(dm)
    assert len(samples) == 5
    for i, sample in enumerate(samples):
        scene = world.scene(i, "validation")
        assert sample["name"] == f"synthetic_val_{i:08d}" and int(sample["index"]) == i
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *SIZE)
        assert sample["label"].dtype == torch.int64 and sample["label"].shape == SIZE
        assert torch.equal(sample["label"], torch.from_numpy(scene.label.astype(np.int64)))
        jpeg = np.asarray(Image.open(mmseg_root / f"images/validation/{sample['name']}.jpg"))
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), jpeg)
        error = (sample["image"].permute(1, 2, 0).float() - torch.from_numpy(scene.image).float()).abs()
        assert error.mean() < 15  # JPEG quality 95 of small, noisy, textured scenes


def test_palette_png_labels_are_read_as_indices(tmp_path, world):
    truth = write_benchmark(preset("voc21"), tmp_path, world, n=3)
    label_file = next((tmp_path / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png"))
    with Image.open(label_file) as image:
        assert image.mode == "P"
        # the luminance of the palette colours is not the index: convert("L") would be wrong
        assert not np.array_equal(np.asarray(image.convert("L")), np.asarray(image))
    dm = EvaluationDataModule(["voc21"], root=str(tmp_path))
    dm.setup()
    samples = all_samples(dm)
    assert [s["name"] for s in samples] == sorted(truth)
    for sample in samples:
        assert torch.equal(sample["label"], torch.from_numpy(truth[sample["name"]][1]))


def test_reduce_zero_label_variant(tmp_path, world):
    """ADE20K-style files (0 = other, classes from 1) decode to the generator's 0-based labels."""
    spec = preset("ade20k")
    write_benchmark(spec, tmp_path, world, n=3)
    label_file = sorted((tmp_path / "ade/ADEChallengeData2016/annotations/validation").glob("*.png"))[0]
    raw = np.asarray(Image.open(label_file))
    assert raw.max() <= NUM_CLASSES and (raw == 0).any() and not (raw == 255).any()
    dm = EvaluationDataModule([spec], root=str(tmp_path))
    dm.setup()
    for i, sample in enumerate(all_samples(dm)):
        gt = world.scene(i, "val").label.astype(np.int64)
        assert torch.equal(sample["label"], torch.from_numpy(gt))


def test_voc20_reduces_the_background_of_voc21_files(tmp_path, world):
    write_benchmark(preset("voc21"), tmp_path, world, n=2)
    dm = EvaluationDataModule(["voc21", "voc20"], root=str(tmp_path))
    dm.setup()
    for voc21, voc20 in zip(all_samples(dm, 0), all_samples(dm, 1)):
        raw = voc21["label"]
        expected = torch.where((raw == 0) | (raw == 255), 255, raw - 1)
        assert torch.equal(voc20["label"], expected)


def test_detectron2_16bit_tiff_variant(tmp_path, world):
    """A-847-style 16-bit TIFF labels with ignore 65535 and class values above 255."""
    spec = preset("ade847")
    write_class_file(tmp_path / "ade847.txt", 847)
    truth = write_benchmark(spec, tmp_path, world, n=3)
    label_file = next((tmp_path / "ADE20K_2021_17_01/annotations_detectron2/validation").glob("*.tif"))
    assert Image.open(label_file).mode == "I;16"
    assert decode_label(label_file).max() == 65535  # 16-bit values kept
    dm = EvaluationDataModule(["ade847"], root=str(tmp_path))
    assert dm.benchmarks[0].ignore_index == 65535 and len(dm.benchmarks[0].vocabulary) == 847
    dm.setup()
    samples = all_samples(dm)
    assert len(samples) == 3
    for i, sample in enumerate(samples):
        assert torch.equal(sample["label"], torch.from_numpy(truth[sample["name"]][1]))
        gt = world.scene(i, "val").label.astype(np.int64)
        expected = np.where(gt == 255, 65535, gt * (847 // NUM_CLASSES))
        assert torch.equal(sample["label"], torch.from_numpy(expected))
        assert sample["label"].max() == 65535 and sample["label"][sample["label"] < 65535].max() > 255


def test_coco_object_maps_unlabeled_to_background(tmp_path, world):
    write_benchmark(preset("coco_object"), tmp_path, world, n=2)
    dm = EvaluationDataModule(["coco_object"], root=str(tmp_path))
    assert len(dm.benchmarks[0].vocabulary) == 81
    assert "bed" not in dm.benchmarks[0].vocabulary.classes[0]  # also a class of its own
    dm.setup()
    for i, sample in enumerate(all_samples(dm)):
        gt = world.scene(i, "val").label.astype(np.int64)
        assert (gt == 255).any()
        assert torch.equal(sample["label"], torch.from_numpy(np.where(gt == 255, 0, gt)))
        assert not (sample["label"] == 255).any()


def test_label_decoder_table():
    decoder = LabelDecoder(5, 255, reduce_zero_label=True, label_map={7: 0})
    raw = np.array([[0, 1, 5, 255, 7]], dtype=np.uint8)
    assert decoder(raw).tolist() == [[255, 0, 4, 255, 255]]
    with pytest.raises(DataError, match=r"x\.png: label values \[6\]"):
        decoder(np.array([[6, 1]], dtype=np.uint8), "x.png")
    wide = LabelDecoder(300, 65535)
    assert wide(np.array([[299, 65535]], dtype=np.int32)).tolist() == [[299, 65535]]
    with pytest.raises(DataError, match="70000"):
        wide(np.array([[70000]], dtype=np.int32), "y.tif")


# ------------------------------------------------------------------------------------------ presets and YAMLs
def test_presets_load_their_packaged_class_names():
    for name in CAPTION_BENCHMARKS + ("ade150", "pc59", "pas20"):
        benchmark = preset(name).benchmark()
        assert len(benchmark.vocabulary) == CLASS_COUNTS[name], name
        assert benchmark.ignore_index == 255 and benchmark.absent_policy == "zero"
    with_background = {n for n in CAPTION_BENCHMARKS if preset(n).background_threshold is not None}
    assert with_background == {"voc21", "context60", "coco_object"}
    assert {n for n in PRESETS if preset(n).reduce_zero_label} == {"voc20", "context59", "ade20k"}
    assert preset("voc21").inference_settings().window == 448
    assert preset("pas20").inference_settings().short_side == 640
    assert len(CAPTION_BENCHMARKS) == 8 and len(MASK_BENCHMARKS) == 5


def test_a847_and_pc459_require_a_class_name_file(tmp_path):
    for name in ("ade847", "pc459"):
        with pytest.raises(FileNotFoundError, match=f"{name}.txt"):
            preset(name).benchmark(tmp_path)
    write_class_file(tmp_path / "pc459.txt", 458)
    with pytest.raises(ValueError, match="458 classes, expected 459"):
        preset("pc459").benchmark(tmp_path)


def test_shipped_yamls_spell_out_the_presets():
    for config in DATA_CONFIGS:
        for entry in load_data_config(config)["benchmarks"]:
            spec = spec_from_dict(entry).resolved()
            if spec.name in PRESETS:
                assert {**spec.__dict__, "preset": None} == {**preset(spec.name).__dict__, "preset": None}, (
                    config.name,
                    spec.name,
                )
    names = {c.name: [e["name"] for e in load_data_config(c)["benchmarks"]] for c in DATA_CONFIGS}
    assert sorted(names["eval_caption8.yaml"]) == sorted(CAPTION_BENCHMARKS)
    assert sorted(names["eval_mask5.yaml"]) == sorted(MASK_BENCHMARKS)


def data_parser() -> ArgumentParser:
    """The data part of the ``ovseg`` LightningCLI parser."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=[c.name for c in DATA_CONFIGS])
def test_every_data_yaml_instantiates_and_reads_synthetic_data(config, tmp_path, world):
    """Every benchmark of every shipped data YAML, pointed at synthetic data in its own layout."""
    expected: dict[str, dict[str, np.ndarray]] = {}
    written: dict[Path, np.ndarray] = {}
    for entry in load_data_config(config)["benchmarks"]:
        spec = spec_from_dict(entry).resolved()
        if spec.name == "synthetic":
            write_mmseg(world, spec.data_dir(tmp_path), num_images=2, progress=False)
            expected[spec.name] = {
                f"synthetic_val_{i:08d}": world.scene(i, "val").label.astype(np.int64) for i in range(2)
            }
            continue
        if not str(spec.class_names).startswith("packaged:"):
            write_class_file(tmp_path / str(spec.class_names), spec.num_classes)
        truth = write_benchmark(spec, tmp_path, world, n=2, written=written)
        expected[spec.name] = {stem: label for stem, (_, label) in truth.items()}
    parser = data_parser()
    cfg = parser.parse_args(
        ["--data", str(config), "--data.init_args.root", str(tmp_path), "--data.init_args.num_workers", "0"]
    )
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, EvaluationDataModule)
    assert [len(b.vocabulary) for b in dm.benchmarks] == [CLASS_COUNTS.get(b.name, NUM_CLASSES) for b in dm.benchmarks]
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == len(dm.benchmarks) == len(expected)
    for index, benchmark in enumerate(dm.benchmarks):
        samples = all_samples(dm, index)
        assert {s["name"] for s in samples} == set(expected[benchmark.name]), benchmark.name
        for sample in samples:
            assert sample["image"].shape == (3, *SIZE) and sample["image"].dtype == torch.uint8
            assert torch.equal(sample["label"], torch.from_numpy(expected[benchmark.name][sample["name"]])), (
                benchmark.name,
                sample["name"],
            )


def test_several_benchmarks_give_aligned_dataloaders(tmp_path, mmseg_root, world):
    write_benchmark(preset("ade20k"), tmp_path, world, n=3)
    specs = [
        synthetic_spec(data_root=str(mmseg_root)),
        BenchmarkSpec(preset="ade20k", max_images=2),
        synthetic_spec(
            name="synthetic_rzl",
            data_root=str(mmseg_root),
            max_images=1,
            templates=["a {}"],
            inference=None,
            short_side=64,
            window=32,
            stride=16,
        ),
    ]
    dm = EvaluationDataModule(specs, root=str(tmp_path), batch_size=3)
    dm.setup()
    loaders = dm.val_dataloader()
    assert [b.name for b in dm.benchmarks] == ["synthetic", "ade20k", "synthetic_rzl"]
    assert [len(loader.dataset) for loader in loaders] == [5, 2, 1]
    assert [len(b.vocabulary) for b in dm.benchmarks] == [NUM_CLASSES, 150, NUM_CLASSES]
    assert dm.benchmarks[2].inference.window == 32 and dm.benchmarks[2].vocabulary.templates == ("a {}",)
    assert len(dm.test_dataloader()) == len(dm.predict_dataloader()) == 3
    selected = EvaluationDataModule(specs, root=str(tmp_path), select=["ade20k"], max_images=1)
    selected.setup()
    assert selected.names == ["ade20k"] and len(selected.val_dataloader()[0].dataset) == 1
    with pytest.raises(ValueError, match="unique"):
        EvaluationDataModule([synthetic_spec(data_root=str(mmseg_root))] * 2, root=str(tmp_path))


def test_images_of_different_sizes_arrive_as_lists(tmp_path, world):
    root = write_mmseg(world, tmp_path / "a", num_images=2, progress=False)
    other = SyntheticWorld(image_size=(30, 40), seed=3)
    scene = other.scene(7, "val")
    save_image(root / "images/validation/zz.jpg", scene.image)
    save_label(root / "annotations/validation/zz.png", scene.label)
    dm = EvaluationDataModule([synthetic_spec()], root=str(root), batch_size=3)
    batch = next(iter(dm.val_dataloader()[0]))
    assert isinstance(batch["image"], list) and [tuple(i.shape) for i in batch["image"]][-1] == (3, 30, 40)
    assert batch["name"][-1] == "zz" and torch.equal(batch["index"], torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ errors
def copy_root(mmseg_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mmseg_root, tmp_path / "copy"))


def test_missing_label_file_is_named(tmp_path, mmseg_root):
    root = copy_root(mmseg_root, tmp_path)
    missing = root / "annotations/validation/synthetic_val_00000002.png"
    missing.unlink()
    dm = EvaluationDataModule([synthetic_spec()], root=str(root))
    with pytest.raises(
        FileNotFoundError, match=r"missing label for 'synthetic_val_00000002'.*" + str(missing).replace("/", ".")
    ):
        dm.setup()


def test_label_values_outside_the_range_are_named(tmp_path, mmseg_root):
    root = copy_root(mmseg_root, tmp_path)
    bad = root / "annotations/validation/synthetic_val_00000001.png"
    label = np.asarray(Image.open(bad)).copy()
    label[0, :3] = 40
    save_label(bad, label)
    for workers in (0, 1):  # the error crosses from a worker process with its message
        dm = EvaluationDataModule([synthetic_spec()], root=str(root), num_workers=workers)
        dm.setup()
        with pytest.raises(
            DataError, match=rf"{bad}: label values \[40\] are out of range.*'synthetic' has 16 classes"
        ):
            all_samples(dm)


def test_missing_root_names_the_benchmark_and_path(tmp_path):
    root = tmp_path / "no_such_root"
    dm = EvaluationDataModule(["voc20"], root=str(root))  # packaged names: construction works
    with pytest.raises(
        FileNotFoundError, match=rf"benchmark 'voc20': data directory {root}/VOCdevkit/VOC2012 does not exist"
    ):
        dm.setup()


def test_other_bad_inputs_give_clear_errors(tmp_path, mmseg_root):
    with pytest.raises(FileNotFoundError, match="nonexistent_classes.txt"):
        EvaluationDataModule([synthetic_spec(class_names="nonexistent_classes.txt")], root=str(mmseg_root))
    with pytest.raises(ValueError, match="unknown benchmark preset 'voc22'"):
        EvaluationDataModule(["voc22"])
    with pytest.raises(ValueError, match="class_names is required"):
        EvaluationDataModule([BenchmarkSpec(name="x")])
    root = copy_root(mmseg_root, tmp_path)
    rgb_label = root / "annotations/validation/synthetic_val_00000000.png"
    Image.new("RGB", SIZE[::-1]).save(rgb_label)
    small_label = root / "annotations/validation/synthetic_val_00000001.png"
    save_label(small_label, np.zeros((5, 5), np.uint8))
    broken_image = root / "images/validation/synthetic_val_00000002.jpg"
    broken_image.write_bytes(b"not a jpeg")
    dataset = EvaluationDataModule([synthetic_spec()], root=str(root)).val_dataloader()[0].dataset
    with pytest.raises(DataError, match=rf"{rgb_label}: a label must be a single-channel"):
        dataset[0]
    with pytest.raises(DataError, match=rf"{small_label}: label size 5x5 differs from image"):
        dataset[1]
    with pytest.raises(DataError, match=rf"{broken_image}: unreadable image"):
        dataset[2]


# ------------------------------------------------------------------------------------------ image modes
def test_image_modes_decode_to_rgb_uint8(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    smooth = np.repeat(np.linspace(20, 230, 9, dtype=np.uint8)[None, :, None], 6, 0).repeat(3, 2)
    cases = {
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, 2), 0),
        "rgba.png": (Image.fromarray(np.dstack([rgb, gray])), rgb, 0),
        "gray16.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, 2), 0),
        "gray16.tif": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, 2), 0),
        "cmyk.jpg": (Image.fromarray(smooth).convert("CMYK"), smooth, 6),
        "la.png": (Image.fromarray(gray).convert("LA"), np.repeat(gray[..., None], 3, 2), 0),
        "palette.png": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), None, 0),
        "rgb.png": (Image.fromarray(rgb), rgb, 0),
    }
    for name, (image, expected, tolerance) in cases.items():
        path = tmp_path / name
        image.save(path, **({"quality": 100} if name.endswith(".jpg") else {}))
        if name == "cmyk.jpg":
            assert Image.open(path).mode == "CMYK"
        if name.startswith("gray16"):
            assert Image.open(path).mode == "I;16"
        decoded = decode_image(path).permute(1, 2, 0).numpy()
        assert decoded.dtype == np.uint8 and decoded.shape == (6, 9, 3), name
        if expected is None:
            expected = np.asarray(Image.open(path).convert("RGB"))
        assert np.abs(decoded.astype(int) - expected.astype(int)).mean() <= tolerance, name


def test_exif_orientation_is_applied_to_images_only(tmp_path):
    """As cv2 (mmseg) and detectron2's read_image: the image is turned upright, labels are not."""
    stored = np.random.default_rng(1).integers(0, 256, (9, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    assert np.array_equal(decode_image(tmp_path / "rotated.png").permute(1, 2, 0).numpy(), np.rot90(stored, k=-1))
    Image.fromarray(stored[..., 0]).save(tmp_path / "label.png", exif=exif)
    assert np.array_equal(decode_label(tmp_path / "label.png").numpy(), stored[..., 0])


def test_rotated_jpeg_is_served_upright_and_checked_by_its_upright_size(tmp_path, mmseg_root):
    """A JPEG stored sideways with EXIF orientation 6 (as phones write them) next to an upright label:
    the dataset serves the upright image, and ``data check`` (full decode or headers only) finds
    its size equal to the label's."""
    root = copy_root(mmseg_root, tmp_path)
    path = root / "images/validation/synthetic_val_00000001.jpg"
    upright = np.asarray(Image.open(path).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate the stored pixels 90 degrees clockwise
    Image.fromarray(np.rot90(upright)).save(path, quality=100, subsampling=0, exif=exif)  # stored turned left
    assert Image.open(path).size == (SIZE[0], SIZE[1])  # stored sideways
    dataset = EvaluationDataModule([synthetic_spec()], root=str(root)).val_dataloader()[0].dataset
    image = dataset[1]["image"].permute(1, 2, 0).numpy()
    assert image.shape == (*SIZE, 3)
    assert np.abs(image.astype(int) - upright.astype(int)).mean() < 2
    for decode_images in (True, False):
        report = check_benchmark(synthetic_spec(), root, decode_images=decode_images, progress=False)
        assert report.ok and report.images_ok == report.labels_ok == 5, report.problems


def test_label_modes(tmp_path):
    values = np.array([[0, 3], [300, 65535]])
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")
    assert decode_label(tmp_path / "i32.tif").tolist() == values.tolist()
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "u16.png")
    assert Image.open(tmp_path / "u16.png").mode == "I;16"
    assert decode_label(tmp_path / "u16.png").tolist() == values.tolist()  # 16-bit values kept
    save_label(tmp_path / "p.png", np.array([[1, 200]], np.uint8), palette=True)
    assert decode_label(tmp_path / "p.png").tolist() == [[1, 200]]


def test_data_error_is_the_decoders_error(tmp_path):
    """One error type: the decoder's errors are DataErrors (callers catching DataError see them)."""
    assert DataError is DecodeError and issubclass(DataError, ValueError)
    error = DataError(tmp_path / "x.png", "label values [6] are out of range")
    assert str(error) == f"{tmp_path / 'x.png'}: label values [6] are out of range"
    assert error.path == tmp_path / "x.png"
    assert DataError("whole message").path is None and str(DataError("whole message")) == "whole message"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'bad.png'}: unreadable label"):
        decode_label(tmp_path / "bad.png")


def test_label_decoder_accepts_decoded_int64_labels():
    decoder = LabelDecoder(5, 255, reduce_zero_label=True)
    raw = torch.tensor([[0, 1, 5, 255]])  # int64, as decode_label gives
    assert decoder(raw).tolist() == decoder(raw.numpy().astype(np.uint8)).tolist() == [[255, 0, 4, 255]]
    wide = LabelDecoder(300, 65535)
    assert wide(torch.tensor([[299, 65535, 0]])).tolist() == [[299, 65535, 0]]
    with pytest.raises(DataError, match=r"z\.tif: label values \[-1, 70000\]"):
        wide(torch.tensor([[-1, 70000, 3]]), "z.tif")


# ------------------------------------------------------------------------------------------ ovseg data check
def synthetic_yaml(path: Path, root: Path, **spec) -> Path:
    entry = {"name": "synthetic", "class_names": "class_names.txt", **spec}
    config = {
        "class_path": "ovseg.datamodules.EvaluationDataModule",
        "init_args": {"root": str(root), "batch_size": 2, "benchmarks": [entry]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_data_check_passes_on_a_clean_root(tmp_path, mmseg_root, capsys):
    config = synthetic_yaml(tmp_path / "data.yaml", mmseg_root)
    assert run(["data", "check", "--data", str(config), "--no-progress"]) is None
    out = capsys.readouterr().out
    assert "synthetic" in out and "no problems found" in out
    report = check_benchmark(
        spec_from_dict({"name": "s", "class_names": "class_names.txt"}), mmseg_root, progress=False
    )
    assert (report.samples, report.images_ok, report.labels_ok, report.classes) == (5, 5, 5, NUM_CLASSES)
    assert 0 < report.classes_present <= NUM_CLASSES and report.ok


def test_data_check_reports_broken_files_by_name(tmp_path, mmseg_root, capsys):
    root = copy_root(mmseg_root, tmp_path)
    truncated = root / "images/validation/synthetic_val_00000000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    out_of_range = root / "annotations/validation/synthetic_val_00000003.png"
    save_label(out_of_range, np.full(SIZE, 99, np.uint8))
    missing = root / "annotations/validation/synthetic_val_00000004.png"
    missing.unlink()
    config = synthetic_yaml(tmp_path / "data.yaml", tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as exit_info:
        run(["data", "check", "--data", str(config), "--root", str(root), "--no-progress", "--workers", "2"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out
    assert f"{truncated}: unreadable image" in out
    assert f"{out_of_range}: label values [99] are out of range" in out
    assert f"missing label for 'synthetic_val_00000004': {missing}" in out
    # a root that does not exist is reported too
    with pytest.raises(SystemExit):
        run(["data", "check", "--data", str(config), "--no-progress"])
    assert f"data directory {tmp_path / 'elsewhere'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ end to end
def test_validate_end_to_end_with_two_benchmarks(tmp_path, monkeypatch, world):
    monkeypatch.chdir(tmp_path)
    big = SyntheticWorld(image_size=(56, 84), seed=5)
    write_mmseg(big, tmp_path / "data/synthetic_mmseg", num_images=3, progress=False)
    write_mmseg(world, tmp_path / "data/small", num_images=2, progress=False)
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "class_path": "ovseg.datamodules.EvaluationDataModule",
                "init_args": {
                    "root": str(tmp_path / "data"),
                    "batch_size": 2,
                    "benchmarks": [
                        {
                            "name": "synthetic_eval",
                            "data_root": "synthetic_mmseg",
                            "class_names": "class_names.txt",
                            "unseen_classes": ["sand", "snow", "kite", "umbrella"],
                        },
                        {
                            "name": "small",
                            "data_root": "small",
                            "class_names": "class_names.txt",
                            "short_side": 56,
                            "window": 42,
                            "stride": 28,
                            "background_threshold": 0.3,
                        },
                    ],
                },
            }
        )
    )
    cli = run(
        [
            "validate",
            "-c",
            str(REPO / "configs/experiment/smoke.yaml"),
            "--data",
            str(config),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    for key in ("val/synthetic_eval/mIoU", "val/synthetic_eval/hIoU", "val/small/mIoU", "val/mIoU"):
        assert key in metrics and 0.0 <= float(metrics[key]) <= 100.0, key
