"""The trained CLIP as an open_clip state dict: the file any ``checkpoint_path`` option loads.

``python -m ovseg.methods.clip.export CKPT OUT`` reads a checkpoint of :class:`~ovseg.methods.clip.CLIP`
(``runs/clip_synthetic/checkpoints/last.ckpt``) and writes OUT, which
``open_clip.load_checkpoint``, :class:`~ovseg.encoders.OpenCLIPImage` / :class:`~ovseg.encoders.OpenCLIPText`
and CDT load with ``checkpoint_path: OUT`` and the same ``clip_config`` (or ``model_name``)::

    python -m ovseg.methods.clip.export runs/clip_synthetic/checkpoints/last.ckpt runs/clip_synthetic/open_clip.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from ovseg.errors import UserError
from ovseg.io import atomic_torch_save

#: ovseg key prefix -> open_clip key prefix (the towers keep open_clip's names after the prefix)
KEY_PREFIXES = {"image_encoder.": "", "text_encoder.": "", "contrastive_loss.logit_scale": "logit_scale"}


def open_clip_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`~ovseg.methods.clip.CLIP` state dict (module or checkpoint) -> open_clip's keys
    (``visual.*``, ``token_embedding.weight``, ..., ``logit_scale``), tensors on the CPU.

    Raises:
        ValueError: a key that is not one of CLIP's (a checkpoint of another method).
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{key!r} is not a key of ovseg's CLIP (a checkpoint of another method?)")
        converted[KEY_PREFIXES[prefix] + key[len(prefix) :]] = value.detach().cpu().clone()
    if "logit_scale" not in converted or not any(k.startswith("visual.") for k in converted):
        raise ValueError("not a complete CLIP state dict: the image tower or the logit scale is missing")
    return converted


def save_open_clip(state_dict: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write :func:`open_clip_state_dict` of ``state_dict`` to ``path`` (``torch.save``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(open_clip_state_dict(state_dict), path)  # a reader never sees half a file
    return path


def export_checkpoint(checkpoint_path: str | Path, output: str | Path) -> Path:
    """A Lightning checkpoint of :class:`~ovseg.methods.clip.CLIP` -> an open_clip state dict file."""
    from ovseg.cli import read_checkpoint
    from ovseg.methods import METHODS
    from ovseg.module import OVSegModule

    checkpoint = read_checkpoint(checkpoint_path)
    method = OVSegModule.checkpoint_method(checkpoint)
    if method is not None and method not in (METHODS["clip"], "ovseg.methods.clip.module.CLIP"):
        raise UserError(f"{checkpoint_path} was saved by {method}, not by CLIP pretraining ({METHODS['clip']})")
    try:
        return save_open_clip(checkpoint["state_dict"], output)
    except ValueError as error:
        raise UserError(f"{checkpoint_path}: {error}") from error


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ovseg.methods.clip.export",
        description="Write a CLIP-pretraining checkpoint as an open_clip state dict (for checkpoint_path options).",
    )
    parser.add_argument("checkpoint", help="a checkpoint of ovseg.methods.clip.CLIP (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("output", help="the open_clip state dict file to write (e.g. open_clip.pt)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {path}: load it with checkpoint_path and the clip_config (or model_name) it was trained with")


if __name__ == "__main__":
    main()
