"""The ``ovseg`` command: LightningCLI for fit/validate/test/predict, plus ``ovseg data``.

Examples::

    ovseg fit -c configs/experiment/smoke.yaml
    ovseg fit -c configs/simzss/synthetic.yaml --trainer.max_steps 100 --model.init_args.lambda_local 0
    ovseg validate -c configs/experiment/smoke.yaml --ckpt_path runs/smoke/checkpoints/last.ckpt
    ovseg data make-synthetic --format coco --out data/synthetic_coco --num-images 200

Model and data are chosen by ``class_path`` (any subclass of :class:`~ovseg.module.OVSegModule`
and any ``LightningDataModule``); every init argument can be overridden on the command line.
The resolved configuration is written to the run's log directory (overwritten by a second run in
the same place).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from ovseg.module import OVSegModule


DESCRIPTION = (
    "ovseg: open-vocabulary semantic segmentation (SimZSS, CDT/MAFT+, ZegFormer). Choose model and "
    "data with -c CONFIG (see configs/), override any key on the command line, e.g. "
    "`ovseg fit -c configs/experiment/smoke.yaml --trainer.max_steps 100`. "
    "Data preparation: `ovseg data --help`."
)


class OVSegCLI(LightningCLI):
    """Stock LightningCLI with ovseg's base classes; nothing overrides the user's Trainer settings."""

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` of another method before LightningCLI reads its hyper-parameters.

        LightningCLI replaces the configured model with the one recorded in the checkpoint's
        hyper-parameters (class path included), so a checkpoint of another method would silently
        run that method instead of the configured one.
        """
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        model = settings.get("model") if settings is not None else None
        class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if ckpt_path and class_path and Path(ckpt_path).is_file():
            import torch
            from jsonargparse.typing import import_object

            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            OVSegModule.check_checkpoint_method(checkpoint, import_object(class_path), f"checkpoint {ckpt_path}",
                                                class_path)
        super()._parse_ckpt_path()


def run(args: Sequence[str] | None = None) -> OVSegCLI | None:
    """Run ``ovseg`` with ``args`` (default: ``sys.argv[1:]``).

    Returns the finished :class:`OVSegCLI` (its ``trainer`` holds the final metrics), or None for
    ``ovseg data``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "data":
        from ovseg.data_cli import main as data_main

        data_main(argv[1:])
        return None
    return OVSegCLI(
        OVSegModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "ovseg", "description": DESCRIPTION},
        args=None if args is None else argv,
    )


def main() -> None:
    """Entry point of the ``ovseg`` console script and ``python -m ovseg``."""
    run()


if __name__ == "__main__":
    main()
