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

import importlib
import logging
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse.typing import import_object
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from ovseg.errors import UserError
from ovseg.hub import HUB_PREFIX, resolve_checkpoint
from ovseg.module import OVSegModule

#: modules whose DataModules ``--data NAME`` and ``--help`` know by short name (methods: METHODS)
DATAMODULE_MODULES = (
    "ovseg.datamodules.synthetic",
    "ovseg.datamodules.coco_captions",
    "ovseg.datamodules.coco_stuff",
    "ovseg.datamodules.webdataset",
    "ovseg.datamodules.feature_store",
    "ovseg.datamodules.benchmarks",
    "ovseg.datamodules.image_folder",
)


DESCRIPTION = (
    "ovseg: open-vocabulary semantic segmentation (SimZSS, CDT/MAFT+, ZegFormer). Choose model and "
    "data with -c CONFIG (see configs/), override any key on the command line, e.g. "
    "`ovseg fit -c configs/experiment/smoke.yaml --trainer.max_steps 100`. "
    "Data preparation: `ovseg data --help`. Official checkpoints: `ovseg convert --help`."
)


class OVSegCLI(LightningCLI):
    """LightningCLI with ovseg's base classes, exact option names and run-owned outputs.

    Beyond stock LightningCLI: abbreviated options are refused; a ``ModelCheckpoint`` without
    ``dirpath`` writes to ``<default_root_dir>/checkpoints`` and replaces its ``last.ckpt`` instead
    of versioning it (``last-v1.ckpt``; an explicit ``dirpath`` keeps the user's
    ``enable_version_counter``), an unset logger is a ``CSVLogger`` in ``default_root_dir``, so each
    run's outputs follow its ``--trainer.default_root_dir``; ``--ckpt_path last`` with nothing to
    resume is an error (``--allow_fresh_start true`` starts fresh instead); checkpoint files are
    checked before loading; a fit stopped by a signal saves a checkpoint and reports it
    (:class:`ovseg.callbacks.StopReport`); the model's own metrics table replaces Lightning's.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--allow_fresh_start",
            type=bool,
            default=False,
            help="with --ckpt_path last: start from scratch when there is no checkpoint to resume "
            "(default: that is an error)",
        )

    def before_instantiate_classes(self) -> None:
        """Point checkpoints and logs without an explicit folder at the run's ``default_root_dir``; let
        the configured callbacks that have a ``prepare_process()`` (a static method) set up the process
        before the model and data are built (:class:`ovseg.callbacks.ThreadCountInvariance`: MKL's
        reproducibility mode, which MKL fixes at its first call)."""
        settings = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = settings.get("trainer") if settings is not None else None
        if trainer is None:
            return
        check_loader_sizes(settings.get("data"), "data")
        root = trainer.get("default_root_dir") or "."
        callbacks = trainer.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            class_path = str(callback.get("class_path", "")) if hasattr(callback, "get") else ""
            init_args = callback.get("init_args") if class_path else None
            if class_path:
                prepare_process = getattr(import_object(class_path), "prepare_process", None)
                if callable(prepare_process):
                    prepare_process()
            if class_path.endswith("ModelCheckpoint") and init_args is not None:
                if init_args.get("dirpath") is None:  # a folder the user did not choose: the run's own
                    init_args["dirpath"] = str(Path(root) / "checkpoints")
                    init_args["enable_version_counter"] = False  # one last.ckpt per folder, the newest run's
        if trainer.get("logger") is None:  # Lightning's default, without its TensorBoard warning
            from jsonargparse import Namespace

            trainer["logger"] = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root)
            )

    def instantiate_trainer(self, **kwargs: Any):
        from ovseg.callbacks import OVSegProgressBar, StopReport

        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(StopReport(getattr(self, "_command_line", [])))
        for index, callback in enumerate(trainer.callbacks):
            if type(callback).__name__ == "RichProgressBar" and type(callback).__module__.startswith("lightning."):
                trainer.callbacks[index] = OVSegProgressBar()
        return trainer

    def before_fit(self) -> None:
        settings = self.config_init[self.subcommand]
        if settings.get("ckpt_path") is None:
            self._note_replaced_checkpoints()
        self._require_last_checkpoint()

    def before_validate(self) -> None:
        self._require_last_checkpoint()

    before_test = before_predict = before_validate

    def _require_last_checkpoint(self) -> None:
        """``--ckpt_path last`` with nothing to resume from: an error naming where it looked."""
        settings = self.config_init[self.subcommand]
        if settings.get("ckpt_path") != "last":
            return
        from ovseg.callbacks import last_checkpoint_candidates

        last, hpc, looked_in = last_checkpoint_candidates(self.trainer)
        if last:
            return
        if hpc:  # Lightning's `last` ignores SLURM's checkpoints: resume the newest explicitly
            self.config_init[self.subcommand]["ckpt_path"] = "hpc"
            return
        if settings.get("allow_fresh_start"):
            print(f"ovseg: no checkpoint to resume in {', '.join(looked_in)}: starting from scratch", file=sys.stderr)
            self.config_init[self.subcommand]["ckpt_path"] = None
            return
        raise UserError(
            f"--ckpt_path last: no checkpoint found (looked for last*.ckpt and hpc_ckpt_*.ckpt in "
            f"{', '.join(looked_in)}); check --trainer.default_root_dir and the config, give a checkpoint file, "
            f"or add --allow_fresh_start true to start from scratch"
        )

    def _note_replaced_checkpoints(self) -> None:
        """A fresh fit in a folder that holds another run's ``last.ckpt`` replaces it: say so once."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                if last.is_file() and self.trainer.is_global_zero:
                    print(
                        f"ovseg: {last} is from an earlier run; this run replaces it (to continue that run "
                        "instead: --ckpt_path last; to keep both: another --trainer.default_root_dir)",
                        file=sys.stderr,
                    )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's results table is left out when the model prints its own (``print_metrics``)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if (
            "verbose" in kwargs
            and getattr(self.model, "print_metrics", False)
            and "--verbose" not in " ".join(getattr(self, "_command_line", []))
        ):
            kwargs["verbose"] = False
        return kwargs

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
                raise UserError(
                    f"--ckpt_path {ckpt_path}: hf:// models hold weights, not a training state to "
                    "resume; use them with validate/test/predict"
                )
            ckpt_path = settings["ckpt_path"] = resolve_checkpoint(ckpt_path)
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
            if "://" not in str(ckpt_path):
                raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        # a clear message for a file that is not a checkpoint, before Lightning reads it
        checkpoint = read_checkpoint(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None
        model = settings.get("model") if settings is not None else None
        class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if checkpoint is not None and class_path:
            OVSegModule.check_checkpoint_method(
                checkpoint, import_object(class_path), f"checkpoint {ckpt_path}", class_path
            )
        configured = model_settings(self.config, subcommand)
        super()._parse_ckpt_path()
        overrides = model_options(getattr(self, "_command_line", []))
        if ckpt_path and overrides and Path(ckpt_path).is_file():
            self.config = self.parser.parse_args([subcommand, *overrides], namespace=self.config.clone())
        if checkpoint is not None:
            restored = model_settings(self.config, subcommand)
            replaced = sorted(key for key, value in configured.items() if key in restored and restored[key] != value)
            if replaced and rank_zero_only.rank == 0:
                print(
                    f"ovseg: --ckpt_path {ckpt_path}: the checkpoint's hyper-parameters replace the configured "
                    f"model.init_args {', '.join(replaced)} (to evaluate with other values, give them as "
                    "--model.init_args.* options: those apply on top)",
                    file=sys.stderr,
                )


def model_settings(config: Any, subcommand: str | None) -> dict[str, Any]:
    """The model's ``init_args`` in ``config`` (of ``subcommand``) as dotted keys (jsonargparse's leaves)."""
    init_args = config.get(f"{subcommand}.model.init_args" if subcommand else "model.init_args")
    return dict(init_args.items()) if hasattr(init_args, "items") else {}


def check_loader_sizes(config: Any, key: str) -> None:
    """Raise :class:`UserError` naming the key of a ``*batch_size`` below 1 or a ``num_workers`` below 0
    anywhere in a DataModule's configuration (nested ``eval_data`` included), before torch's sampler
    meets it."""
    if not hasattr(config, "items"):
        return
    for name, value in config.items():
        path, leaf = f"{key}.{name}", name.rsplit(".", 1)[-1]  # jsonargparse's items() gives dotted keys
        if leaf.endswith("batch_size") and isinstance(value, int) and value < 1:
            raise UserError(f"--{path} must be at least 1, got {value}")
        if leaf == "num_workers" and isinstance(value, int) and value < 0:
            raise UserError(f"--{path} must be 0 (load in the main process) or more, got {value}")
        check_loader_sizes(value, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (CPU, weights only), or raise :class:`UserError` naming the file and
    saying whether it is empty or truncated (a cut-short save) or not a checkpoint at all."""
    import torch

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): a save that was cut short; use another checkpoint")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            zip_start = handle.read(4) == b"PK\x03\x04"
        if zip_start:
            raise UserError(
                f"checkpoint {path} is truncated ({size} bytes, the end is missing): a save that was "
                "cut short; use another checkpoint"
            )
        raise UserError(f"{path} is not an ovseg/Lightning checkpoint (not a torch.save zip file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise UserError(
            f"checkpoint {path} cannot be read, it is corrupt or truncated "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an ovseg/Lightning checkpoint (no 'state_dict' in it)")
    return checkpoint


class _DropLines(logging.Filter):
    """Drops Lightning's lines that are noise for ovseg users (device availability, cloud tips)."""

    PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "\U0001f4a1 Tip:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.PREFIXES)


def quiet_terminal() -> None:
    """Silence what is noise for ovseg (each once; idempotent): Lightning's device lines and tips, the
    warning that frozen towers are in eval mode (they are, by design), torch's LeafSpec deprecation
    raised inside Lightning."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    logger = logging.getLogger("lightning.pytorch")
    for target in [logger, *logger.handlers]:
        if not any(isinstance(f, _DropLines) for f in target.filters):
            target.addFilter(_DropLines())


def import_known_classes() -> None:
    """Import every method and DataModule, so that short names (``--model SimZSS``) resolve and
    ``--help`` lists them as known subclasses."""
    from ovseg.methods import METHODS

    for module in [path.rsplit(".", 1)[0] for path in METHODS.values()] + list(DATAMODULE_MODULES):
        importlib.import_module(module)


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
    return _cli(None if args is None else argv, run=True)


def build(args: Sequence[str]) -> OVSegCLI:
    """The model and DataModule of an ``ovseg`` command line (``-c`` configs and options, no
    subcommand), built as ``ovseg fit`` builds them, without running anything: ``build(args).model``,
    ``build(args).datamodule``."""
    return _cli(list(args), run=False)


def _cli(args: list[str] | None, run: bool) -> OVSegCLI:
    quiet_terminal()
    import_known_classes()
    return OVSegCLI(
        OVSegModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "ovseg", "description": DESCRIPTION},
        args=args,
        run=run,
    )


def main() -> None:
    """The ``ovseg`` command (kept here for old entry points): :func:`ovseg.command.main`."""
    from ovseg.command import main as command_main

    command_main()


if __name__ == "__main__":
    main()
