"""``ovseg convert METHOD SRC DST -c CONFIG``: an official release checkpoint -> an ovseg checkpoint.

The shared machinery lives here; each method's ``convert.py`` holds only its key mapping::

    convert_state_dict(official: dict[str, Tensor], model: OVSegModule)
        -> tuple[dict[str, Tensor], KeyReport]

which returns the model's full state dict and accounts for every official key (mapped to an ovseg
key, or dropped with a reason) and for every model key the file lacks (filled, with where from:
e.g. the open_clip weights named in the config). The model is built from the YAML's ``model``
section exactly as LightningCLI builds it, so the written checkpoint carries the same
hyper-parameters as a trained one and ``ovseg validate/test/predict --ckpt_path DST`` (or
``Method.load_from_checkpoint(DST)``) accept it without the YAML.

Example::

    ovseg convert cdt maftplus_large.pth runs/maftplus_large.ckpt -c configs/cdt/coco_stuff_convnext_l.yaml
    ovseg validate -c configs/cdt/coco_stuff_convnext_l.yaml --ckpt_path runs/maftplus_large.ckpt
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ovseg.errors import UserError

#: method name -> ``module:function`` of its key mapping (imported only when that method is converted)
CONVERTERS: dict[str, str] = {
    "simzss": "ovseg.methods.simzss.convert:convert_state_dict",
    "cdt": "ovseg.methods.cdt.convert:convert_state_dict",
    "zegformer": "ovseg.methods.zegformer.convert:convert_state_dict",
}

#: entries of a checkpoint file that may hold the state dict, in the order they are tried
STATE_DICT_ENTRIES = ("state_dict", "model", "module")


class ConversionError(UserError):
    """A checkpoint that cannot be converted, with what to do about it."""


@dataclass
class KeyReport:
    """Where every key went: official keys mapped or dropped (with a reason), model keys filled.

    ``hparams_updates`` are hyper-parameters the converted checkpoint records differently from the
    config (e.g. ``pretrained: None`` once the pretrained weights are inside the checkpoint, so that
    loading it never tries to download them).
    """

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    hparams_updates: dict[str, Any] = field(default_factory=dict)
    training_classes: str | None = None

    def map(self, official_key: str, ovseg_key: str) -> None:
        """Record that ``official_key`` became ``ovseg_key``."""
        self.mapped[official_key] = ovseg_key

    def drop(self, official_key: str, reason: str) -> None:
        """Record that ``official_key`` is not used, and why (e.g. "training-only EMA buffer")."""
        self.dropped[official_key] = reason

    def fill(self, ovseg_key: str, source: str) -> None:
        """Record that ``ovseg_key`` is not in the official file and comes from ``source``."""
        self.filled[ovseg_key] = source

    def unaccounted(self, official_keys: Sequence[str]) -> list[str]:
        """Official keys that are neither mapped nor dropped."""
        return [key for key in official_keys if key not in self.mapped and key not in self.dropped]

    def check_complete(self, official_keys: Sequence[str], source: str) -> None:
        """Raise :class:`ConversionError` if an official key is unaccounted for."""
        missing = self.unaccounted(official_keys)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ConversionError(
                f"{source}: {len(missing)} key(s) the converter does not know: {shown}. "
                "Is this a checkpoint of the method and size named in the config?"
            )

    def summary(self, examples: int = 2) -> str:
        """A few lines: counts, then each drop or fill reason with its count and example keys."""
        lines = [f"mapped {len(self.mapped)} key(s), dropped {len(self.dropped)}, filled {len(self.filled)}"]
        if self.training_classes:
            lines.append(f"  training classes: {self.training_classes}")
        for verb, entries in (("dropped", self.dropped), ("filled", self.filled)):
            by_reason: dict[str, list[str]] = defaultdict(list)
            for key, reason in entries.items():
                by_reason[reason].append(key)
            for reason, keys in sorted(by_reason.items()):
                shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
                lines.append(f"  {verb} {len(keys)}: {reason} ({shown})")
        return "\n".join(lines)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles detectron2 ``.pkl`` weight files (dicts of numpy arrays) and nothing else."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight file")
        return super().find_class(module, name)


def _read_file(path: Path, trust_pickle: bool) -> Any:
    """The raw object in a ``.pth``/``.pt``/``.ckpt``/``.bin`` or detectron2 ``.pkl`` file."""
    if path.suffix == ".pkl":
        with path.open("rb") as handle:
            try:
                return _NumpyOnlyUnpickler(handle, encoding="latin1").load()
            except pickle.UnpicklingError as error:
                raise ConversionError(f"{path}: not a detectron2 weight pickle of numpy arrays ({error})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise ConversionError(f"{path}: not a PyTorch checkpoint ({error})") from None
        raise ConversionError(
            f"{path} holds Python objects besides tensors, so it cannot be read with weights_only=True "
            f"({str(error).splitlines()[0]}). If you trust where it comes from, add --trust-pickle"
        ) from None
    except RuntimeError as error:  # truncated zip archives, random bytes
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside a checkpoint object (``{"model": ...}``, ``{"state_dict": ...}``, ...)."""
    while isinstance(obj, Mapping):
        inner = next((obj[name] for name in STATE_DICT_ENTRIES if isinstance(obj.get(name), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    raise ConversionError("the file holds no dictionary of weights")


def load_official_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of an official checkpoint, by key (numpy arrays of ``.pkl`` files become tensors).

    ``torch.load(weights_only=True)`` is used unless ``trust_pickle``; a file that needs more is
    refused with the option to give, never loaded unsafely behind the user's back. A DDP
    ``module.`` prefix common to every key is removed. Entries that are not arrays (e.g. an
    iteration count beside the weights) are left out.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    weights: dict[str, Tensor] = {}
    for key, value in _unwrap(_read_file(path, trust_pickle)).items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))  # keeps 0-d scalars 0-d
        if isinstance(value, Tensor):
            weights[str(key)] = value
    if not weights:
        raise ConversionError(f"{path}: no tensors found")
    if all(key.startswith("module.") for key in weights):
        weights = {key.removeprefix("module."): value for key, value in weights.items()}
    return weights


def build_model(config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The :class:`~ovseg.module.OVSegModule` of ``config``'s ``model`` section, built as LightningCLI
    builds it (same hyper-parameters recorded), with ``--model.…`` ``overrides`` applied."""
    import yaml

    config = Path(config)
    if not config.is_file():
        raise ConversionError(f"config {config}: no such file")
    section = (yaml.safe_load(config.read_text()) or {}).get("model")
    if not isinstance(section, Mapping):
        raise ConversionError(f"config {config} has no `model:` section")
    return build_model_from_section(section, overrides)


def build_model_from_section(section: Mapping[str, Any], overrides: Sequence[str] = ()) -> Any:
    """The :class:`~ovseg.module.OVSegModule` of a config's ``model`` section (``class_path`` and
    ``init_args``), built as LightningCLI builds it, with ``--model.…`` ``overrides`` applied."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    from ovseg.module import OVSegModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(OVSegModule, "model", required=True, fail_untyped=False)
    cfg = parser.parse_object({"model": dict(section)})
    if overrides:
        cfg = parser.parse_args(list(overrides), namespace=cfg)
    dumped = yaml.safe_load(parser.dump(cfg, skip_none=False))["model"]
    hparams = {"_class_path": dumped["class_path"], **dumped.get("init_args", {}), **dumped.get("dict_kwargs", {})}
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return parser.instantiate_classes(cfg).model


def training_classes_of(config: str | Path) -> Any:
    """The ``training_classes`` (:class:`~ovseg.benchmark.TrainingClasses`) of ``config``'s ``data``
    section, or None when it has none; raises :class:`ConversionError` if the section cannot be built."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    section = (yaml.safe_load(Path(config).read_text()) or {}).get("data")
    if not isinstance(section, Mapping):
        return None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, fail_untyped=False)
    try:
        datamodule = parser.instantiate_classes(parser.parse_object({"data": section})).data
    except Exception as error:  # any failure of the user's data section, reported with the config's name
        raise ConversionError(
            f"config {config}: its `data:` section (which gives the training classes the "
            f"checkpoint must record) cannot be built: {error}"
        ) from None
    return getattr(datamodule, "training_classes", None)


def save_converted(model: Any, destination: str | Path, source: str | Path, report: KeyReport) -> Path:
    """Write ``model`` as a Lightning checkpoint at ``destination`` (atomically) and return the path;
    the recorded hyper-parameters are the model's with ``report.hparams_updates`` applied."""
    import os

    import lightning

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    hparams = {**dict(model.hparams), **report.hparams_updates}
    dropped: dict[str, int] = defaultdict(int)
    for reason in report.dropped.values():
        dropped[reason] += 1
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        "ovseg_converted_from": {
            "file": str(source),
            "mapped": len(report.mapped),
            "dropped": dict(dropped),
            "filled": len(report.filled),
        },
    }
    if getattr(model, "_hparams_name", None):
        checkpoint["hparams_name"] = model._hparams_name
    model.on_save_checkpoint(checkpoint)
    temporary = destination.with_name(f".{destination.name}.tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, destination)
    return destination


def converter_for(method: str) -> Callable[[dict[str, Tensor], Any], tuple[dict[str, Tensor], KeyReport]]:
    """The key mapping of ``method`` (a key of :data:`CONVERTERS`)."""
    from importlib import import_module

    if method not in CONVERTERS:
        raise ConversionError(f"no converter for {method!r}; known: {', '.join(sorted(CONVERTERS))}")
    module, function = CONVERTERS[method].split(":")
    return getattr(import_module(module), function)


def convert(
    method: str,
    source: str | Path,
    destination: str | Path,
    config: str | Path,
    overrides: Sequence[str] = (),
    trust_pickle: bool = False,
) -> KeyReport:
    """Convert ``source`` (an official ``method`` checkpoint) into an ovseg checkpoint at ``destination``.

    The model of ``config`` must be the method's class; the converted weights are loaded strictly
    (every model key present, shapes equal) before anything is written.
    """
    from jsonargparse.typing import import_object

    from ovseg.methods import METHODS

    official = load_official_weights(source, trust_pickle)
    model = build_model(config, overrides)
    expected = import_object(METHODS[method]) if method in METHODS else None
    if expected is not None and not isinstance(model, expected):
        raise ConversionError(
            f"config {config} builds {type(model).__name__}, not {expected.__name__}: give the "
            f"config of the {method} model the checkpoint belongs to"
        )
    state_dict, report = converter_for(method)(official, model)
    report.check_complete(list(official), str(source))
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state_dict and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape (file vs config)", wrong))
            if keys
        )
        raise ConversionError(
            f"{source} does not fit the model of {config} ({details}); is the config the checkpoint's size?"
        )
    model.load_state_dict(state_dict, strict=True)
    if hasattr(model, "set_training_classes"):
        # mask-classification methods record their training label space (seen classes: fusion,
        # calibration, seen/unseen metrics), as a checkpoint of `ovseg fit` does
        classes = training_classes_of(config)
        if classes is None:
            report.training_classes = (
                "none in the config's data section: evaluation takes the seen classes "
                "from its DataModule's split (give the training config to record them)"
            )
        else:
            model.set_training_classes(classes)
            report.training_classes = f"{len(classes.seen_indices)} seen of {len(classes.vocabulary)} classes"
    save_converted(model, destination, source, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovseg convert",
        description="Convert an official release checkpoint into an ovseg checkpoint that "
        "`ovseg validate/test/predict --ckpt_path` accept. Extra `--model.init_args.KEY VALUE` options "
        "override the config's model section.",
    )
    parser.add_argument("method", choices=sorted(CONVERTERS), help="the method the checkpoint belongs to")
    parser.add_argument("source", type=Path, help="official checkpoint (.pth, .pt, .bin or detectron2 .pkl)")
    parser.add_argument("destination", type=Path, help="ovseg checkpoint to write (.ckpt)")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        required=True,
        help="the ovseg config of the same model (its `model:` section is used)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a checkpoint that pickles Python objects (only for files you trust)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ovseg convert``: one-line errors, exit status 2 on a bad file or config."""
    import sys

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("--") and not arg.startswith("--model.")]
    if unknown:
        parser.error(f"unrecognised option(s): {' '.join(unknown)} (only --model.* overrides are accepted)")
    try:
        report = convert(args.method, args.source, args.destination, args.config, rest, args.trust_pickle)
    except ConversionError as error:
        print(f"ovseg convert: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.summary())
    print(f"wrote {args.destination}; evaluate it with: ovseg validate -c {args.config} --ckpt_path {args.destination}")
