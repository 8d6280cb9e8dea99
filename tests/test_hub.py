"""Hub checkpoints (ovseg.hub): save_pretrained / from_pretrained / push_to_hub and ``--ckpt_path hf://``.

Offline: the Hub is a local folder or a Hugging Face cache populated in a temp dir; ``push_to_hub``
runs against a recording stand-in for ``huggingface_hub.HfApi``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ovseg.cli import run
from ovseg.errors import MissingResourceError
from ovseg.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "-c",
    str(REPO / "configs/zegformer/synthetic.yaml"),
    "-c",
    str(REPO / "tests/fast/zegformer.yaml"),
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.num_val",
    "2",
    "--data.init_args.eval_batch_size",
    "2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ZegFormer fitted for 2 steps (validated at the end) through the CLI, and its saved folder."""
    root = tmp_path_factory.mktemp("hub")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli = run(
            [
                "fit",
                *COMMON,
                "--trainer.max_steps",
                "2",
                "--trainer.val_check_interval",
                "2",
                "--data.init_args.num_train",
                "4",
                "--data.init_args.batch_size",
                "2",
            ]
        )
    finally:
        os.chdir(cwd)
    model = cli.model.eval()
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    folder = model.save_pretrained(root / "saved")
    return model, metrics, folder, root


def test_save_pretrained_writes_weights_config_and_model_card(trained):
    from safetensors.torch import load_file

    model, _, folder, _ = trained
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "ovseg.methods.zegformer.module.ZegFormer"
    assert config["hyper_parameters"]["_class_path"] == "ovseg.methods.zegformer.ZegFormer"
    assert config["hyper_parameters"]["num_queries"] == 4  # the resolved configuration (fast overlay)
    assert config["checkpoint_state"]["ovseg_training_classes"]["unseen"] == ["sand", "snow", "kite", "umbrella"]

    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: ovseg" in card and "# ZegFormer (ovseg)" in card
    assert "ovseg.datamodules.synthetic" in card and "unseen (held out): kite, sand, snow, umbrella" in card
    results = model.last_results["synthetic"]
    row = next(line for line in card.splitlines() if line.startswith("| synthetic |"))
    assert f"{float(results['mIoU']):.2f}" in row and f"{float(results['hIoU']):.2f}" in row


def test_from_pretrained_rebuilds_the_method_and_refuses_another(trained):
    from ovseg.methods.simzss import SimZSS
    from ovseg.methods.zegformer import ZegFormer

    model, _, folder, _ = trained
    loaded = ZegFormer.from_pretrained(f"hf://{folder}")
    assert loaded.training_classes == model.training_classes
    assert dict(loaded.hparams) == dict(model.hparams)  # it can be saved again
    with pytest.raises(ValueError, match="saved by the method ovseg.methods.zegformer.*configured is.*SimZSS"):
        SimZSS.from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        ZegFormer.from_pretrained(str(folder.parent))


def test_from_pretrained_imports_no_class_a_config_names_outside_ovseg(trained, tmp_path):
    """A downloaded config.json cannot make from_pretrained import arbitrary modules."""
    import sys

    from ovseg.module import OVSegModule

    _, _, folder, _ = trained
    shutil.copytree(folder, tmp_path / "evil")
    config = json.loads((tmp_path / "evil" / "config.json").read_text())
    config["method"] = config["hyper_parameters"]["_class_path"] = "ovseg_untrusted_module.Method"
    (tmp_path / "evil" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names the class ovseg_untrusted_module.Method, which is not an ovseg"):
        OVSegModule.from_pretrained(str(tmp_path / "evil"))
    assert "ovseg_untrusted_module" not in sys.modules


def test_a_lightning_checkpoint_goes_to_the_hub_format(trained, tmp_path):
    """``from_pretrained("last.ckpt")`` rebuilds the fitted model with its configuration, so it can be
    saved (or pushed) as is: same config.json and the same predictions."""
    from ovseg.module import OVSegModule

    model, _, folder, root = trained
    loaded = OVSegModule.from_pretrained(str(root / "runs/zegformer_synthetic/checkpoints/last.ckpt"))
    resaved = loaded.save_pretrained(tmp_path / "from_ckpt")
    assert json.loads((resaved / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    images, vocabulary = torch.rand(1, 3, 48, 56), Vocabulary.from_names(["sky", "sand", "kite"])
    torch.testing.assert_close(
        loaded.eval().class_probabilities(images, vocabulary),
        model.class_probabilities(images, vocabulary),
        atol=0,
        rtol=0,
    )
    torch.save({"state_dict": model.state_dict()}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="records no hyper-parameters"):
        OVSegModule.from_pretrained(str(tmp_path / "bare.ckpt"))


def test_a_model_without_recorded_configuration_cannot_be_saved(tmp_path):
    from ovseg.encoders import CLIPTextTransformer, TimmViT
    from ovseg.methods.simzss import SimZSS

    model = SimZSS(TimmViT.tiny(), CLIPTextTransformer.tiny(output_dim=64))
    with pytest.raises(ValueError, match="records no configuration"):
        model.save_pretrained(tmp_path)


def test_push_to_hub_uploads_the_saved_folder(trained, monkeypatch):
    """No network: a stand-in HfApi records the calls and the files it would upload."""
    calls: list[tuple[str, dict]] = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = {p.name: p.stat().st_size for p in Path(folder_path).iterdir()}
            calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    model, _, folder, _ = trained
    url = model.push_to_hub("org/zegformer-synthetic", private=True, token="hf_x")
    assert url == "https://huggingface.co/org/zegformer-synthetic/commit/abc"
    assert [name for name, _ in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[0][1] == {"token": "hf_x"}
    assert calls[1][1] == {
        "repo_id": "org/zegformer-synthetic",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    uploaded = calls[2][1]["files"]  # what save_pretrained writes, the same weights
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["model.safetensors"] == (folder / "model.safetensors").stat().st_size


def test_cli_validates_hub_models_like_the_fitted_model(trained, hf_cache, tmp_path, monkeypatch):
    """``--ckpt_path hf://ORG/NAME`` (from a pre-populated HF cache, offline) and ``hf:///FOLDER``
    reproduce the fit's seen / unseen / hIoU; ``fit`` refuses them."""
    _, metrics, folder, _ = trained
    monkeypatch.chdir(tmp_path)
    hf_cache("org/zegformer-synthetic", folder)
    for ckpt in ("hf://org/zegformer-synthetic", f"hf://{folder}"):
        validated = run(["validate", *COMMON, "--ckpt_path", ckpt])
        for key in ("val/synthetic/mIoU_seen", "val/synthetic/mIoU_unseen", "val/synthetic/hIoU"):
            assert float(validated.trainer.callback_metrics[key]) == pytest.approx(metrics[key], abs=1e-6), key
    converted = list((hf_cache.home / "ovseg-checkpoints").glob("*.ckpt"))
    assert len(converted) == 2  # one weights-only Lightning checkpoint per model, next to the HF cache
    with pytest.raises(ValueError, match="hold weights, not a training state"):
        run(["fit", *COMMON, "--ckpt_path", "hf://org/zegformer-synthetic"])
    with pytest.raises(MissingResourceError, match="could not get the ovseg model 'org/missing'"):
        run(["validate", *COMMON, "--ckpt_path", "hf://org/missing"])
