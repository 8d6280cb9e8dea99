"""SimZSS in release mode against the official implementation (tileb1/simzss @2142ac5).

The fixtures in tests/fixtures/simzss/ were written by scripts/golden/simzss.py, which runs the
release's own code (``SimZSS``, the DVT ``Denoiser``, ``ShallowDecoder``, ``ZSLoss``,
``make_shards_spacy.extract_nouns``) at tiny sizes with random weights. Here the release's state dict
is converted with ``ovseg convert``'s SimZSS mapping, loaded strictly into an ovseg SimZSS with the
release's switches, and every output is compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovseg.concepts import ConceptExtractor
from ovseg.convert import ConversionError, KeyReport
from ovseg.encoders.denoiser import DVTDenoiser, read_denoiser_file
from ovseg.encoders.text_transformer import CLIPTextTransformer
from ovseg.encoders.timm_vit import TimmViT
from ovseg.methods.simzss.convert import convert_state_dict, release_state_dict
from ovseg.methods.simzss.module import SimZSS

FIXTURES = Path(__file__).parent / "fixtures" / "simzss"
TOLERANCE = 1e-5
RELEASE = {"local_target": "argmax", "concept_pooling": "normalized_sum", "class_set": "global"}


def tiny_release_module(**overrides) -> SimZSS:
    """The fixtures' sizes: a DINOv2-reg4 ViT (width 64, depth 2) with the DVT denoiser, CLIP statistics,
    a 2 x 16 text tower projected to 64."""
    torch.manual_seed(0)
    vit = TimmViT.tiny(registers=True, mean="clip", std="clip")
    text = CLIPTextTransformer(width=16, layers=2, heads=2, context_length=77, output_dim=64)
    return SimZSS(DVTDenoiser(vit), text, lambda_local=1.0, **{**RELEASE, **overrides})


def golden_fixture() -> dict:
    """The release's tiny model: state dict (token embedding stored in fp16, exact), inputs, outputs."""
    fixture = torch.load(FIXTURES / "model.pt", weights_only=True)
    state = dict(fixture["state_dict"])
    state["text.token_embedding.weight"] = state["text.token_embedding.weight"].float()
    fixture["state_dict"] = state
    return fixture


def converted_module(golden: dict, report: KeyReport | None = None) -> SimZSS:
    """The fixture's release state dict converted and loaded strictly into a release-mode SimZSS."""
    module = tiny_release_module()
    state, new_report = convert_state_dict(golden["state_dict"], module)
    new_report.check_complete(list(golden["state_dict"]), "fixture")
    module.load_state_dict(state, strict=True)
    if report is not None:
        report.__dict__.update(new_report.__dict__)
    return module.eval()


@pytest.fixture(scope="module")
def golden():
    return golden_fixture()


@pytest.fixture(scope="module")
def converted(golden):
    report = KeyReport()
    return converted_module(golden, report), report


def test_every_release_key_is_mapped_or_dropped_with_a_reason(golden, converted):
    _, report = converted
    official = set(golden["state_dict"])
    assert set(report.mapped) | set(report.dropped) == official
    assert set(report.dropped) == {"classification_weights_ema", "beta_ema", "logit_scale_local"}
    assert report.mapped["text.text_projection"] == "model.text_encoder.text.text_projection"
    assert report.mapped["visual.pos_embed"] == "model.image_encoder.pos_embed"
    assert all(
        value.startswith("model.image_encoder.encoder.model.")
        for key, value in report.mapped.items()
        if key.startswith("visual.vit.model.")
    )
    assert not report.filled  # the release holds every weight ovseg's SimZSS has


def test_denoised_patch_tokens_and_text_tokens_match_the_release(golden, converted):
    module, _ = converted
    with torch.no_grad():
        image = module.model.encode_image(golden["images"])
        text = module.model.encode_text(golden["text"])
    assert image.grid == (4, 4)
    assert (image.patches - golden["patches"]).abs().max() <= TOLERANCE
    assert (text.tokens - golden["tokens"]).abs().max() <= TOLERANCE
    assert (text.pooled - golden["eos"]).abs().max() <= TOLERANCE
    # the denoiser matters: the raw ViT tokens are far from the release's output
    raw = F.normalize(module.model.image_encoder.encoder(golden["images"]).dense.flatten(2).transpose(1, 2), dim=-1)
    assert (raw - golden["patches"]).abs().max() > 0.1


def _losses(module, golden):
    image = module.model.encode_image(golden["images"])
    text = module.model.encode_text(golden["text"])
    global_loss = module.global_loss(image.pooled, F.normalize(text.pooled, dim=-1))
    indices = golden["concept_indices"]
    local = module.local_loss(text.tokens, image.patches, golden["concept_labels"], indices, indices != 0)
    return global_loss, local.loss


@pytest.mark.parametrize("name", ["cliploss", "ccloss"])
def test_losses_and_gradients_match_the_release(golden, converted, name):
    module, report = converted
    module.zero_grad()
    global_loss, local_loss = _losses(module, golden)
    loss = global_loss if name == "cliploss" else local_loss
    assert abs(float(loss.detach()) - float(golden[name])) <= TOLERANCE
    loss.backward()
    params = dict(module.named_parameters())
    for official_key, expected in golden[f"{name}_grads"].items():
        if official_key == "text.token_embedding.rows":
            grad = params["model.text_encoder.text.token_embedding.weight"].grad[golden["token_ids_used"]]
        else:
            grad = params[report.mapped[official_key]].grad
            if grad is None:
                grad = torch.zeros_like(params[report.mapped[official_key]])
        assert (grad - expected).abs().max() <= TOLERANCE, official_key


def test_the_papers_switches_change_the_local_loss(golden, converted):
    """Each release switch matters on the fixture batch (so the test above would catch a wrong one)."""
    module, _ = converted
    with torch.no_grad():
        reference = float(_losses(module, golden)[1])
        for option, paper in (("target", "label"), ("pooling", "mean")):
            release = getattr(module.local_loss, option)
            setattr(module.local_loss, option, paper)
            changed = float(_losses(module, golden)[1])
            setattr(module.local_loss, option, release)
            assert abs(changed - reference) > 1e-3, option


def test_release_concept_rules_agree_on_every_golden_caption():
    data = json.loads((FIXTURES / "concepts.json").read_text())
    extractor = ConceptExtractor(rules="release")
    assert len(extractor.bank) == data["bank_size"] and len(data["captions"]) >= 200
    mismatches = []
    for record in data["captions"]:
        got = [
            {"name": c.name, "label": c.label, "positions": list(c.token_positions)}
            for c in extractor.extract(record["caption"])
        ]
        if got != record["concepts"]:
            mismatches.append((record["caption"], got, record["concepts"]))
    assert not mismatches, mismatches[:3]


def test_release_rules_differ_from_ovsegs_where_documented():
    release, ovseg = ConceptExtractor(rules="release"), ConceptExtractor()
    caption = "a dog on a park bench"
    assert [c.name for c in ovseg.extract(caption)] == ["dog", "bench"]
    assert [c.name for c in release.extract(caption)] == ["dog"]  # "park bench" is not in the bank
    # CLIP sees "café" in its byte alphabet: the release's word search fails there and stops the caption
    assert [c.name for c in release.extract("a dog near a café and a car")] == ["dog"]
    assert [c.name for c in ovseg.extract("a dog near a café and a car")] == ["dog", "car"]
    # a CLIP word that is a prefix of the searched word ("d" of "3d", then "dog") swallows the next word
    assert [c.name for c in release.extract("a dog near a 3d dog and a car")] == ["dog"]
    with pytest.raises(ValueError, match="rules"):
        ConceptExtractor(rules="spacy")


def test_conversion_round_trip_and_errors(tmp_path):
    module = tiny_release_module()
    official = release_state_dict(module)
    other = tiny_release_module()
    state, report = convert_state_dict(official, other)
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values()))
    assert isinstance(report, KeyReport)
    plain = SimZSS(TimmViT.tiny(registers=True), CLIPTextTransformer(width=16, layers=2, heads=2, output_dim=64))
    with pytest.raises(ConversionError, match="DVTDenoiser"):
        convert_state_dict(official, plain)


def test_dvt_release_file_loads_and_a_pickled_file_is_refused(tmp_path):
    encoder = DVTDenoiser(TimmViT.tiny())
    weights = {key: value for key, value in encoder.state_dict().items() if not key.startswith("encoder.")}
    torch.save({"denoiser": {**weights, "vit.model.cls_token": torch.zeros(1)}}, tmp_path / "dvt.pth")
    loaded = DVTDenoiser(TimmViT.tiny(), checkpoint_path=str(tmp_path / "dvt.pth"))
    assert torch.equal(loaded.pos_embed, encoder.pos_embed)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.train().training
    torch.save({"denoiser": weights, "args": object.__new__(KeyReport)}, tmp_path / "pickled.pth")
    with pytest.raises(ConversionError, match="--trust-pickle|weights_only"):
        read_denoiser_file(str(tmp_path / "pickled.pth"))
    assert set(read_denoiser_file(str(tmp_path / "pickled.pth"), trust_pickle=True)) == set(weights)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="no DVT denoiser weights"):
        read_denoiser_file(str(tmp_path / "other.pth"))


# the converted checkpoint brings the denoiser: the config's DVT file is not needed (a dotted
# ``...checkpoint_path null`` reaches the encoder as the string "None" through jsonargparse)
NO_DVT_FILE = ["--model.init_args.image_encoder", '{"init_args": {"checkpoint_path": null}}']

TINY_RELEASE_YAML = """
model:
  class_path: ovseg.methods.simzss.SimZSS
  init_args:
    image_encoder:
      class_path: ovseg.encoders.DVTDenoiser
      init_args:
        checkpoint_path: {dvt}
        encoder:
          class_path: ovseg.encoders.TimmViT
          init_args:
            model_name: vit_small_patch14_reg4_dinov2
            model_kwargs: {{depth: 2, embed_dim: 64, num_heads: 2, img_size: 56}}
            mean: clip
            std: clip
    text_encoder:
      class_path: ovseg.encoders.CLIPTextTransformer
      init_args: {{width: 16, layers: 2, heads: 2, context_length: 77, output_dim: 64}}
    lambda_local: 1.0
    local_target: argmax
    concept_pooling: normalized_sum
    class_set: global
    concept_rules: release
"""


def test_ovseg_convert_writes_a_checkpoint_that_reproduces_the_release(golden, tmp_path, capsys):
    """``ovseg convert simzss`` on the release-layout fixture (a config whose DVT file is absent, overridden
    to null as docs/simzss.md says): the checkpoint loads without the config and gives the release's tokens."""
    from ovseg.convert import main as convert_main

    source = tmp_path / "simzss_release.pth"
    torch.save({f"module.{key}": value for key, value in golden["state_dict"].items()}, source)
    config = tmp_path / "tiny_release.yaml"
    config.write_text(TINY_RELEASE_YAML.format(dvt=tmp_path / "missing_dvt.pth"))
    destination = tmp_path / "simzss.ckpt"
    convert_main(["simzss", str(source), str(destination), "-c", str(config), *NO_DVT_FILE])
    out = capsys.readouterr().out
    assert "dropped 3" in out and "training-only EMA" in out
    loaded = SimZSS.load_from_checkpoint(destination, map_location="cpu").eval()
    recorded = torch.load(destination, weights_only=True)["hyper_parameters"]["image_encoder"]["init_args"]
    assert recorded["checkpoint_path"] is None and recorded["encoder"]["init_args"]["pretrained"] is False
    assert loaded.local_loss.target == "argmax" and loaded.concepts.rules == "release"
    with torch.no_grad():
        patches = loaded.model.encode_image(golden["images"]).patches
    assert (patches - golden["patches"]).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_real_size_release_state_dict_converts_and_loads_strictly(tmp_path):
    """ViT-B/14-reg4 + DVT denoiser + 12 x 512 text tower, random weights, in the release's layout, through
    the shipped config (downloads and the DVT file overridden away)."""
    from ovseg.convert import build_model, convert

    overrides = [*NO_DVT_FILE, "--model.init_args.image_encoder.init_args.encoder.init_args.pretrained", "false"]
    config = Path(__file__).parents[1] / "configs/simzss/coco_vitb14.yaml"
    torch.manual_seed(3)
    model = build_model(config, overrides)
    official = release_state_dict(model)
    assert official["visual.pos_embed"].shape == (1, 37 * 37, 768)
    assert official["text.text_projection"].shape == (512, 768)
    assert sum(key.startswith("visual.denoiser.") for key in official) == 12
    torch.save(official, tmp_path / "release.pth")
    report = convert("simzss", tmp_path / "release.pth", tmp_path / "converted.ckpt", config, overrides)
    assert set(report.mapped) | set(report.dropped) == set(official) and not report.filled
    loaded = SimZSS.load_from_checkpoint(tmp_path / "converted.ckpt", map_location="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_feature_cache_stores_denoised_tokens_and_fingerprints_the_denoiser(tmp_path):
    """A store built from a DVTDenoiser-wrapped encoder holds the denoised tokens (what SimZSS trains on),
    and a store of the plain backbone is refused for it (the fingerprint covers the denoiser)."""
    import numpy as np

    from ovseg.datamodules.feature_store import read_index
    from ovseg.prepare.feature_cache import (
        CacheViews,
        build_feature_cache,
        frozen_features,
    )

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((3, 56, 56), 40 * i, dtype=torch.uint8), "caption": "a dog"}

    module = tiny_release_module()
    views = CacheViews("center", size=56)
    build_feature_cache(module.model.image_encoder, Images(), tmp_path / "dvt", views, batch_size=3, progress=False)
    stored = torch.from_numpy(np.load(tmp_path / "dvt" / "patches_00000.npy")[:3, 0]).float()
    images = torch.stack([views.view(Images()[i]["image"], i, 0) for i in range(3)])
    denoised, _, _ = frozen_features(module.model.image_encoder, images)
    raw, _, _ = frozen_features(module.model.image_encoder.encoder, images)
    assert (stored - denoised).abs().max() < 2e-3 and (stored - raw).abs().max() > 0.1
    assert read_index(tmp_path / "dvt")["encoder_name"].startswith("dvt_denoiser(")
    build_feature_cache(
        module.model.image_encoder.encoder,
        Images(),
        tmp_path / "raw",
        views,
        batch_size=3,
        progress=False,
        max_batches=0,
    )
    with pytest.raises(ValueError, match="DVTDenoiser"):
        build_feature_cache(module.model.image_encoder, Images(), tmp_path / "raw", views, progress=False)
    other = tiny_release_module()  # same backbone, another denoiser
    with torch.no_grad():
        other.model.image_encoder.pos_embed.add_(1.0)
    with pytest.raises(ValueError, match="fingerprint"):
        build_feature_cache(other.model.image_encoder, Images(), tmp_path / "dvt", views, progress=False)
    # training from a store checks the model's encoder: the DVT store serves the DVT model only
    from ovseg.datamodules.feature_store import CachedFeaturesDataModule

    CachedFeaturesDataModule(str(tmp_path / "dvt")).check_encoder(module.model.image_encoder)
    for encoder in (module.model.image_encoder.encoder, other.model.image_encoder):
        with pytest.raises(ValueError, match="another image encoder"):
            CachedFeaturesDataModule(str(tmp_path / "dvt")).check_encoder(encoder)


def test_stored_concepts_record_their_rules():
    """Concepts stored with one set of rules are not used by a model with the other; stores written before
    the rules were recorded count as ovseg's."""
    from ovseg.concepts import concept_meta, meta_mismatch

    release, ovseg = concept_meta(ConceptExtractor(rules="release")), concept_meta(ConceptExtractor())
    assert meta_mismatch(ovseg, release) == ["rules: stored 'ovseg', model 'release'"]
    older = {key: value for key, value in ovseg.items() if key != "rules"}
    assert meta_mismatch(older, ovseg) == [] and meta_mismatch(older, release)


def test_samples_per_epoch_draws_successive_permutations():
    """The release's epoch is a number of samples (--train-num-samples), not a pass over the data."""
    from ovseg.datamodules.base import TrainDataModule

    class Numbers(TrainDataModule):
        batch_size, num_workers, pin_memory = 5, 0, False

        def setup(self, stage):
            self.train_set = [{"index": torch.tensor(i)} for i in range(10)]

    loader = Numbers(samples_per_epoch=25).train_dataloader()
    seen = torch.cat([batch["index"] for batch in loader])
    assert len(loader) == 5 and len(seen) == 25
    counts = torch.bincount(seen, minlength=10)
    assert counts.min() == 2 and counts.max() == 3  # two whole permutations, then 5 of a third
    assert len(Numbers().train_dataloader()) == 2  # default: one pass
    with pytest.raises(ValueError, match="samples_per_epoch"):
        Numbers(samples_per_epoch=0)
