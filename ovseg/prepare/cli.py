"""``ovseg data``: data preparation commands (the tools of :mod:`ovseg.prepare`).

Example::

    ovseg data make-synthetic --format coco --out data/synthetic_coco --num-images 200
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The ``ovseg data`` argument parser, one sub-command per job."""
    parser = argparse.ArgumentParser(prog="ovseg data", description="Data preparation for ovseg.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synthetic = commands.add_parser(
        "make-synthetic",
        help="write the synthetic world to disk in a real data format",
        description="Write the synthetic world in the on-disk format of COCO Captions (coco), "
        "COCO-Stuff label maps (coco-stuff), an mmseg evaluation folder (mmseg) or WebDataset "
        "shards (wds).",
    )
    synthetic.add_argument("--format", required=True, choices=["coco", "coco-stuff", "mmseg", "wds"])
    synthetic.add_argument("--out", required=True, help="output directory")
    synthetic.add_argument("--num-images", type=int, default=200)
    synthetic.add_argument("--split", default=None, help="split name (default: the format's own)")
    synthetic.add_argument("--image-size", type=int, default=112)
    synthetic.add_argument("--seed", type=int, default=0)

    check = commands.add_parser(
        "check",
        help="verify a data root against the benchmarks of a data config",
        description="Count images, labels and classes per benchmark of an EvaluationDataModule "
        "config and report, by file name, what is missing or malformed (missing labels or images, "
        "unreadable files, label values out of range, size mismatches). Exit status 1 on problems.",
    )
    check.add_argument("--data", required=True, help="data config, e.g. configs/data/eval_caption8.yaml")
    check.add_argument("--root", default=None, help="data root (default: the config's root)")
    check.add_argument("--benchmarks", nargs="+", default=None, metavar="NAME", help="check only these benchmarks")
    check.add_argument("--max-images", type=int, default=None, help="first N samples per benchmark")
    check.add_argument(
        "--headers-only", action="store_true", help="read image headers only (faster; truncated images go unnoticed)"
    )
    check.add_argument("--workers", type=int, default=None, help="reader threads (default: CPUs, max 8)")
    check.add_argument("--no-progress", action="store_true", help="no progress bars")

    shards = commands.add_parser(
        "make-shards",
        help="write COCO Captions or COCO-Stuff as WebDataset shards (img2dataset layout)",
        description="Write img2dataset-style WebDataset shards OUT/{00000..}.tar: from COCO "
        "Captions (image + .txt caption + .json with all captions; --concepts stores the SimZSS "
        "concepts in the JSON) or from COCO-Stuff in the mmseg layout (image + .seg.png label map).",
    )
    source = shards.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco-captions", metavar="ANNOTATIONS.json", help="captions JSON")
    source.add_argument("--coco-stuff", metavar="ROOT", help="COCO-Stuff root (images/, annotations/)")
    shards.add_argument("--images", metavar="DIR", help="image folder (with --coco-captions)")
    shards.add_argument("--split", default="train2017", help="COCO-Stuff split (default train2017)")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (<= 10000)")
    shards.add_argument("--concepts", action="store_true", help="store SimZSS concepts in each JSON")
    shards.add_argument(
        "--per-caption",
        action="store_true",
        help="one sample per caption (img2dataset mscoco layout) instead of per image",
    )
    _add_concept_options(shards)

    concepts = commands.add_parser(
        "extract-concepts",
        help="precompute SimZSS concepts of COCO captions or of existing shards",
        description="--coco: write ANNOTATIONS.concepts.pt next to the captions JSON (concepts "
        "per annotation id, for CocoCaptionsDataModule(concepts=...)). --shards: add the concepts "
        "to every sample's JSON of existing local shards, rewriting each shard atomically.",
    )
    target = concepts.add_mutually_exclusive_group(required=True)
    target.add_argument("--coco", metavar="ANNOTATIONS.json", help="COCO Captions JSON")
    target.add_argument("--shards", metavar="URLS", help='local shards, e.g. "DIR/{00000..00003}.tar"')
    concepts.add_argument("--out", default=None, help="output file with --coco (default: next to it)")
    _add_concept_options(concepts)

    cache = commands.add_parser(
        "cache-features",
        help="run SimZSS's frozen backbone once over the training images and store its features",
        description="Run the frozen image encoder of a config (model.init_args.image_encoder) over "
        "the training images of its data module (data) for fixed views, and write fp16 patch tokens "
        "and global features to a sharded, memory-mapped store (OUT/index.json). Re-running "
        "continues an unfinished store. Train from it with "
        "ovseg.datamodules.CachedFeaturesDataModule.",
    )
    cache.add_argument("--config", required=True, help="a SimZSS config, e.g. configs/simzss/coco_vitb14.yaml")
    cache.add_argument("--out", required=True, help="store directory")
    cache.add_argument(
        "--views",
        choices=["center", "rrc"],
        default="center",
        help="center: resize + centre crop (one view); rrc: --num-views RandomResizedCrops",
    )
    cache.add_argument("--num-views", type=int, default=1, help="views per image with --views rrc")
    cache.add_argument("--size", type=int, default=224, help="view side in pixels")
    cache.add_argument("--seed", type=int, default=0, help="seed of the rrc views")
    cache.add_argument("--batch-size", type=int, default=64)
    cache.add_argument("--shard-size", type=int, default=4096, help="images per shard")
    cache.add_argument("--num-images", type=int, default=None, help="first N images only")
    cache.add_argument("--num-workers", type=int, default=0, help="loader processes")
    cache.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _add_concept_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that extract SimZSS concepts."""
    parser.add_argument("--num-workers", type=int, default=0, help="extraction processes (0: none)")
    parser.add_argument("--bank", default=None, help="concept bank file (default: the packaged one)")
    parser.add_argument(
        "--context-length", type=int, default=77, help="the text encoder's context length (must match the model)"
    )
    parser.add_argument("--max-concepts", type=int, default=32)
    parser.add_argument("--max-tokens-per-concept", type=int, default=16)
    parser.add_argument(
        "--concept-rules",
        choices=["ovseg", "release"],
        default="ovseg",
        help="the model's concept_rules (release: the official SimZSS release's rules)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> None:
    """Run one ``ovseg data`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "check":
        check_data(args)
    if args.command == "make-shards":
        make_shards(args)
    if args.command == "extract-concepts":
        extract_concepts(args)
    if args.command == "cache-features":
        cache_features(args)
    if args.command == "make-synthetic":
        from ovseg.prepare.synthetic import make_synthetic

        if args.num_images < 1:
            raise SystemExit("ovseg data make-synthetic: --num-images must be at least 1")
        path = make_synthetic(args.format, args.out, args.num_images, args.split, args.image_size, args.seed)
        print(f"wrote {args.num_images} synthetic images in the {args.format!r} format to {path}")


def check_data(args: argparse.Namespace) -> None:
    """``ovseg data check``: verify the data root of an EvaluationDataModule config.

    Prints a table (images, labels, classes per benchmark) and every problem with its file name;
    exits with status 1 when problems are found. Example::

        ovseg data check --data configs/data/eval_caption8.yaml --root data
    """
    from ovseg.prepare.check import run_check

    try:
        code = run_check(
            args.data,
            root=args.root,
            benchmarks=args.benchmarks,
            max_images=args.max_images,
            decode_images=not args.headers_only,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"ovseg data check: {error}") from None
    if code:
        raise SystemExit(code)


def make_shards(args: argparse.Namespace) -> None:
    """``ovseg data make-shards``: COCO Captions or COCO-Stuff -> WebDataset shards. Examples::

        ovseg data make-shards --coco-captions data/coco/annotations/captions_train2017.json \
            --images data/coco/train2017 --out data/coco_shards --concepts --num-workers 8
        ovseg data make-shards --coco-stuff data/coco_stuff164k --split train2017 --out data/cs_shards
    """
    from ovseg.prepare.shards import (
        make_shards_from_coco_captions,
        make_shards_from_coco_stuff,
    )

    progress = not args.no_progress
    try:
        if args.coco_captions:
            if not args.images:
                raise SystemExit("ovseg data make-shards: --coco-captions needs --images DIR")
            summary = make_shards_from_coco_captions(
                args.coco_captions,
                args.images,
                args.out,
                args.shard_size,
                args.concepts,
                args.per_caption,
                args.num_workers,
                args.bank,
                args.context_length,
                args.max_concepts,
                args.max_tokens_per_concept,
                progress,
                args.concept_rules,
            )
        else:
            summary = make_shards_from_coco_stuff(args.coco_stuff, args.out, args.split, args.shard_size, progress)
    except (OSError, ValueError) as error:
        raise SystemExit(f"ovseg data make-shards: {error}") from None
    last = len(summary.shards) - 1
    print(
        f"wrote {summary.samples} samples in {len(summary.shards)} shards to "
        f"{args.out}/{{00000..{last:05d}}}.tar"
        + (f"; skipped {summary.skipped} unreadable images" if summary.skipped else "")
    )


def extract_concepts(args: argparse.Namespace) -> None:
    """``ovseg data extract-concepts``: precompute SimZSS concepts. Examples::

    ovseg data extract-concepts --coco data/coco/annotations/captions_train2017.json --num-workers 8
    ovseg data extract-concepts --shards "data/coco_shards/{00000..00059}.tar" --num-workers 8
    """
    options = dict(
        bank=args.bank,
        context_length=args.context_length,
        max_concepts=args.max_concepts,
        max_tokens_per_concept=args.max_tokens_per_concept,
        concept_rules=args.concept_rules,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    try:
        if args.coco:
            from ovseg.prepare.concepts import extract_coco_concepts

            path = extract_coco_concepts(args.coco, args.out, **options)
            print(f"wrote the concepts of {args.coco} to {path}")
            return
        from ovseg.prepare.concepts import add_concepts_to_shards

        samples, errors = add_concepts_to_shards(args.shards, **options)
    except (OSError, ValueError, LookupError) as error:
        raise SystemExit(f"ovseg data extract-concepts: {error}") from None
    print(f"added concepts to {samples} samples of {args.shards}")
    if errors:
        raise SystemExit("ovseg data extract-concepts: shards left unchanged:\n  " + "\n  ".join(errors))


def cache_features(args: argparse.Namespace) -> None:
    """``ovseg data cache-features``: the frozen backbone's features of the training images. Example::

        ovseg data cache-features --config configs/simzss/coco_vitb14.yaml --out data/coco_cache \
            --views rrc --num-views 4 --size 224 --device cuda
    """
    import torch
    import yaml
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    from ovseg.datamodules.feature_store import read_index
    from ovseg.encoders.base import ImageEncoder
    from ovseg.prepare.feature_cache import (
        CacheViews,
        build_feature_cache,
        train_dataset_of,
    )

    try:
        config = yaml.safe_load(open(args.config))
        encoder_config = config["model"]["init_args"]["image_encoder"]
        parser = ArgumentParser()
        parser.add_subclass_arguments(ImageEncoder, "encoder")
        parser.add_subclass_arguments(LightningDataModule, "data")
        parsed = parser.parse_object({"encoder": encoder_config, "data": config["data"]})
        # a randomly initialised backbone (tiny test configs) gets the config's seed, so that
        # re-running (resuming) builds the same weights; the fingerprint guards against a mismatch
        seed = config.get("seed_everything")
        torch.manual_seed(int(seed) if isinstance(seed, int) else 0)
        built = parser.instantiate_classes(parsed)
        dataset = train_dataset_of(built.data)
        views = CacheViews(args.views, args.size, args.num_views, args.seed)
        store = build_feature_cache(
            built.encoder,
            dataset,
            args.out,
            views,
            args.batch_size,
            args.shard_size,
            args.num_images,
            args.device,
            args.num_workers,
            progress=not args.no_progress,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"ovseg data cache-features: {error}") from None
    index = read_index(store)
    print(
        f"cached {index['num_done']}/{index['num_images']} images x {index['num_views']} views "
        f"({index['num_patches']} patches x {index['dim']}) in {store}"
    )
