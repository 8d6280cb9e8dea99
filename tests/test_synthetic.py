"""The synthetic world: determinism, labels, captions, learnability and the on-disk writers."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.datamodules.base import collate_samples
from ovseg.datamodules.synthetic import (
    CATEGORIES,
    IGNORE_INDEX,
    PLAIN_BACKGROUND,
    SyntheticDataModule,
    SyntheticDataset,
    SyntheticWorld,
    caption_choice,
    plural,
)
from ovseg.prepare.synthetic import (
    make_synthetic,
    write_coco_captions,
    write_coco_stuff,
    write_mmseg,
    write_webdataset,
)

BANK_PATH = Path(__file__).resolve().parents[1] / "ovseg" / "resources" / "simzss_concept_bank.txt"
BANK = {line.strip().lower() for line in BANK_PATH.read_text().splitlines() if line.strip()}
N_SCENES = 200


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def scenes(world):
    return [world.scene(i) for i in range(N_SCENES)]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _singulars(word: str) -> set[str]:
    out = {word}
    if word.endswith("ies"):
        out.add(word[:-3] + "y")
    if word.endswith("es"):
        out.add(word[:-2])
    if word.endswith("s"):
        out.add(word[:-1])
    return out


def _bank_hits(caption: str) -> set[str]:
    """Bank entries (1-3 words, head singular or plural) that occur in a caption."""
    words = _words(caption)
    hits = set()
    for n in (1, 2, 3):
        for i in range(len(words) - n + 1):
            head = words[i + n - 1]
            for s in _singulars(head):
                phrase = " ".join(words[i : i + n - 1] + [s])
                if phrase in BANK:
                    hits.add(phrase)
    return hits


def _term_pattern(term: str) -> re.Pattern:
    return re.compile(rf"\b({re.escape(term)}|{re.escape(plural(term))})\b")


# ------------------------------------------------------------------------------ categories
def test_category_table():
    assert len(CATEGORIES) >= 16
    names = [c.name for c in CATEGORIES]
    assert len(set(names)) == len(names)
    kinds = Counter(c.kind for c in CATEGORIES)
    assert kinds["stuff"] >= 5 and kinds["thing"] >= 5
    for c in CATEGORIES:
        assert c.name in BANK, f"{c.name} is not in the SimZSS concept bank"
        for syn in c.synonyms:  # synonyms must not be another bank concept
            assert syn not in BANK and syn not in names, syn
        assert (c.shape is None) == (c.kind == "stuff")
        assert c.name.isascii() and c.name == c.name.lower()
    # colours all distinct and well separated; textures distinct; thing shapes distinct
    pal = np.array([c.color for c in CATEGORIES], dtype=np.float64)
    dist = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1)) + np.eye(len(pal)) * 1e9
    assert dist.min() > 60
    assert len({c.texture for c in CATEGORIES}) == len(CATEGORIES)
    shapes = [c.shape for c in CATEGORIES if c.kind == "thing"]
    assert len(set(shapes)) == len(shapes)
    unseen = [c for c in CATEGORIES if not c.seen]
    # the zero-shot split: at least 2 unseen stuff and 2 unseen things (issue 17), most classes seen
    assert Counter(c.kind for c in unseen)["stuff"] >= 2 and Counter(c.kind for c in unseen)["thing"] >= 2
    assert len(unseen) <= len(CATEGORIES) // 3


def test_close_ups_are_one_category_on_the_plain_background():
    """close_up_fraction: that share of training scenes shows one category on PLAIN_BACKGROUND
    (label 255), captions naming it; other scenes, and every validation scene, are unchanged."""
    plain, mixed = SyntheticWorld(image_size=64), SyntheticWorld(image_size=64, close_up_fraction=0.5)
    close_ups = 0
    for index in range(60):
        scene = mixed.scene(index)
        if len(scene.present) == 1 and (scene.label == 255).mean() > 0.15:
            close_ups += 1
            (cat,) = scene.present
            background = scene.label == 255
            edge = np.zeros_like(background)  # pixels next to the category are the ignore band too
            edge[1:-1, 1:-1] = background[1:-1, 1:-1] & background[:-2, 1:-1] & background[2:, 1:-1]
            assert (scene.image[edge] == np.array(PLAIN_BACKGROUND, np.uint8)).all()
            assert set(np.unique(scene.label)) <= {cat, 255} and (scene.label == cat).mean() > 0.1
            names = (CATEGORIES[cat].name, *CATEGORIES[cat].synonyms)
            assert all(any(_term_pattern(n).search(caption) for n in names) for caption in scene.captions)
    assert 15 <= close_ups <= 45
    for index in range(10):
        assert np.array_equal(mixed.scene(index, "val").image, plain.scene(index, "val").image)
    with pytest.raises(ValueError, match="close_up_fraction"):
        SyntheticWorld(close_up_fraction=1.5)


def test_unseen_in_training_modes():
    """``unseen_in_training``: "labelled" keeps every training label, "ignored" turns unseen pixels
    into 255 in the same images, "absent" draws training scenes from the seen categories only;
    validation scenes are the same in all three, and only "labelled" trains on the unseen classes."""
    modes = {m: SyntheticDataModule(num_train=40, num_val=4, image_size=48, unseen_in_training=m) for m in
             ("labelled", "ignored", "absent")}  # fmt: skip
    unseen = torch.tensor(modes["labelled"].unseen_indices)
    shown = {m: torch.zeros(len(CATEGORIES), dtype=torch.bool) for m in modes}
    for index in range(40):
        items = {m: dm.train_dataset()[index] for m, dm in modes.items()}
        for m, item in items.items():
            present = item["label"].unique()
            shown[m][present[present != 255]] = True
        labelled, ignored = items["labelled"], items["ignored"]
        assert torch.equal(labelled["image"], ignored["image"])
        is_unseen = torch.isin(labelled["label"], unseen)
        assert bool((ignored["label"][is_unseen] == 255).all())
        assert torch.equal(ignored["label"][~is_unseen], labelled["label"][~is_unseen])
    assert shown["labelled"][unseen].all() and not shown["ignored"][unseen].any()
    assert not shown["absent"][unseen].any() and shown["absent"].sum() == len(CATEGORIES) - len(unseen)
    for index in range(4):
        images = [dm.val_dataloader().dataset[index]["image"] for dm in modes.values()]
        assert all(torch.equal(images[0], other) for other in images[1:])
    assert modes["labelled"].training_classes.unseen_classes == ()
    assert len(modes["absent"].training_classes.unseen_classes) == len(unseen)
    with pytest.raises(ValueError, match="unseen_in_training"):
        SyntheticDataModule(unseen_in_training="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no stuff"):
        SyntheticWorld(excluded_from_training=[i for i, c in enumerate(CATEGORIES) if c.kind == "stuff"])


def test_vocabulary_helpers(world):
    assert world.num_classes == len(CATEGORIES)
    assert world.class_names == [c.name for c in CATEGORIES]
    assert sorted(world.seen_indices + world.unseen_indices) == list(range(world.num_classes))
    assert world.vocabulary_lines()[0].split(", ")[0] == CATEGORIES[0].name
    assert world.palette.shape == (world.num_classes, 3) and world.palette.dtype == np.uint8


# ------------------------------------------------------------------------------ scenes
def test_scene_is_deterministic_and_seeded():
    state = np.random.get_state()[1].copy()
    a, b = SyntheticWorld(seed=0).scene(7), SyntheticWorld(seed=0).scene(7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.captions == b.captions and a.present == b.present
    c = SyntheticWorld(seed=1).scene(7)
    assert not np.array_equal(a.image, c.image)
    d = SyntheticWorld(seed=0).scene(8)
    assert not np.array_equal(a.image, d.image)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # no global RNG use


def test_scene_shapes_and_labels(world, scenes):
    valid = set(range(world.num_classes)) | {IGNORE_INDEX}
    ignore_frac = []
    for s in scenes:
        assert s.image.shape == (112, 112, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (112, 112) and s.label.dtype == np.uint8
        assert set(np.unique(s.label).tolist()) <= valid
        area = np.bincount(s.label[s.label != IGNORE_INDEX], minlength=world.num_classes)
        # present: exactly the categories with pixels, largest first (area before the ignore band)
        assert set(s.present) >= {int(k) for k in np.nonzero(area)[0]}
        assert len(s.captions) == 5
        ignore_frac.append(np.mean(s.label == IGNORE_INDEX))
    assert 0.005 < np.mean(ignore_frac) < 0.12  # a thin band, not whole regions
    # without the band there is no ignore label; present is sorted by area
    s = SyntheticWorld(ignore_boundary=False).scene(3)
    assert IGNORE_INDEX not in s.label
    area = np.bincount(s.label.ravel(), minlength=len(CATEGORIES))
    assert s.present == sorted(s.present, key=lambda k: -area[k])
    assert set(s.present) == set(np.nonzero(area)[0].tolist())


def test_ignore_band_is_one_pixel(world):
    s0, s1 = SyntheticWorld(ignore_boundary=False).scene(5), world.scene(5)
    np.testing.assert_array_equal(s0.image, s1.image)
    changed = s1.label != s0.label
    assert np.all(s1.label[changed] == IGNORE_INDEX)
    # every ignored pixel sits next to a pixel of another category (to its right or below)
    lab = s0.label
    edge = np.zeros_like(changed)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1] |= lab[:-1] != lab[1:]
    np.testing.assert_array_equal(changed, edge)


def test_configurable_size_and_objects():
    w = SyntheticWorld(image_size=(64, 96), min_objects=0, max_objects=0, seed=3)
    s = w.scene(0)
    assert s.image.shape == (64, 96, 3) and s.label.shape == (64, 96)
    for i in range(20):
        assert all(CATEGORIES[k].kind == "stuff" for k in w.scene(i).present)
    w = SyntheticWorld(image_size=224, min_objects=3, max_objects=6)
    s = w.scene(1)
    assert s.image.shape == (224, 224, 3)
    with pytest.raises(ValueError):
        SyntheticWorld(min_objects=3, max_objects=2)


def test_every_category_appears(world, scenes):
    seen_in_image, seen_in_caption = Counter(), Counter()
    for s in scenes:
        seen_in_image.update(s.present)
        for cap in s.captions:
            for k in s.present:
                if _term_pattern(CATEGORIES[k].name).search(cap):
                    seen_in_caption[k] += 1
    for k, c in enumerate(CATEGORIES):
        assert seen_in_image[k] >= 0.05 * N_SCENES, c.name
        assert seen_in_caption[k] >= 0.05 * N_SCENES, c.name
    # things come in several instances sometimes
    assert any(n >= 2 for s in scenes for k, n in s.counts.items() if CATEGORIES[k].kind == "thing")


# ------------------------------------------------------------------------------ captions
def test_captions_mention_only_present_categories(scenes):
    names = {c.name for c in CATEGORIES}
    with_name = total = 0
    for s in scenes:
        present = {CATEGORIES[k].name for k in s.present}
        for cap in s.captions:
            total += 1
            assert cap.isascii() and cap == cap.lower() and cap.strip() == cap
            for c in CATEGORIES:
                if c.name in present:
                    continue
                for term in (c.name, *c.synonyms):
                    assert not _term_pattern(term).search(cap), (term, cap, present)
            hits = _bank_hits(cap)
            assert hits <= present, (hits - present, cap)  # no filler word is a bank concept
            with_name += bool(hits & names)
    assert with_name / total > 0.9


def test_caption_counts_are_true(scenes):
    numbers = {"two": 2, "three": 3, "four": 4}
    forms = {plural(t): k for k, c in enumerate(CATEGORIES) if c.kind == "thing" for t in (c.name, *c.synonyms)}
    checked = 0
    for s in scenes:
        for cap in s.captions:
            for m in re.finditer(r"\b(two|three|four)((?: [a-z]+){1,3})", cap):
                for word in m.group(2).split():
                    if word in forms:
                        assert s.counts[forms[word]] == numbers[m.group(1)], (cap, s.counts)
                        checked += 1
                        break
    assert checked > 20


def test_captions_are_varied(scenes):
    caps = [c for s in scenes[:100] for c in s.captions]
    assert len(set(caps)) > 0.85 * len(caps)
    assert all(len(set(s.captions)) >= 4 for s in scenes[:100])
    first_words = Counter(" ".join(c.split()[:2]) for c in caps)
    assert len(first_words) > 20 and first_words.most_common(1)[0][1] < 0.25 * len(caps)
    # synonyms, adjectives and filler phrases all occur
    text = " ".join(caps)
    assert any(_term_pattern(syn).search(text) for c in CATEGORIES for syn in c.synonyms)
    for phrase in ("a photo of", "next to", "in the middle of", "on a sunny day"):
        assert phrase in text, phrase


def test_train_and_val_are_disjoint(world):
    def digest(s):
        return hashlib.md5(s.image.tobytes()).hexdigest()

    train = {digest(world.scene(i, "train")) for i in range(100)}
    val = {digest(world.scene(i, "val")) for i in range(100)}
    assert len(train) == 100 and len(val) == 100 and not train & val
    np.testing.assert_array_equal(world.scene(4, "val2017").image, world.scene(4, "validation").image)
    with pytest.raises(ValueError):
        world.scene(0, "nonsense")


# ------------------------------------------------------------------------------ learnability
def _pixels(scenes):
    x = np.concatenate([s.image[s.label != IGNORE_INDEX] for s in scenes]).astype(np.float64)
    y = np.concatenate([s.label[s.label != IGNORE_INDEX] for s in scenes]).astype(np.int64)
    return x, y


def test_category_colours_are_near_their_colour(scenes):
    x, y = _pixels(scenes[:100])
    for k, c in enumerate(CATEGORIES):
        mean = x[y == k].mean(0)
        assert np.abs(mean - np.array(c.color)).max() < 12, (c.name, mean, c.color)


def test_world_is_learnable_by_colour(world, scenes):
    k = world.num_classes
    x, y = _pixels(scenes[:100])
    xv, yv = _pixels([world.scene(i, "val") for i in range(50)])

    def nearest_mean_acc(labels):
        means = np.stack([x[labels == c].mean(0) for c in range(k)])
        pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        return (pred == yv).mean(), pred

    acc, pred = nearest_mean_acc(y)
    inter = np.bincount(yv[pred == yv], minlength=k)
    union = np.bincount(yv, minlength=k) + np.bincount(pred, minlength=k) - inter
    assert acc > 0.85 and (inter / union).mean() > 0.7
    shuffled, _ = nearest_mean_acc(np.random.default_rng(0).permutation(y))
    majority = np.bincount(yv).max() / len(yv)
    assert shuffled < majority + 0.15 and shuffled < 0.5


def test_generation_speed():
    w = SyntheticWorld()
    w.scene(0)  # warm caches
    best = float("inf")
    for rep in range(3):
        t = time.perf_counter()
        for i in range(50):
            w.scene(1000 * rep + i)
        best = min(best, (time.perf_counter() - t) / 50)
    print(f"synthetic scene 112x112: {best * 1e3:.2f} ms")
    assert best < 0.01  # about 1-2 ms on an idle core; generous for loaded CI machines


# ------------------------------------------------------------------------------ dataset
def test_dataset_items(world):
    ds = SyntheticDataset(world, "train", length=6)
    assert len(ds) == 6
    item = ds[2]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 112, 112)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (112, 112)
    scene = world.scene(2)
    assert torch.equal(item["image"], torch.from_numpy(scene.image).permute(2, 0, 1))
    assert torch.equal(item["label"], torch.from_numpy(scene.label).long())
    assert item["caption"] in item["captions"] and item["captions"] == scene.captions and item["index"] == 2
    torch.manual_seed(3)
    first = [ds[i]["caption"] for i in range(6)]
    torch.manual_seed(3)
    assert [ds[i]["caption"] for i in range(6)] == first  # reproducible under a seed
    visits = {ds[2]["caption"] for _ in range(40)}
    assert len(visits) > 2  # a new caption drawn on each visit
    val = SyntheticDataset(world, "val", length=3)
    assert all(val[i]["caption"] == world.scene(i, "val").captions[0] for i in range(3))
    with pytest.raises(IndexError):
        ds[6]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert batch["image"].shape == (4, 3, 112, 112) and batch["label"].shape == (4, 112, 112)
    assert len(batch["caption"]) == 4 and len(batch["captions"][0]) == 5


# ------------------------------------------------------------------------------ writers
def _jpeg_close(path_or_bytes, image: np.ndarray) -> None:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        arr = np.asarray(im)
    assert arr.shape == image.shape
    assert np.abs(arr.astype(np.int16) - image).mean() < 6


def _png_exact(path_or_bytes, label: np.ndarray) -> None:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), label)


def test_write_coco_captions(tmp_path, world):
    root = write_coco_captions(world, tmp_path / "coco", split="val2017", num_images=4, progress=False)
    doc = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    assert set(doc) == {"info", "licenses", "images", "annotations"}
    assert len(doc["images"]) == 4 and len(doc["annotations"]) == 20
    assert len({a["id"] for a in doc["annotations"]}) == 20
    for i, im in enumerate(doc["images"]):
        assert {"id", "file_name", "height", "width", "license", "coco_url", "date_captured"} <= set(im)
        assert re.fullmatch(r"\d{12}\.jpg", im["file_name"]) and (im["height"], im["width"]) == (112, 112)
        scene = world.scene(i, "val")
        _jpeg_close(root / "val2017" / im["file_name"], scene.image)
        caps = [a["caption"] for a in doc["annotations"] if a["image_id"] == im["id"]]
        assert caps == scene.captions
    assert (root / "class_names.txt").exists() and not list(root.rglob("*.tmp"))


def test_write_coco_stuff(tmp_path, world):
    root = write_coco_stuff(world, tmp_path / "cs", split="train2017", num_images=3, progress=False)
    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    labels = sorted((root / "annotations" / "train2017").glob("*_labelTrainIds.png"))
    assert len(images) == len(labels) == 3
    for i, (im, lab) in enumerate(zip(images, labels)):
        assert lab.name == im.stem + "_labelTrainIds.png"
        scene = world.scene(i, "train")
        _jpeg_close(im, scene.image)
        _png_exact(lab, scene.label)


def test_write_mmseg(tmp_path, world):
    root = write_mmseg(world, tmp_path / "bench", split="validation", num_images=3, progress=False)
    lines = (root / "class_names.txt").read_text().splitlines()
    assert [ln.split(", ")[0] for ln in lines] == world.class_names
    assert lines[1].split(", ")[1:] == list(CATEGORIES[1].synonyms)
    split = json.loads((root / "split.json").read_text())
    assert set(split["seen"]) | set(split["unseen"]) == set(world.class_names)
    assert split["unseen"] == [CATEGORIES[k].name for k in world.unseen_indices]
    images = sorted((root / "images" / "validation").glob("*.jpg"))
    assert len(images) == 3
    for i, im in enumerate(images):
        scene = world.scene(i, "val")
        _jpeg_close(im, scene.image)
        _png_exact(root / "annotations" / "validation" / f"{im.stem}.png", scene.label)


def test_write_webdataset(tmp_path, world):
    import webdataset as wds

    root = write_webdataset(world, tmp_path / "wds", num_images=12, shard_size=5, progress=False)
    shards = sorted(root.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000010000.jpg", "000010000.txt", "000010000.json", "000010000.seg.png"]
        meta = json.loads(tar.extractfile("000010000.json").read())
        scene = world.scene(5)
        assert meta["key"] == "000010000" and meta["status"] == "success" and meta["index"] == 5
        assert (meta["width"], meta["height"]) == (112, 112)
        assert {"url", "caption", "error_message", "original_width", "original_height", "exif", "md5"} <= set(meta)
        jpg = tar.extractfile("000010000.jpg").read()
        assert meta["md5"] == hashlib.md5(jpg).hexdigest()
        _jpeg_close(jpg, scene.image)
        _png_exact(tar.extractfile("000010000.seg.png").read(), scene.label)
        assert tar.extractfile("000010000.txt").read().decode() == meta["caption"]
        assert meta["caption"] in scene.captions
    urls = str(root / "{00000..00002}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    for i, s in enumerate(samples):
        assert s["__key__"] == f"{i // 5:05d}{i % 5:04d}"
        assert s["txt"] == world.scene(i).captions[caption_choice(world, i)]
        assert s["json"]["index"] == i and s["jpg"].size == (112, 112)
        np.testing.assert_array_equal(np.asarray(s["seg.png"])[..., 0], world.scene(i).label)


def test_make_synthetic_dispatch(tmp_path):
    out = make_synthetic("coco", tmp_path / "a", num_images=2, split=None, image_size=48, seed=1, progress=False)
    assert (out / "annotations" / "captions_train2017.json").exists()
    with Image.open(next((out / "train2017").glob("*.jpg"))) as im:
        assert im.size == (48, 48)
    out = make_synthetic("coco-stuff", tmp_path / "b", 2, None, 48, 1, progress=False)
    assert len(list((out / "annotations" / "train2017").glob("*_labelTrainIds.png"))) == 2
    out = make_synthetic("mmseg", tmp_path / "c", 2, None, 48, 1, progress=False)
    assert len(list((out / "annotations" / "validation").glob("*.png"))) == 2
    out = make_synthetic("wds", tmp_path / "d", 2, None, 48, 1, progress=False)
    assert [p.name for p in out.glob("*.tar")] == ["00000.tar"]
    with pytest.raises(ValueError):
        make_synthetic("voc", tmp_path / "e", 1, None, 48, 1)
