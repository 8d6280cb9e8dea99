"""CDT (MAFT+): transfer block, RC and mask-aware losses, deformable sampling, inference rule,
what is trained and at which learning rate, and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.datamodules.synthetic.datamodule import SyntheticDataModule
from ovseg.encoders.open_clip import tiny_open_clip_config
from ovseg.masks import MaskTargets
from ovseg.methods.cdt import CDT
from ovseg.methods.cdt.losses import mask_aware_loss, representation_compensation_loss
from ovseg.methods.cdt.model import inference_class_probs, ms_deform_attn_sample
from ovseg.methods.cdt.module import crop_padding
from ovseg.methods.cdt.transfer import ContentDependentTransfer
from ovseg.module import MaskPredictions
from ovseg.vocabulary import Vocabulary

TINY_HEAD = dict(
    num_queries=4,
    conv_dim=32,
    mask_dim=32,
    hidden_dim=32,
    enc_layers=1,
    enc_heads=4,
    enc_ffn_dim=32,
    dec_layers=3,
    dec_heads=4,
    dec_ffn_dim=32,
    cdt_heads=4,
    num_points=256,
)


def tiny_cdt(**kwargs) -> CDT:
    torch.manual_seed(0)
    args = dict(clip_config=tiny_open_clip_config("convnext"), **TINY_HEAD)
    args.update(kwargs)
    return CDT(**args)


def synthetic_batch(size: int = 64, batch: int = 4):
    data = SyntheticDataModule(num_train=batch, batch_size=batch, image_size=size, unseen_in_training="ignored")
    return data, next(iter(data.train_dataloader()))


# ------------------------------------------------------------------------------ CDT block
@pytest.mark.parametrize("residual", ["semantic", "panoptic"])
def test_transfer_shapes(residual):
    cdt = ContentDependentTransfer(16, 4, residual)
    out = cdt(torch.randn(2, 5, 16), torch.randn(2, 16, 3, 4))
    assert out.shape == (2, 5, 16)
    shared = cdt(torch.randn(5, 16), torch.randn(2, 16, 3, 4))  # one (K+1, D) classifier for the batch
    assert shared.shape == (2, 5, 16)


def test_panoptic_transfer_is_identity_at_init_and_semantic_is_layer_normed():
    text, visual = torch.randn(2, 5, 16), torch.randn(2, 16, 3, 4)
    assert torch.equal(ContentDependentTransfer(16, 4, "panoptic")(text, visual), text)
    semantic = ContentDependentTransfer(16, 4, "semantic")(text, visual)
    assert torch.allclose(semantic.mean(-1), torch.zeros(2, 5), atol=1e-5)  # LN output, not re-normalised
    assert torch.allclose(semantic.pow(2).mean(-1), torch.ones(2, 5), atol=1e-3)


# ------------------------------------------------------------------------------ RC loss
def pod_loop(x: torch.Tensor) -> torch.Tensor:
    """Plain POD descriptor: explicit windows and sums."""
    x = x.relu()
    b, c, h, w = x.shape
    if h != w:
        x = F.interpolate(x, size=(max(h, w),) * 2, mode="bilinear", align_corners=False)
        w = max(h, w)
    parts = []
    for scale in (1, 2, 4):
        k = max(w // scale, 1)
        n = w // k
        grid = torch.zeros(b, c, n, n)
        for i in range(n):
            for j in range(n):
                grid[:, :, i, j] = x[:, :, i * k : (i + 1) * k, j * k : (j + 1) * k].mean((-1, -2))
        height_sum = torch.stack([sum(grid[:, :, i, j] for i in range(n)) for j in range(n)], -1)
        width_sum = torch.stack([sum(grid[:, :, i, j] for j in range(n)) for i in range(n)], -1)
        parts += [height_sum.flatten(1), width_sum.flatten(1)]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 6, 9), (1, 2, 5, 5)])
def test_rc_loss_matches_a_plain_computation(shape):
    student, teacher = torch.randn(shape), torch.randn(shape)
    diff = pod_loop(student) - pod_loop(teacher)
    expected = torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean()
    assert torch.allclose(representation_compensation_loss(student, teacher), expected, atol=1e-5)


def test_rc_loss_is_zero_for_identical_features_and_trains_the_student_only():
    teacher = torch.randn(2, 4, 8, 8)
    assert representation_compensation_loss(teacher.clone(), teacher).item() == 0.0
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    teacher.requires_grad_(True)
    representation_compensation_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


# ------------------------------------------------------------------------------ mask-aware loss
def mask_aware_loop(class_logits, mask_logits, targets):
    values = []
    probs = class_logits.softmax(-1)
    for b, target in enumerate(targets):
        size = target.masks.shape[-2:]
        masks = F.interpolate(mask_logits[b : b + 1], size=size, mode="bilinear", align_corners=False)[0].sigmoid()
        for label, gt in zip(target.labels.tolist(), target.masks):
            ious = []
            for n in range(masks.shape[0]):
                inter = (masks[n] * gt).sum()
                ious.append(inter / (masks[n].sum() + gt.sum() - inter))
            ious = torch.stack(ious)
            ious = (ious - ious.min()) / (ious.max() - ious.min())
            for n in range(masks.shape[0]):
                d = (probs[b, n, label] - ious[n]).abs()
                values.append(0.5 * d**2 if d < 1 else d - 0.5)
    return torch.stack(values).mean()


def test_mask_aware_loss_matches_a_plain_computation():
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(2, 5, 3), torch.randn(2, 5, 4, 4)
    targets = [
        MaskTargets(torch.tensor([0, 2]), (torch.rand(2, 8, 8) > 0.5).float()),
        MaskTargets(torch.tensor([1]), (torch.rand(1, 12, 12) > 0.5).float()),
    ]
    loss = mask_aware_loss(class_logits, mask_logits, targets)
    assert torch.allclose(loss, mask_aware_loop(class_logits, mask_logits, targets), atol=1e-6)
    # images without segments are skipped; a batch without any gives 0 with a graph
    empty = MaskTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8, 8))
    assert torch.allclose(
        mask_aware_loss(class_logits, mask_logits, [targets[0], empty]),
        mask_aware_loop(class_logits[:1], mask_logits[:1], targets[:1]),
        atol=1e-6,
    )
    logits = class_logits.clone().requires_grad_(True)
    zero = mask_aware_loss(logits, mask_logits, [empty, empty])
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))  # no stray gradient


# ------------------------------------------------------------------------------ deformable sampling
def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """(C, H, W) at normalised (x, y), pixel coordinates x W - 0.5 (zeros outside): CUDA op's rule."""
    c, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            out += (1 - abs(px - xx)) * (1 - abs(py - yy)) * value[:, yy, xx]
    return out


def test_deformable_sampling_equals_direct_bilinear():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 5)]
    b, heads, c, queries, points = 2, 2, 3, 3, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, c)
    locations = torch.rand(b, queries, heads, len(shapes), points, 2) * 1.2 - 0.1  # some outside
    weights = torch.rand(b, queries, heads, len(shapes), points)
    out = ms_deform_attn_sample(value, shapes, locations, weights)
    assert out.shape == (b, queries, heads * c)
    levels = value.split([h * w for h, w in shapes], 1)
    for bi, q, m in [(0, 0, 0), (1, 2, 1), (0, 1, 1)]:
        expected = torch.zeros(c)
        for lv, (h, w) in enumerate(shapes):
            v = levels[lv][bi, :, m].T.reshape(c, h, w)
            for p in range(points):
                x, y = locations[bi, q, m, lv, p].tolist()
                expected += weights[bi, q, m, lv, p] * bilinear(v, x, y)
        assert torch.allclose(out[bi, q, m * c : (m + 1) * c], expected, atol=1e-5)


# ------------------------------------------------------------------------------ inference rule
def test_inference_rule_on_a_hand_worked_example():
    # one image, two masks, K = 2 classes + void
    in_logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]]])  # p_void = 1/2, 1/3
    out_logits = torch.tensor([[[math.log(3.0), 0.0, 9.0], [0.0, 0.0, -9.0]]])  # void column ignored
    probs = inference_class_probs(in_logits, out_logits)
    expected = torch.tensor([[[0.75 * 0.5, 0.25 * 0.5], [0.5 * 2 / 3, 0.5 * 2 / 3]]])
    assert torch.allclose(probs, expected, atol=1e-6)
    masks = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])  # sigmoid: 1/2, 3/4
    scores = MaskPredictions(masks, probs).pixel_scores()
    assert torch.allclose(scores[0, :, 0, 0], torch.tensor([0.375 * 0.5 + 1 / 3 * 0.75, 0.125 * 0.5 + 1 / 3 * 0.75]))


def test_crop_padding_slices_or_resamples_the_image_region():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)  # value = column index (cell centre 4i+2 px)
    assert torch.equal(crop_padding(ramp, (24, 32), (32, 32)), ramp[..., :6, :8])
    cropped = crop_padding(ramp, (32, 30), (32, 32))  # 8 output columns span 30 pixels
    centres = (torch.arange(8) + 0.5) * 30 / 8
    assert cropped.shape == (1, 1, 8, 8) and torch.allclose(
        cropped[0, 0, 0], (centres / 4 - 0.5).clamp(min=0), atol=1e-5
    )


# ------------------------------------------------------------------------------ the module
def test_predict_scores_shapes_for_convnext_and_vit():
    images = torch.rand(2, 3, 50, 70)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    for kind in ("convnext", "vit"):
        model = tiny_cdt(clip_config=tiny_open_clip_config(kind)).eval()
        with torch.no_grad():
            out = model.predict_scores(images, text, vocabulary=Vocabulary.from_names(["a", "b", "c"]))
        assert out.mask_logits.shape == (2, 4, 13, 18) and out.class_probs.shape == (2, 4, 3)
        assert torch.all(out.class_probs.sum(-1) <= 1 + 1e-6)


def test_what_is_trained_and_at_which_learning_rate(tmp_path):
    model = tiny_cdt(
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), lr_multipliers={"model.backbone.": 0.1}
    )
    data, batch = synthetic_batch()
    model.set_training_classes(data.training_classes)
    model.train()
    terms = model.training_loss(batch)
    assert set(terms) == {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_mask_aware", "loss_rc"}
    terms["loss"].backward()
    optimizer = model.configure_optimizers()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    trunk = [
        n
        for n in params
        if n.startswith("model.backbone.encoder.visual.trunk.")
        and not n.startswith("model.backbone.encoder.visual.trunk.head.")
    ]
    head = [
        n
        for n in params
        if n.startswith(("model.backbone.encoder.visual.trunk.head.", "model.backbone.encoder.visual.head."))
    ]
    frozen = head + [n for n in params if n.startswith(("text_encoder.", "teacher."))]
    assert trunk and head
    for name in trunk:  # fine-tuned at x0.1 by the mask-aware and RC losses
        assert lr_of[id(params[name])] == pytest.approx(1e-4), name
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in trunk)
    for name in frozen:  # text tower, CLIP head, teacher: no gradient, not in the optimizer
        assert not params[name].requires_grad and params[name].grad is None and id(params[name]) not in lr_of
    assert "model.clip_logit_scale" in dict(model.named_buffers())  # CLIP's logit scale: a buffer
    for name in (
        "model.cdt.linear.weight",
        "model.void_embedding.weight",
        "model.decoder.logit_scale",
        "model.pixel_decoder.mask_features.weight",
        "model.decoder.query_feat.weight",
    ):
        assert lr_of[id(params[name])] == pytest.approx(1e-3), name
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # the teacher is training-only state: not in checkpoints, which still load strictly
    state = model.state_dict()
    assert not any(key.startswith("teacher.") for key in state)
    fresh = tiny_cdt()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model.decoder.query_feat.weight, model.model.decoder.query_feat.weight)
    assert model.teacher.training is False and model.text_encoder.training is False


def test_ablation_flag_removes_the_transfer_block():
    model = tiny_cdt(use_cdt=False)
    assert model.model.cdt is None and not any(".cdt." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="cdt_dim"):
        tiny_cdt(cdt_dim=64)


def test_short_training_decreases_the_loss():
    model = tiny_cdt(num_points=None)
    data, batch = synthetic_batch(size=64, batch=4)
    model.set_training_classes(data.training_classes)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(15):
        loss = model.training_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_paper_config_weight_decay_is_the_releases():
    """configs/cdt/coco_stuff_convnext_*.yaml: no decay exactly on norm layers and nn.Embedding tables
    (detectron2's WEIGHT_DECAY_NORM/EMBED 0), decay on everything else (biases, level_embed, scales)."""
    from pathlib import Path

    import yaml

    from ovseg.optim import parameter_groups

    config = Path(__file__).parents[1] / "configs" / "cdt" / "coco_stuff_convnext_l.yaml"
    args = yaml.safe_load(config.read_text())["model"]["init_args"]
    model = tiny_cdt()
    groups = parameter_groups(model, None, args["no_weight_decay"], args["no_decay_on_1d"], args["no_decay_on_norms"])
    undecayed = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)
    expected = {
        id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False) if p.requires_grad
    }
    assert undecayed == expected
    decayed = {n for g in groups if "weight_decay" not in g for n in g["names"]}
    assert {"model.pixel_decoder.level_embed", "model.decoder.logit_scale", "model.cdt.linear.bias"} <= decayed


def test_training_names_with_synonyms_take_the_max_logit(tmp_path):
    data, batch = synthetic_batch()
    names = [", ".join((name, f"{name} thing")) for name in data.training_classes.vocabulary.display_names]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n")

    def model_with(**kwargs) -> CDT:
        model = tiny_cdt(**kwargs)
        model.set_training_classes(data.training_classes)
        return model

    model = model_with(training_class_names=str(path), synonym_logit_max=True)
    vocabulary = model.training_vocabulary()
    assert len(vocabulary.queries) == 2 * len(vocabulary) == 2 * model.num_training_classes
    assert torch.isfinite(model.training_loss(batch)["loss"])
    with pytest.raises(ValueError, match="synonym_logit_max"):
        model_with(training_class_names=str(path)).training_loss(batch)
    path.write_text("\n".join(names[:-1]) + "\n")
    with pytest.raises(ValueError, match="one line per label value"):
        model_with(training_class_names=str(path), synonym_logit_max=True).training_vocabulary()
    with pytest.raises(FileNotFoundError, match="coco_stuff_with_prompt_eng"):
        model_with(training_class_names=str(tmp_path / "missing.txt")).training_vocabulary()


def test_reduce_synonym_logits_takes_the_max_per_class_and_keeps_void():
    from ovseg.methods.cdt.model import reduce_synonym_logits

    logits = torch.tensor([[1.0, 5.0, 2.0, 3.0, -1.0]])  # names of classes 0, 1, 1, 0 and void
    reduced = reduce_synonym_logits(logits, torch.tensor([0, 1, 1, 0]))
    assert torch.equal(reduced, torch.tensor([[3.0, 5.0, -1.0]]))
    assert reduce_synonym_logits(logits, None) is logits


def test_packaged_maftplus_training_names_follow_the_coco_stuff_label_order() -> None:
    """MAFT+'s synonym list (the paper configs' training names) is in COCO-Stuff's label order:
    each line's first name is ovseg's COCO-Stuff name up to spaces and hyphens."""
    from ovseg.vocabulary import Vocabulary

    maftplus = Vocabulary.from_file("packaged:coco_stuff_maftplus")
    coco = Vocabulary.from_file("packaged:coco_stuff")
    assert len(maftplus) == len(coco) == 171
    squash = str.maketrans("", "", " -")
    differing = [
        k for k in range(171) if maftplus.classes[k][0].translate(squash) != coco.classes[k][0].translate(squash)
    ]
    assert differing == [84]  # "building" for "building-other"
    assert maftplus.classes[0][:3] == ("person", "child", "girl")
