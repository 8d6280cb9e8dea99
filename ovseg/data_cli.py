"""``ovseg data``: data preparation commands.

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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one ``ovseg data`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "make-synthetic":
        from ovseg.datamodules.synthetic.writers import make_synthetic

        if args.num_images < 1:
            raise SystemExit("ovseg data make-synthetic: --num-images must be at least 1")
        path = make_synthetic(args.format, args.out, args.num_images, args.split, args.image_size,
                              args.seed)
        print(f"wrote {args.num_images} synthetic images in the {args.format!r} format to {path}")
