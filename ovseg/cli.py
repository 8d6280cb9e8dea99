"""The ``ovseg`` command: LightningCLI for fit/validate/test/predict, plus ``ovseg data``.

Examples::

    ovseg fit -c configs/experiment/smoke.yaml
    ovseg fit -c configs/simzss/synthetic.yaml --trainer.max_steps 100 --model.init_args.lambda_local 0
    ovseg validate -c configs/experiment/smoke.yaml --ckpt_path runs/smoke/checkpoints/last.ckpt
    ovseg validate -c configs/experiment/smoke.yaml --ckpt_path hf://ORG/NAME   # a model on the Hub
    ovseg data make-synthetic --format coco --out data/synthetic_coco --num-images 200
    ovseg predict -c configs/experiment/smoke.yaml --ckpt_path runs/smoke/checkpoints/last.ckpt \
        --data ovseg.datamodules.ImageFolderDataModule --data.init_args.images photos/ \
        --data.init_args.classes "sky,grass,a red car" --writer.output_dir runs/photos
    ovseg app --ckpt_path runs/smoke/checkpoints/last.ckpt
    ovseg convert cdt maftplus.pth runs/maftplus.ckpt -c configs/cdt/coco_stuff_convnext_l.yaml

Model and data are chosen by ``class_path`` (any subclass of :class:`~ovseg.module.OVSegModule`
and any ``LightningDataModule``); every init argument can be overridden on the command line.
The resolved configuration is written to the run's log directory (overwritten by a second run in
the same place).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from ovseg.hub import HUB_PREFIX, resolve_checkpoint
from ovseg.module import OVSegModule


DESCRIPTION = (
    "ovseg: open-vocabulary semantic segmentation (SimZSS, CDT/MAFT+, ZegFormer). Choose model and "
    "data with -c CONFIG (see configs/), override any key on the command line, e.g. "
    "`ovseg fit -c configs/experiment/smoke.yaml --trainer.max_steps 100`. "
    "Data preparation: `ovseg data --help`. Official checkpoints: `ovseg convert --help`."
)


class OVSegCLI(LightningCLI):
    """Stock LightningCLI with ovseg's base classes; nothing overrides the user's Trainer settings."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        """``predict`` gets the prediction writer (``--writer.output_dir`` ...) and keeps no
        predictions in memory (they are on disk)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            from ovseg.writer import PredictionWriter

            parser.add_lightning_class_args(PredictionWriter, "writer")
            parser.set_defaults(return_predictions=False)
        return parser

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does, keeping the command line for :meth:`_parse_ckpt_path`."""
        self._command_line = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Apply a ``--ckpt_path``'s hyper-parameters as LightningCLI does, with two changes.

        LightningCLI replaces the configured model with the one recorded in the checkpoint's
        hyper-parameters (class path included), so a checkpoint of another method would silently
        run that method instead of the configured one: that is refused, naming both. And the
        recorded hyper-parameters would also replace the ``--model.*`` options given on the
        command line (``ovseg validate ... --ckpt_path X --model.init_args.calibration 0`` would
        evaluate with the training value): those are applied again on top, so the command line
        has the last word, as everywhere else.
        """
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        if isinstance(ckpt_path, str) and ckpt_path.startswith(HUB_PREFIX):  # a saved model: weights only
            if subcommand == "fit":
                raise ValueError(f"--ckpt_path {ckpt_path}: hf:// models hold weights, not a training state to "
                                 "resume; use them with validate/test/predict")
            ckpt_path = settings["ckpt_path"] = resolve_checkpoint(ckpt_path)
        model = settings.get("model") if settings is not None else None
        class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if ckpt_path and class_path and Path(ckpt_path).is_file():
            import torch
            from jsonargparse.typing import import_object

            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            OVSegModule.check_checkpoint_method(checkpoint, import_object(class_path), f"checkpoint {ckpt_path}",
                                                class_path)
        super()._parse_ckpt_path()
        overrides = model_options(getattr(self, "_command_line", []))
        if ckpt_path and overrides and Path(ckpt_path).is_file():
            self.config = self.parser.parse_args([subcommand, *overrides], namespace=self.config.clone())


def model_options(args: Sequence[str]) -> list[str]:
    """The ``--model.KEY VALUE`` / ``--model.KEY=VALUE`` options of a command line, in order."""
    options: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("--model.") and "=" not in arg and index + 1 < len(args):
            options += [arg, args[index + 1]]
            index += 2
            continue
        if arg.startswith("--model."):
            options.append(arg)
        index += 1
    return options


def run(args: Sequence[str] | None = None) -> OVSegCLI | None:
    """Run ``ovseg`` with ``args`` (default: ``sys.argv[1:]``).

    Returns the finished :class:`OVSegCLI` (its ``trainer`` holds the final metrics), or None for
    ``ovseg data``, ``ovseg app`` and ``ovseg convert``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "data":
        from ovseg.prepare.cli import main as data_main

        data_main(argv[1:])
        return None
    if argv and argv[0] == "app":
        from ovseg.app import main as app_main

        app_main(argv[1:])
        return None
    if argv and argv[0] == "convert":
        from ovseg.convert import main as convert_main

        convert_main(argv[1:])
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
