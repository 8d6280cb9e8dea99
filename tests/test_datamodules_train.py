"""Training data: decoding, joint transforms, COCO Captions / COCO-Stuff / WebDataset DataModules,
``ovseg data make-shards`` / ``extract-concepts``, bad inputs (skipped and counted, or an error
naming the file), and SimZSS steps on shards made from the synthetic world."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import run
from ovseg.concepts import ConceptCache, ConceptExtractor, concept_meta
from ovseg.datamodules.coco_captions import CocoCaptionsDataModule, read_coco_captions
from ovseg.datamodules.coco_stuff import COCO_STUFF_UNSEEN, CocoStuffDataModule
from ovseg.datamodules.decode import DecodeError, SkipCounter, decode_image, decode_label
from ovseg.datamodules.synthetic import SyntheticWorld
from ovseg.datamodules.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ResizeShortSide,
)
from ovseg.datamodules.webdataset import WebDatasetDataModule, WebDatasetStream
from ovseg.prepare.synthetic import write_coco_captions, write_coco_stuff, write_webdataset
from ovseg.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
N_COCO, N_STUFF, N_WDS, SHARD = 12, 6, 12, 4
JPEG_MEAN_TOL = 8.0  # mean |decoded - generated| of a quality-95 JPEG of a noisy synthetic scene is ~5
IDENTITY = Compose([])


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def data(tmp_path_factory, world) -> dict[str, Path]:
    """The synthetic world written once in every real format this file reads."""
    base = tmp_path_factory.mktemp("data")
    write_coco_captions(world, base / "coco", "train2017", N_COCO, progress=False)
    write_coco_stuff(world, base / "stuff", "train2017", N_STUFF, progress=False)
    write_coco_stuff(world, base / "stuff", "val2017", 2, progress=False)
    write_webdataset(world, base / "wds", N_WDS, shard_size=SHARD, progress=False)
    return {"base": base, "coco": base / "coco", "stuff": base / "stuff", "wds": base / "wds"}


@pytest.fixture(scope="module")
def extractor32() -> ConceptExtractor:
    return ConceptExtractor(context_length=32)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def scene_of_file(world: SyntheticWorld, file_name: str, split: str = "train2017"):
    """The scene behind a COCO-style ``000000000007.jpg`` (image id = index + 1 for train)."""
    return world.scene(int(Path(file_name).stem) - 1, split)


def jpeg_close(decoded: torch.Tensor, expected: np.ndarray) -> bool:
    diff = (decoded.permute(1, 2, 0).float() - torch.from_numpy(expected).float()).abs().mean()
    return float(diff) < JPEG_MEAN_TOL


def rewrite_tar(path: Path, replace: dict[str, bytes | None]) -> None:
    """Rewrite a shard with some members' bytes replaced (None: member removed)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            payload = replace.get(member.name, payload)
            if payload is None:
                continue
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def one_pass(stream: WebDatasetStream) -> list[dict]:
    """Every sample of one pass (batch_size 1, no epoch length), unbatched."""
    out = []
    for batch in stream:
        out.append({k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()})
    return out


# ------------------------------------------------------------------------------------ decoding
def test_decode_every_image_mode_to_rgb_uint8_and_labels_as_raw_indices():
    rgb = (np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3)
    gray = Image.fromarray(rgb[..., 0])
    cases = {
        "gray": (
            encoded(gray, "PNG"),
            lambda t: torch.equal(t[0], t[1]) and torch.equal(t[0], torch.from_numpy(rgb[..., 0])),
        ),
        "rgba": (
            encoded(Image.fromarray(rgb).convert("RGBA"), "PNG"),
            lambda t: torch.equal(t, torch.from_numpy(rgb).permute(2, 0, 1)),
        ),
        "cmyk": (encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), lambda t: t.float().std() > 10),
        "palette": (encoded(Image.fromarray(rgb).quantize(16), "PNG"), lambda t: t.shape == (3, 24, 32)),
    }
    for name, (payload, check) in cases.items():
        image = decode_image(payload, name=name)
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 32), name
        assert check(image), name
    # 16-bit grayscale is rescaled (65535 -> 255), not clipped: v >> 8, as OpenCV (so mmseg) does
    values = np.linspace(0, 65535, 24 * 32).astype(np.uint16).reshape(24, 32)
    image16 = decode_image(encoded(Image.fromarray(values), "PNG"))
    assert torch.equal(image16[0], torch.from_numpy((values >> 8).astype(np.uint8)))
    # palette label PNG: indices, not luminance
    indices = (np.arange(24 * 32) % 7).astype(np.uint8).reshape(24, 32)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([255, 255, 255] * 256)  # every index is white: convert('L') would give 255
    assert torch.equal(decode_label(encoded(palette, "PNG")), torch.from_numpy(indices.astype(np.int64)))
    with pytest.raises(DecodeError, match="label.png.*single-channel"):
        decode_label(encoded(Image.fromarray(rgb), "PNG"), name="label.png")


def test_decode_errors_name_the_file(tmp_path):
    jpeg = encoded(Image.fromarray(np.full((16, 16, 3), 128, np.uint8)), "JPEG")
    for payload in (b"", b"not an image", jpeg[: len(jpeg) // 2]):
        with pytest.raises(DecodeError, match="shard.tar:000000001.jpg"):
            decode_image(payload, name="shard.tar:000000001.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DecodeError, match="broken.jpg"):
        decode_image(bad)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        decode_label(tmp_path / "absent.png")


# ---------------------------------------------------------------------------------- transforms
def block_sample(h: int = 96, w: int = 128) -> dict:
    """Label of 16-px blocks with values 0..9; image channel 0 = 20 * label (aligned with it)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = ((yy // 16) * 3 + (xx // 16)) % 10
    label[:4, :4] = 255
    image = torch.stack([label.clamp(max=10) * 20, xx % 256, yy % 256]).to(torch.uint8)
    return {"image": image, "label": label.long(), "caption": "kept"}


def test_random_resized_crop_moves_image_and_label_together():
    sample = block_sample()
    out = RandomResizedCrop(64, scale=(0.3, 0.6))(sample)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    assert out["label"].shape == (64, 64) and out["label"].dtype == torch.int64
    assert out["caption"] == "kept" and sample["image"].shape == (3, 96, 128)  # input untouched
    assert set(out["label"].unique().tolist()) <= set(sample["label"].unique().tolist())
    valid = out["label"] != 255
    agree = (out["image"][0][valid].float() / 20 - out["label"][valid].float()).abs() < 0.5
    assert agree.float().mean() > 0.8  # bicubic image and nearest label stay aligned
    torch.manual_seed(3)
    a = RandomResizedCrop(48)(sample)
    torch.manual_seed(3)
    b = RandomResizedCrop(48)(sample)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # an image smaller than the output is upsampled
    small = RandomResizedCrop(200)(block_sample(40, 30))
    assert small["image"].shape == (3, 200, 200) and small["label"].shape == (200, 200)


def test_resize_crop_pad_and_flip_keep_label_values():
    sample = block_sample(40, 80)
    resized = ResizeShortSide([32], max_long_side=60)(sample)
    assert resized["image"].shape == (3, 30, 60) and resized["label"].shape == (30, 60)
    assert set(resized["label"].unique().tolist()) <= set(sample["label"].unique().tolist())
    assert ResizeShortSide(80)(sample)["label"].shape == (80, 160)

    padded = RandomCrop(64)(block_sample(40, 50))  # smaller than the crop: padded, not resized
    assert padded["image"].shape == (3, 64, 64) and padded["label"].shape == (64, 64)
    assert torch.equal(padded["label"][:40, :50], block_sample(40, 50)["label"])
    assert bool((padded["label"][40:] == 255).all() and (padded["image"][:, :, 50:] == 0).all())

    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    assert torch.equal(flipped["label"], sample["label"].flip(-1))
    assert RandomHorizontalFlip(p=0.0)(sample)["label"] is sample["label"]

    # cat_max_ratio redraws crops that are (almost) one class
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:, 56:] = 1
    mixed = {"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "label": label}

    def two_classes(ratio):
        crops = [RandomCrop(16, cat_max_ratio=ratio)(mixed)["label"] for _ in range(30)]
        return sum(len(c.unique()) > 1 for c in crops)

    assert two_classes(0.95) > two_classes(None)

    pipeline = Compose([ResizeShortSide(48), RandomCrop(32), RandomHorizontalFlip()])
    out = pipeline(block_sample())
    assert out["image"].shape == (3, 32, 32) and out["label"].shape == (32, 32)
    with pytest.raises(ValueError, match="sizes differ"):
        RandomCrop(8)({"image": torch.zeros(3, 10, 10, dtype=torch.uint8), "label": torch.zeros(9, 10)})


# ------------------------------------------------------------------------------- COCO Captions
def test_coco_captions_round_trip(data, world):
    dm = CocoCaptionsDataModule(str(data["coco"]), batch_size=4, num_workers=0, transform=IDENTITY)
    dm.setup("fit")
    dataset = dm.train_set
    assert len(dataset) == N_COCO and dm.benchmarks == [] and dm.val_dataloader() == []
    drawn = set()
    for index in range(N_COCO):
        sample = dataset[index]
        scene = scene_of_file(world, dataset.index.file_names[index])
        assert jpeg_close(sample["image"], scene.image)
        assert sample["caption"] in scene.captions
        drawn.add(sample["caption"])
    # a new caption per visit, reproducibly under torch's seed
    torch.manual_seed(1)
    first = [dataset[0]["caption"] for _ in range(20)]
    torch.manual_seed(1)
    assert first == [dataset[0]["caption"] for _ in range(20)]
    assert len(set(first)) > 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 112, 112) and len(batch["caption"]) == 4
    assert CocoCaptionsDataModule(str(data["coco"])).transform.size == (224, 224)  # SimZSS default


def test_coco_precomputed_concepts_equal_on_the_fly(data, tmp_path, extractor32):
    root = copy(data["coco"], tmp_path / "coco")
    annotations = root / "annotations" / "captions_train2017.json"
    run(["data", "extract-concepts", "--coco", str(annotations), "--context-length", "32", "--no-progress"])
    cache_file = root / "annotations" / "captions_train2017.concepts.pt"
    assert cache_file.is_file()
    dm = CocoCaptionsDataModule(str(root), concepts="auto", num_workers=0, transform=IDENTITY)
    dm.setup("fit")
    for index in range(N_COCO):
        sample = dm.train_set[index]
        expected = extractor32.encode(sample["caption"])
        for key, value in expected.items():
            assert torch.equal(sample[key], value), (index, key)
    ConceptCache.load(cache_file).check_compatible(extractor32)
    with pytest.raises(ValueError, match="context_length: stored 32, model 77"):
        ConceptCache.load(cache_file).check_compatible(ConceptExtractor())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CocoCaptionsDataModule(str(root), concepts=str(root / "missing.pt")).setup("fit")


def test_coco_odd_image_modes_are_decoded_to_rgb(data, tmp_path, world):
    root = copy(data["coco"], tmp_path / "coco")
    names = sorted(p.name for p in (root / "train2017").iterdir())
    rgb = Image.fromarray(scene_of_file(world, names[0]).image)
    replaced = {
        names[0]: encoded(rgb.convert("L"), "JPEG"),
        names[1]: encoded(rgb.convert("RGBA"), "PNG"),
        names[2]: encoded(rgb.convert("CMYK"), "JPEG"),
        names[3]: encoded(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
    }
    for name, payload in replaced.items():
        (root / "train2017" / name).write_bytes(payload)
    dm = CocoCaptionsDataModule(str(root), num_workers=0, transform=RandomResizedCrop(32))
    dm.setup("fit")
    by_name = {n: i for i, n in enumerate(dm.train_set.index.file_names)}
    for name in replaced:
        image = dm.train_set[by_name[name]]["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    gray = CocoCaptionsDataModule(str(root), num_workers=0, transform=IDENTITY)
    gray.setup("fit")
    image = gray.train_set[by_name[names[3]]]["image"]  # 16-bit: equal to the 8-bit gray
    assert torch.equal(image[0], torch.from_numpy(np.array(rgb.convert("L"))))
    assert dm.skipped == 0


def test_coco_bad_inputs(data, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="captions_val2099.json"):
        CocoCaptionsDataModule(str(data["coco"]), train_annotations="annotations/captions_val2099.json").setup("fit")

    root = copy(data["coco"], tmp_path / "coco")
    annotations = root / "annotations" / "captions_train2017.json"
    doc = json.loads(annotations.read_text())
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "annotations": [{"caption": "x"}]}))
    with pytest.raises(ValueError, match="bad.json.*malformed"):
        read_coco_captions(tmp_path / "bad.json")
    doc["annotations"][0]["caption"] = "   "
    annotations.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="ovseg.data"):
        index = read_coco_captions(annotations)
    assert index.empty_captions == 1 and "1 empty caption" in caplog.text
    assert all(c.strip() for caps in index.captions for c in caps)
    assert sum(map(len, index.captions)) == len(doc["annotations"]) - 1

    names = sorted(p.name for p in (root / "train2017").iterdir())
    full = (root / "train2017" / names[1]).read_bytes()
    (root / "train2017" / names[1]).write_bytes(full[: len(full) // 3])  # corrupt JPEG
    dm = CocoCaptionsDataModule(str(root), num_workers=0, transform=IDENTITY)
    dm.setup("fit")
    corrupt = dm.train_set.index.file_names.index(names[1])
    with caplog.at_level(logging.WARNING, logger="ovseg.data"):
        sample = dm.train_set[corrupt]  # another image instead
    assert sample["index"] != corrupt and dm.skipped == 1 and names[1] in caplog.text
    strict = CocoCaptionsDataModule(str(root), num_workers=0, transform=IDENTITY)
    strict.setup("fit")
    strict.train_set.skip_corrupt = False
    with pytest.raises(DecodeError, match=names[1]):
        strict.train_set[corrupt]

    (root / "train2017" / names[2]).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of {N_COCO} images.*{names[2]}"):
        CocoCaptionsDataModule(str(root)).setup("fit")


# ---------------------------------------------------------------------------------- COCO-Stuff
def test_coco_stuff_labels_zero_shot_and_validation(data, world):
    unseen = [i for i, c in enumerate(world.categories) if not c.seen]
    assert unseen
    plain = CocoStuffDataModule(str(data["stuff"]), zero_shot=False, transform=IDENTITY, num_workers=0)
    zero = CocoStuffDataModule(str(data["stuff"]), zero_shot=True, transform=IDENTITY, num_workers=0)
    plain.setup("fit")
    zero.setup("fit")
    assert zero.num_classes == len(world.categories) and zero.unseen_indices == unseen
    seen_unseen = 0
    for index in range(N_STUFF):
        stem = plain.train_set.stems[index]
        scene = scene_of_file(world, stem + ".jpg")
        a, b = plain.train_set[index], zero.train_set[index]
        assert jpeg_close(a["image"], scene.image)
        assert torch.equal(a["label"], torch.from_numpy(scene.label.astype(np.int64)))
        is_unseen = torch.isin(a["label"], torch.tensor(unseen))
        seen_unseen += int(is_unseen.sum())
        assert bool((b["label"][is_unseen] == 255).all())
        assert torch.equal(b["label"][~is_unseen], a["label"][~is_unseen])
        assert torch.equal(a["image"], b["image"])  # images are kept
    assert seen_unseen > 0, "the test data should contain unseen classes"
    # validation: all classes, seen/unseen reported
    (benchmark,) = zero.benchmarks
    assert benchmark.name == "coco_stuff" and set(benchmark.unseen_indices) == set(unseen)
    (loader,) = zero.val_dataloader()
    batch = next(iter(loader))
    assert batch["label"].shape[-2:] == (112, 112)
    # the default training pipeline crops 640 (padding the 112-px scenes with ignore)
    default = CocoStuffDataModule(str(data["stuff"]), num_workers=0, batch_size=2)
    batch = next(iter(default.train_dataloader()))
    assert batch["image"].shape == (2, 3, 640, 640) and batch["label"].shape == (2, 640, 640)


def test_coco_stuff_packaged_classes_and_zegformer_split():
    vocabulary = Vocabulary.from_file("packaged:coco_stuff")
    assert len(vocabulary) == 171
    # SPNet novel_cls (0-based raw COCO-Stuff ids) -> contiguous trainIds (11 unused ids removed)
    novel = [20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171]
    unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    train_ids = sorted(n - sum(u < n for u in unused) for n in novel)
    assert sorted(vocabulary.index_of(name) for name in COCO_STUFF_UNSEEN) == train_ids


def test_coco_stuff_bad_inputs(data, tmp_path):
    root = copy(data["stuff"], tmp_path / "stuff")
    label_dir = root / "annotations" / "train2017"
    labels = sorted(label_dir.iterdir())
    array = np.asarray(Image.open(labels[0])).copy()
    array[0, :3] = [16, 200, 254]  # 16 classes: 16 and 200 are out of range, 254 too
    Image.fromarray(array).save(labels[0])
    dm = CocoStuffDataModule(str(root), transform=IDENTITY, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"{labels[0].name}.*\[16, 200, 254\].*0\.\.15"):
        dm.train_set[0]
    labels[1].unlink()
    with pytest.raises(FileNotFoundError, match=labels[1].name):
        CocoStuffDataModule(str(root)).setup("fit")
    with pytest.raises(ValueError, match="unseen class 'unicorn'"):
        CocoStuffDataModule(str(root), unseen_classes=["unicorn"])


# ---------------------------------------------------------------------------------- WebDataset
def test_webdataset_round_trip_with_labels_and_epochs(data, world):
    stream = WebDatasetStream(
        str(data["wds"] / "{00000..00002}.tar"),
        batch_size=1,
        shuffle_buffer=0,
        shard_shuffle=0,
        transform=IDENTITY,
        with_labels=True,
    )
    samples = one_pass(stream)
    assert len(samples) == N_WDS and stream.skips.value == 0
    for sample in samples:
        index = int(sample["key"][:5]) * SHARD + int(sample["key"][5:])
        scene = world.scene(index)
        assert jpeg_close(sample["image"], scene.image)
        assert sample["caption"] in scene.captions
        assert torch.equal(sample["label"], torch.from_numpy(scene.label.astype(np.int64)))
    # epoch_length: samples per epoch per process, whatever the workers
    dm = WebDatasetDataModule(
        str(data["wds"] / "{00000..00002}.tar"),
        epoch_length=8,
        batch_size=2,
        num_workers=2,
        transform=RandomResizedCrop(56),
    )
    loader = dm.train_dataloader()
    assert len(loader) == 4
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 4 and all(b["image"].shape == (2, 3, 56, 56) for b in batches)
    assert "concept_labels" not in batches[0]  # these shards store no concepts
    # with ignore classes (the zero-shot split)
    unseen = [i for i, c in enumerate(world.categories) if not c.seen]
    zero = one_pass(
        WebDatasetStream(
            str(data["wds"] / "00000.tar"),
            1,
            shuffle_buffer=0,
            transform=IDENTITY,
            with_labels=True,
            with_captions=False,
            ignore_classes=unseen,
            num_classes=len(world.categories),
        )
    )
    for sample in zero:
        assert not bool(torch.isin(sample["label"], torch.tensor(unseen)).any())
        assert "caption" not in sample


def test_webdataset_bad_samples_are_skipped_and_counted(data, tmp_path, world, caplog):
    root = copy(data["wds"], tmp_path / "wds")
    jpeg = root / "00000.tar"
    with tarfile.open(jpeg) as tar:
        good = tar.extractfile("000000001.jpg").read()
    rewrite_tar(
        root / "00000.tar",
        {
            "000000001.jpg": good[: len(good) // 2],  # corrupt JPEG
            "000000002.txt": b"  ",
        },
    )  # empty caption
    label = np.full((112, 112), 77, np.uint8)
    rewrite_tar(
        root / "00002.tar", {"000020000.seg.png": encoded(Image.fromarray(label), "PNG"), "000020002.seg.png": None}
    )  # missing label map
    size = (root / "00001.tar").stat().st_size
    with open(root / "00001.tar", "r+b") as f:  # truncated tar
        f.truncate(size // 2)

    urls = str(root / "{00000..00002}.tar")
    with caplog.at_level(logging.WARNING, logger="ovseg.data"):
        stream = WebDatasetStream(
            urls,
            1,
            shuffle_buffer=0,
            transform=IDENTITY,
            with_labels=True,
            num_classes=len(world.categories),
            random_caption=False,
        )
        samples = one_pass(stream)
    keys = {s["key"] for s in samples}
    assert {"000000001", "000000002", "000020000", "000020002"}.isdisjoint(keys)
    assert {"000000000", "000000003", "000020001", "000020003"} <= keys
    assert 4 <= len(samples) < N_WDS - 4
    assert stream.skips.value >= 5
    assert "000000001.jpg" in caplog.text and "empty caption" in caplog.text
    assert "000020002: no .seg.png label map" in caplog.text
    assert "label values [77]" in caplog.text and "so far" in caplog.text

    # the count is shared by DataLoader workers and exposed by the DataModule; training goes on
    dm = WebDatasetDataModule(
        urls,
        epoch_length=12,
        batch_size=2,
        num_workers=2,
        transform=RandomResizedCrop(32),
        with_labels=True,
        num_classes=len(world.categories),
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and dm.skipped >= 4

    # a shard where nothing is usable does not loop forever
    (root / "broken.tar").write_bytes(b"\0" * 10)
    dead = WebDatasetStream(str(root / "broken.tar"), 1, epoch_length=2, transform=IDENTITY)
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(dead)


def test_make_shards_concepts_and_simzss_steps(data, tmp_path, monkeypatch, extractor32):
    coco = data["coco"]
    out = tmp_path / "shards"
    run(
        [
            "data",
            "make-shards",
            "--coco-captions",
            str(coco / "annotations/captions_train2017.json"),
            "--images",
            str(coco / "train2017"),
            "--out",
            str(out),
            "--shard-size",
            "5",
            "--concepts",
            "--context-length",
            "32",
            "--no-progress",
        ]
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    urls = str(out / "{00000..00002}.tar")
    stream = WebDatasetStream(
        urls, 1, shuffle_buffer=0, transform=IDENTITY, expected_concept_meta=concept_meta(extractor32)
    )
    samples = one_pass(stream)
    assert len(samples) == N_COCO
    for sample in samples:
        expected = extractor32.encode(sample["caption"])
        for key, value in expected.items():
            assert torch.equal(sample[key], value), key
    # concepts stored for another context length are not used
    other = one_pass(
        WebDatasetStream(
            urls, 1, shuffle_buffer=0, transform=IDENTITY, expected_concept_meta=concept_meta(ConceptExtractor())
        )
    )
    assert all("concept_labels" not in s for s in other)

    monkeypatch.chdir(tmp_path)
    # The shipped shard config, with tiny encoders (tests/fast) and the shards just written.
    cli = run(
        [
            "fit",
            "-c",
            str(REPO / "configs/simzss/wds_vitb14.yaml"),
            "-c",
            str(REPO / "tests/fast/simzss.yaml"),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32-true",
            "--data.init_args.urls",
            urls,
            "--data.init_args.resampled",
            "false",
            "--data.init_args.epoch_length",
            "8",
            "--data.init_args.batch_size",
            "4",
            "--model.init_args.concept_rules",
            "ovseg",  # the rules the shards' concepts were made with
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.transform",
            "ovseg.datamodules.transforms.RandomResizedCrop",
            "--data.init_args.transform.init_args.size",
            "56",
            "--data.init_args.eval_data",
            "ovseg.datamodules.SyntheticDataModule",
            "--data.init_args.eval_data.init_args.num_train",
            "0",
            "--data.init_args.eval_data.init_args.num_val",
            "2",
        ]
    )
    assert cli.trainer.global_step == 2 and "val/mIoU" in cli.trainer.callback_metrics
    assert cli.model._concept_cache == {}  # stored concepts were used, none extracted on the fly
    assert cli.datamodule.skipped == 0


def test_extract_concepts_rewrites_shards_atomically(data, tmp_path, extractor32):
    root = copy(data["wds"], tmp_path / "wds")
    with tarfile.open(root / "00000.tar") as tar:
        before = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        order = [m.name for m in tar.getmembers()]
    truncated = root / "00002.tar"
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 3)
    broken = truncated.read_bytes()
    with pytest.raises(SystemExit, match="00002.tar"):
        run(
            [
                "data",
                "extract-concepts",
                "--shards",
                str(root / "{00000..00002}.tar"),
                "--context-length",
                "32",
                "--no-progress",
            ]
        )
    assert truncated.read_bytes() == broken  # left unchanged
    with tarfile.open(root / "00000.tar") as tar:
        after = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert [m.name for m in tar.getmembers()] == order
    for name, payload in before.items():
        if not name.endswith(".json"):
            assert after[name] == payload
    samples = one_pass(
        WebDatasetStream(
            str(root / "{00000..00001}.tar"),
            1,
            shuffle_buffer=0,
            transform=IDENTITY,
            expected_concept_meta=concept_meta(extractor32),
        )
    )
    assert len(samples) == 2 * SHARD
    for sample in samples:  # a random one of the five captions, with its own concepts
        for key, value in extractor32.encode(sample["caption"]).items():
            assert torch.equal(sample[key], value)


def test_make_shards_from_coco_stuff(data, tmp_path, world):
    out = tmp_path / "stuff_shards"
    run(
        [
            "data",
            "make-shards",
            "--coco-stuff",
            str(data["stuff"]),
            "--split",
            "train2017",
            "--out",
            str(out),
            "--shard-size",
            "4",
            "--no-progress",
        ]
    )
    samples = one_pass(
        WebDatasetStream(
            str(out / "{00000..00001}.tar"),
            1,
            shuffle_buffer=0,
            transform=IDENTITY,
            with_captions=False,
            with_labels=True,
            num_classes=16,
        )
    )
    assert len(samples) == N_STUFF
    stems = sorted(p.stem for p in (data["stuff"] / "images" / "train2017").iterdir())
    for sample in samples:
        index = int(sample["key"][:5]) * 4 + int(sample["key"][5:])
        scene = scene_of_file(world, stems[index] + ".jpg")
        assert torch.equal(sample["label"], torch.from_numpy(scene.label.astype(np.int64)))
    with pytest.raises(SystemExit, match="--images"):
        run(["data", "make-shards", "--coco-captions", "x.json", "--out", str(out)])


def test_skip_counter_is_shared_with_child_processes():
    counter = SkipCounter("sample", max_warnings=0)
    ctx = torch.multiprocessing.get_context("fork")
    processes = [ctx.Process(target=counter.add, args=("bad",)) for _ in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    counter.add("bad")
    assert counter.value == 4
