"""ovseg models on the Hugging Face Hub: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A saved model is a folder (or a Hub repository) holding:

* ``model.safetensors``: the module's state dict (what a Lightning checkpoint's ``state_dict`` holds);
* ``config.json``: the resolved configuration that rebuilds the module (the LightningCLI
  hyper-parameters recorded by :class:`~ovseg.module.OVSegModule`, ``_class_path`` included), the
  method's class path and the extra state the method keeps in its checkpoints (e.g. the training
  classes of ZegFormer / CDT);
* ``README.md``: a model card naming the method, the training data and the evaluation table.

``ovseg validate --ckpt_path hf://ORG/NAME`` (or ``hf://ORG/NAME@REVISION``, or ``hf:///LOCAL/FOLDER``)
turns such a folder into a Lightning checkpoint (weights only, cached next to the Hugging Face cache)
with :func:`resolve_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ovseg.errors import MissingResourceError, UserError

if TYPE_CHECKING:
    from ovseg.module import OVSegModule

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HUB_PREFIX = "hf://"
FORMAT = "ovseg-hub-1"


def _jsonable(value: Any, key: str) -> Any:
    """``value`` as JSON, or a clear error naming the configuration key that cannot be written."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as err:
        raise UserError(
            f"the configuration entry {key!r} cannot be written as JSON ({err}); build the model "
            "through LightningCLI (ovseg fit/validate) or from YAML-style arguments"
        ) from err


def model_config(module: OVSegModule) -> dict[str, Any]:
    """``config.json`` content: format, method, hyper-parameters and the method's extra checkpoint state."""
    hparams = dict(module.hparams)
    if not hparams:
        raise UserError(
            f"this {type(module).__name__} records no configuration (it was not built by LightningCLI or "
            "from_pretrained), so it could not be rebuilt from the Hub: build it with `ovseg fit ...` or "
            "OVSegModule.from_pretrained"
        )
    hparams.setdefault("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    extra: dict[str, Any] = {}
    module.on_save_checkpoint(extra)
    return {
        "format": FORMAT,
        "method": extra.pop(module.CHECKPOINT_METHOD_KEY),
        "hyper_parameters": _jsonable(hparams, "hyper_parameters"),
        "checkpoint_state": {key: _jsonable(value, key) for key, value in extra.items()},
    }


def save_pretrained(
    module: OVSegModule,
    save_directory: str | os.PathLike,
    training_data: str | None = None,
    eval_results: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a ``README.md`` model card to ``save_directory``.

    Args:
        module: the model.
        save_directory: created if needed; existing files of the same names are overwritten.
        training_data: a line on the training data for the card (default: the trainer's DataModule and
            the training classes, where known).
        eval_results: ``{benchmark: {metric: value}}`` for the card (default: the last validation or
            test results, ``module.last_results``).
    """
    from safetensors.torch import save_file

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(module)
    state = {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "ovseg_method": config["method"]})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(model_card(module, config, training_data, eval_results))
    return folder


def model_card(
    module: OVSegModule,
    config: Mapping[str, Any],
    training_data: str | None = None,
    eval_results: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """A Hub model card (YAML metadata + Markdown): method, training data, evaluation table, usage."""
    from huggingface_hub import ModelCardData

    method = config["method"]
    short = method.rsplit(".", 1)[-1]
    if training_data is None:
        datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
        training_data = f"`{type(datamodule).__module__}.{type(datamodule).__name__}`" if datamodule else "not recorded"
    classes = config["checkpoint_state"].get("ovseg_training_classes")
    if classes is not None:
        unseen = set(classes["unseen"])
        seen = [names[0] for names in classes["classes"] if names[0] not in unseen]
        training_data += (
            f"; {len(seen)} seen classes ({', '.join(seen[:20])}{', ...' if len(seen) > 20 else ''})"
            f", unseen (held out): {', '.join(sorted(unseen)) or 'none'}"
        )
    results = eval_results if eval_results is not None else getattr(module, "last_results", {}) or {}
    rows = []
    columns = sorted(
        {
            key
            for metrics in results.values()
            for key in metrics
            if key in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc", "mAcc")
        }
    )
    if results and columns:
        rows.append("| benchmark | " + " | ".join(columns) + " |")
        rows.append("|---" * (len(columns) + 1) + "|")
        for name, metrics in results.items():
            values = [f"{float(metrics[key]):.2f}" if key in metrics else "-" for key in columns]
            rows.append(f"| {name} | " + " | ".join(values) + " |")
    table = "\n".join(rows) if rows else "No evaluation recorded with this model."
    card_data = ModelCardData(
        library_name="ovseg",
        pipeline_tag="image-segmentation",
        tags=["ovseg", "open-vocabulary-segmentation", short.lower()],
    )
    return (
        f"---\n{card_data.to_yaml()}\n---\n\n# {short} (ovseg)\n\n"
        f"Open-vocabulary semantic segmentation with ovseg's `{method}`.\n\n"
        f"## Training data\n\n{training_data}\n\n"
        f"## Evaluation (%)\n\n{table}\n\n"
        "## Usage\n\n```python\nfrom ovseg.module import OVSegModule\n\n"
        'model = OVSegModule.from_pretrained("ORG/NAME").eval()\n'
        'labels = model.segment(image, ["sky", "grass", "a red ball"])[0]\n```\n\n'
        "or `ovseg validate -c CONFIG.yaml --ckpt_path hf://ORG/NAME`.\n\n"
        "`config.json` holds the configuration that rebuilds the model; `model.safetensors` its weights.\n"
    )


def parse_hub_path(path: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME[@REVISION]`` or ``hf:///LOCAL/FOLDER`` -> (repo id or folder, revision)."""
    target = path.removeprefix(HUB_PREFIX)
    if target.startswith("/") or os.path.isdir(target):
        return target, None
    repo, _, revision = target.partition("@")
    return repo, revision or None


def snapshot(name_or_path: str, revision: str | None = None) -> Path:
    """The local folder of a saved model: ``name_or_path`` itself, or its Hub snapshot (downloaded
    through the Hugging Face cache, or found there when offline)."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(
                    name_or_path, revision=revision, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "README.md"]
                )
            )
        except Exception as err:  # not found, offline without a cached copy, no access
            raise MissingResourceError(
                f"could not get the ovseg model {name_or_path!r} from the Hub (a local folder or "
                f"ORG/NAME; offline it must be in the Hugging Face cache): {str(err).splitlines()[0]}"
            ) from err
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no {name}: not a model saved by ovseg's save_pretrained")
    return folder


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a saved model folder."""
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise UserError(
            f"{folder / CONFIG_NAME} is not an ovseg model config (format {config.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return config, load_file(str(folder / WEIGHTS_NAME), device="cpu")


def lightning_checkpoint(config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A weights-only Lightning checkpoint dict equivalent to a saved model."""
    import lightning

    return {
        "state_dict": state,
        "hyper_parameters": dict(config["hyper_parameters"]),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "ovseg_method": config["method"],
        **config["checkpoint_state"],
    }


def from_pretrained(
    cls: type[OVSegModule],
    name_or_path: str,
    revision: str | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> OVSegModule:
    """Rebuild a saved model from a local folder, a Hub repository ``ORG/NAME`` (``hf://`` optional)
    or a Lightning checkpoint file written by ``ovseg fit`` or ``ovseg convert``.

    ``cls`` is :class:`~ovseg.module.OVSegModule` (any method) or a method class (the saved method
    must be it, or a subclass or base class of it; otherwise a ``ValueError`` names both). The model
    records its configuration, so it can be saved again (``.ckpt`` -> ``push_to_hub``).
    """
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    if os.path.isfile(name_or_path):
        checkpoint = torch.load(name_or_path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or not checkpoint.get("hyper_parameters"):
            raise UserError(
                f"{name_or_path} records no hyper-parameters: only checkpoints of models built by "
                "LightningCLI (ovseg fit, ovseg convert) can be rebuilt without their YAML"
            )
    else:
        folder = (
            snapshot(*parse_hub_path(name_or_path))
            if name_or_path.startswith(HUB_PREFIX)
            else snapshot(name_or_path, revision)
        )
        checkpoint = lightning_checkpoint(*read_folder(folder))
    hparams = dict(checkpoint["hyper_parameters"])
    stored = cls.checkpoint_method(checkpoint)
    if stored is None:
        raise UserError(f"{name_or_path} names no method (no ovseg_method, no _class_path hyper-parameter)")
    method = _method_class(hparams.get("_class_path", stored), name_or_path)
    _method_class(stored, name_or_path)  # imported with the method above, for a genuine model
    cls.check_checkpoint_method(checkpoint, cls, f"the model {name_or_path}")
    if not issubclass(method, cls):
        raise UserError(f"the model {name_or_path} names {stored}, not an ovseg method of type {cls.__name__}")
    hparams.pop("_instantiator", None)
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        module = instantiate_module(method, hparams)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module.to(map_location)


def _method_class(class_path: str, source: str) -> type:
    """The class a downloaded config names: an ovseg method (``ovseg.methods.METHODS``) or a class whose
    module is already imported; nothing else is imported on a config's word."""
    import sys

    from jsonargparse.typing import import_object

    from ovseg.methods import METHODS

    module = class_path.rpartition(".")[0]
    if class_path not in METHODS.values() and module not in sys.modules:
        raise UserError(
            f"the model {source} names the class {class_path}, which is not an ovseg method "
            f"({', '.join(METHODS.values())}); import its module first if you trust it"
        )
    method = import_object(class_path)
    if not isinstance(method, type):
        raise UserError(f"the model {source} names {class_path}, which is not a class")
    return method


def push_to_hub(
    module: OVSegModule,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload ovseg model",
    training_data: str | None = None,
    eval_results: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """``save_pretrained`` to a temporary folder, then create ``repo_id`` (if needed) and upload it.

    Returns the URL of the commit. Needs the network and a token with write access.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(module, tmp, training_data, eval_results)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, repo_type="model")
    return str(getattr(commit, "commit_url", commit))


def resolve_checkpoint(path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``hf://ORG/NAME[@REVISION]`` or ``hf:///FOLDER`` -> a local weights-only Lightning checkpoint file.

    The file is written once per model version under ``cache_dir`` (default:
    ``$HF_HOME/ovseg-checkpoints``, i.e. next to the Hugging Face cache) and reused. Other paths are
    returned unchanged.
    """
    if not path.startswith(HUB_PREFIX):
        return path
    folder = snapshot(*parse_hub_path(path))
    weights = folder / WEIGHTS_NAME
    stat = weights.stat()
    key = hashlib.sha256(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    if cache_dir is None:
        from huggingface_hub.constants import HF_HOME

        cache_dir = Path(HF_HOME) / "ovseg-checkpoints"
    target = Path(cache_dir) / f"{folder.name}-{key}.ckpt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        config, state = read_folder(folder)
        _method_class(config["hyper_parameters"].get("_class_path", config["method"]), path)
        partial = target.with_suffix(".tmp")
        torch.save(lightning_checkpoint(config, state), partial)
        partial.replace(target)
    return str(target)
