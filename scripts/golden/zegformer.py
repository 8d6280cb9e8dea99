"""Golden fixtures for ovseg's ZegFormer from the official implementation (not run in CI).

Runs ZegFormer's own modules (``dingjiansw101/ZegFormer`` @8cb9e8f: ``MaskFormer``, ``ZegFormerHead``,
``BasePixelDecoder``, ``TransformerZeroshotPredictor``, ``SetCriterion``, ``HungarianMatcher``, its
vendored OpenAI CLIP) on detectron2's ResNet, at tiny sizes with random weights, on CPU in fp32, and
writes what ``tests/test_zegformer_official.py`` compares ovseg against:

- ``tests/fixtures/zegformer/golden.pt``: the configuration (sizes, classes, templates), the state
  dict in the **official key layout** (weights drawn fp16-exact and stored in fp16, logit scales in
  fp32; the CLIP token embedding stored as the rows of the tokens the prompts use, every other row
  is 0 in the model that produced the outputs), and the official
  outputs: proposals (class logits, stride-4 mask logits, all decoder layers), the CLIP branch
  (16x16-average-pooled 224-px crops, image features) and the fused, calibrated semantic map of one
  inference image, and the same for designed proposals (compact, one row, one column, one pixel,
  empty, in the padding) that replace the head's masks at the padded resolution; the Hungarian
  assignment of every decoder layer and the set losses of a training batch;
- ``tests/fixtures/zegformer/official_r101_shapes.json``: key -> shape of the official state dict
  at real size (R-101, 256-wide heads, 100 queries, 6 layers), for the strict-loading test.

Usage (the mirrors are bare git repositories; export their trees first)::

    mkdir -p /tmp/golden/zegformer /tmp/golden/detectron2
    git -C /work/.mirror/dingjiansw101+ZegFormer/repo archive HEAD mask_former | tar -x -C /tmp/golden/zegformer
    git -C /work/.mirror/facebookresearch+detectron2/repo archive HEAD detectron2 | tar -x -C /tmp/golden/detectron2
    python scripts/golden/zegformer.py --zegformer /tmp/golden/zegformer --detectron2 /tmp/golden/detectron2

Two things are adapted to run the release on a CPU in fp32, both outside its code: OpenAI CLIP is
built from the official ``model.CLIP`` class at a tiny size instead of being downloaded
(``clip.load`` is replaced), ``Tensor.cuda`` is the identity (the prompt-ensembling helper calls
it), and the CLIP-branch text features keep fp32 where the release casts them to fp16 for its
fp16 GPU CLIP (``.half()`` on them returns them unchanged). The CLIP logit scale is 100 (exactly
representable in fp16, as OpenAI's trained value).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "zegformer"

# ---------------------------------------------------------------------------- tiny configuration
ALL_CLASSES = ["person", "traffic light", "sky-other", "wall-concrete", "giraffe", "grass"]  # seen, then unseen
UNSEEN = ["giraffe", "grass"]
SEEN = [name for name in ALL_CLASSES if name not in UNSEEN]
SEGMENT_TEMPLATE = "A photo of a {} in the scene"  # PROMPT_ENSEMBLE_TYPE "single"
CLIP_WIDTH, CLIP_PATCH, CLIP_IMAGE = 64, 16, 224  # the release crops at 224
TINY = {
    "num_queries": 8,
    "conv_dim": 32,
    "mask_dim": 32,
    "hidden_dim": 32,
    "dec_layers": 3,
    "heads": 2,
    "ffn_dim": 64,
    "dropout": 0.0,
    "stem": 64,
    "res2_out": 8,
    "width_per_group": 2,
    "depth": 50,
}
REAL = {
    "num_queries": 100,
    "conv_dim": 256,
    "mask_dim": 256,
    "hidden_dim": 256,
    "dec_layers": 6,
    "heads": 8,
    "ffn_dim": 2048,
    "dropout": 0.1,
    "stem": 64,
    "res2_out": 256,
    "width_per_group": 64,
    "depth": 101,
}
PIXEL_MEAN, PIXEL_STD = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]
CLIP_MEAN, CLIP_STD = [122.7709383, 116.7460125, 104.09373615], [68.5005327, 66.6321579, 70.3231630]
EVAL_IMAGE, EVAL_OUTPUT = (90, 130), (45, 65)  # padded to 96 x 160; the map is resized to the output size
TRAIN_IMAGE = (40, 56)  # padded to 64 x 64


def resnet_cfg(size: dict[str, Any]) -> SimpleNamespace:
    resnets = SimpleNamespace(
        NORM="FrozenBN",
        STEM_OUT_CHANNELS=size["stem"],
        DEPTH=size["depth"],
        NUM_GROUPS=1,
        WIDTH_PER_GROUP=size["width_per_group"],
        RES2_OUT_CHANNELS=size["res2_out"],
        STRIDE_IN_1X1=False,
        RES5_DILATION=1,
        DEFORM_ON_PER_STAGE=[False] * 4,
        DEFORM_MODULATED=False,
        DEFORM_NUM_GROUPS=1,
        OUT_FEATURES=["res2", "res3", "res4", "res5"],
    )
    return SimpleNamespace(MODEL=SimpleNamespace(RESNETS=resnets, BACKBONE=SimpleNamespace(FREEZE_AT=0)))


class KeepFloat(torch.Tensor):
    """The CLIP-branch text features: ``.half()`` keeps fp32 (the release's fp16 cast is for GPU CLIP)."""

    def half(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self


def tiny_clip(official_clip_model: Any, used_tokens: torch.Tensor) -> torch.nn.Module:
    """OpenAI CLIP (the release's ``model.CLIP``) at a tiny size, random, with CLIP's logit scale 100;
    token-embedding rows of tokens no prompt uses are 0 (so the fixture stores only the others)."""
    torch.manual_seed(1)
    model = (
        official_clip_model.CLIP(
            embed_dim=512,
            image_resolution=CLIP_IMAGE,
            vision_layers=1,
            vision_width=CLIP_WIDTH,
            vision_patch_size=CLIP_PATCH,
            context_length=77,
            vocab_size=49408,
            transformer_width=CLIP_WIDTH,
            transformer_heads=1,
            transformer_layers=1,
        )
        .float()
        .eval()
    )
    with torch.no_grad():  # the vendored CLIP has no initialize_parameters (it is built from weights)
        torch.nn.init.normal_(model.token_embedding.weight, std=0.02)
        torch.nn.init.normal_(model.positional_embedding, std=0.01)
        torch.nn.init.normal_(model.text_projection, std=CLIP_WIDTH**-0.5)
        randomize(model, scale=1.0)
        make_fp16_exact(model)
        keep = torch.zeros(49408, dtype=torch.bool)
        keep[used_tokens] = True
        model.token_embedding.weight[~keep] = 0
        model.logit_scale.fill_(math.log(100.0))
    return model


def randomize(module: torch.nn.Module, scale: float) -> None:
    """Redraw norms (weight ~ U(0.5, 1.5) x scale, bias/mean ~ N(0, 0.1), var ~ U(0.5, 1.5)) and
    biases, so that no parameter keeps its symmetric initial value (``scale`` < 1 keeps the
    activations of a deep random ResNet small, where fp32 round-off stays below the tolerance)."""
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        if not tensor.is_floating_point() or name.endswith("logit_scale") or "empty_weight" in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(part in name for part in ("norm", "ln_", "bn")) or leaf in ("running_mean", "running_var")
        with torch.no_grad():
            if leaf == "running_var":
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif is_norm and leaf == "weight":
                tensor.copy_((torch.rand_like(tensor) + 0.5) * scale)
            elif leaf in ("bias", "running_mean"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)


def make_fp16_exact(module: torch.nn.Module) -> None:
    """Round every weight (not the logit scales) to a value fp16 represents exactly: the fixture then
    stores them in fp16 (half the size) and the test recovers the very fp32 values the release ran with."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and not name.endswith(("logit_scale", "empty_weight")):
                tensor.copy_(tensor.half().float())


def all_prompts(imagenet_templates: Any) -> list[str]:
    templates = [SEGMENT_TEMPLATE, *imagenet_templates.IMAGENET_TEMPLATES_SELECT_CLIP]
    return [template.format(name) for name in ALL_CLASSES for template in templates]


def build_official(
    size: dict[str, Any], clip_classification: bool, class_files: tuple[str, str], clip_model: torch.nn.Module
) -> Any:
    """The release's ``MaskFormer`` (ZegFormer head) at ``size``."""
    from detectron2.data import MetadataCatalog
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone
    from mask_former.mask_former_model import MaskFormer
    from mask_former.modeling.criterion import SetCriterion
    from mask_former.modeling.heads.pixel_decoder import BasePixelDecoder
    from mask_former.modeling.heads.zeg_former_head import ZegFormerHead
    from mask_former.modeling.matcher import HungarianMatcher
    from mask_former.modeling.transformer.transformer_zeroshot_predictor import TransformerZeroshotPredictor
    from mask_former.third_party import clip

    clip.load = lambda name, device="cpu", jit=False: (clip_model, None)
    backbone = build_resnet_backbone(resnet_cfg(size), ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    decoder = BasePixelDecoder(shapes, conv_dim=size["conv_dim"], mask_dim=size["mask_dim"], norm="GN")
    predictor = TransformerZeroshotPredictor(
        shapes["res5"].channels,
        mask_classification=True,
        num_classes=len(SEEN),
        hidden_dim=size["hidden_dim"],
        num_queries=size["num_queries"],
        nheads=size["heads"],
        dropout=size["dropout"],
        dim_feedforward=size["ffn_dim"],
        enc_layers=0,
        dec_layers=size["dec_layers"],
        pre_norm=False,
        deep_supervision=True,
        mask_dim=size["mask_dim"],
        enforce_input_project=False,
        train_class_json=class_files[0],
        test_class_json=class_files[1],
        train_class_indexes_json=None,
        test_class_indexes_json=None,
        clip_classification=clip_classification,
        clip_pretrained="tiny",
        prompt_ensemble_type="single",
        wordvec=False,
        temperature=0.01,
    )
    head = ZegFormerHead(
        shapes,
        num_classes=len(SEEN),
        pixel_decoder=decoder,
        loss_weight=1.0,
        ignore_value=255,
        transformer_predictor=predictor,
        transformer_in_feature="res5",
    )
    weight_dict = {"loss_ce": 1, "loss_mask": 20.0, "loss_dice": 1.0}
    for i in range(size["dec_layers"] - 1):
        weight_dict.update({f"{k}_{i}": v for k, v in list(weight_dict.items())[:3]})
    criterion = SetCriterion(
        len(SEEN),
        matcher=HungarianMatcher(cost_class=1, cost_mask=20.0, cost_dice=1.0),
        weight_dict=weight_dict,
        eos_coef=0.1,
        losses=["labels", "masks"],
    )
    metadata = MetadataCatalog.get("golden_all")
    metadata.stuff_classes, metadata.val_extra_classes = ALL_CLASSES, UNSEEN
    model = MaskFormer(
        backbone=backbone,
        sem_seg_head=head,
        criterion=criterion,
        num_queries=size["num_queries"],
        panoptic_on=False,
        object_mask_threshold=0.8,
        overlap_threshold=0.8,
        metadata=metadata,
        metadata_val_all=metadata,
        size_divisibility=32,
        sem_seg_postprocess_before_inference=False,
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
        clip_pixel_mean=CLIP_MEAN,
        clip_pixel_std=CLIP_STD,
        gzero_calibrate=0.1,
        clip_classification=clip_classification,
        ensembling=True,
        ensembling_all_cls=False,
        train_class_json=class_files[0],
        test_class_json=class_files[1],
        clip_cls_style="cropmask",
    )
    return model


def smooth_image(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) uint8: a few colour blobs plus noise (masks of random models then vary in shape)."""
    coarse = torch.rand(1, 3, 6, 8, generator=generator) * 255
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = image + torch.randn(3, height, width, generator=generator) * 2
    return image.clamp(0, 255).round().to(torch.uint8)


def designed_masks() -> torch.Tensor:
    """(8, 96, 160) bool proposals on the padded eval image (image 90 x 130, padding beyond)."""
    masks = torch.zeros(8, 96, 160, dtype=torch.bool)
    masks[1, 10:30, 20:50] = True  # compact: box [20, 10, 49, 29] in the release, [20, 10, 50, 30] tight
    masks[2, 40, 10:61] = True  # one row: zero area -> whole padded image in the release
    masks[3, 5:51, 100] = True  # one column: the same
    masks[4, 60, 70] = True  # one pixel
    masks[5, 91:96, 135:151] = True  # only in the padding
    masks[6, 70:96, 100:160] = True  # image and padding
    masks[7, 5:11, 5:11] = True  # two blobs far apart
    masks[7, 80:86, 120:126] = True
    return masks  # masks[0] is empty


def run_inference(model: Any, image: torch.Tensor, mask_override: torch.Tensor | None = None) -> dict[str, Any]:
    """The release's inference on one image; ``mask_override`` replaces the head's mask logits."""
    predictor = model.sem_seg_head.predictor
    captured: dict[str, Any] = {}

    def head_hook(module: Any, inputs: Any, output: dict[str, Any]) -> dict[str, Any]:
        captured.setdefault("head", output)
        return output if mask_override is None else {**output, "pred_masks": mask_override}

    hooks = [
        model.sem_seg_head.register_forward_hook(head_hook),
        predictor.clip_model.visual.register_forward_pre_hook(lambda m, i: captured.setdefault("crops", i[0])),
        predictor.clip_model.visual.register_forward_hook(lambda m, i, o: captured.setdefault("features", o)),
    ]
    with torch.no_grad():
        result = model([{"image": image, "height": EVAL_OUTPUT[0], "width": EVAL_OUTPUT[1]}])[0]["sem_seg"]
    for hook in hooks:
        hook.remove()
    head = captured["head"]
    layer_logits = torch.stack([a["pred_logits"] for a in head["aux_outputs"]] + [head["pred_logits"]])
    layer_masks = torch.stack([a["pred_masks"] for a in head["aux_outputs"]] + [head["pred_masks"]])
    crops = captured["crops"].float()
    return {
        "image": image,
        "output_size": torch.tensor(EVAL_OUTPUT),
        "class_logits": layer_logits.as_subclass(torch.Tensor).clone(),  # (L, 1, N, C + 1)
        "mask_logits": layer_masks.as_subclass(torch.Tensor).clone(),  # (L, 1, N, h, w)
        "crops_pooled": F.avg_pool2d(crops, 16).as_subclass(torch.Tensor).clone(),  # (N, 3, 14, 14)
        "clip_image_features": captured["features"].float().as_subclass(torch.Tensor).clone(),  # (N, 512)
        "sem_seg": result.as_subclass(torch.Tensor).clone(),  # (C, H_out, W_out)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zegformer", required=True, help="ZegFormer source checkout (holds mask_former/)")
    parser.add_argument("--detectron2", required=True, help="detectron2 source checkout (holds detectron2/)")
    parser.add_argument("--out", default=str(FIXTURES))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import zegformer_d2stub

    zegformer_d2stub.install(args.detectron2, args.zegformer)
    from mask_former.third_party import clip, imagenet_templates
    from mask_former.third_party import model as official_clip_model

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    class_files = (str(out / "_seen.json"), str(out / "_all.json"))
    Path(class_files[0]).write_text(json.dumps(SEEN))
    Path(class_files[1]).write_text(json.dumps(ALL_CLASSES))
    try:
        used_tokens = clip.tokenize(all_prompts(imagenet_templates)).unique()
        clip_model = tiny_clip(official_clip_model, used_tokens)

        # ------------------------------------------------------------ real size: keys and shapes only
        real = build_official(REAL, clip_classification=False, class_files=class_files, clip_model=clip_model)
        shapes = {key: list(value.shape) for key, value in real.state_dict().items()}
        (out / "official_r101_shapes.json").write_text(json.dumps(shapes, indent=0))
        del real

        # ------------------------------------------------------------ tiny model, random weights
        torch.manual_seed(0)
        model = build_official(TINY, clip_classification=True, class_files=class_files, clip_model=clip_model)
        randomize(model.backbone, 0.55)
        randomize(model.sem_seg_head.pixel_decoder, 1.0)
        predictor = model.sem_seg_head.predictor
        randomize(predictor.transformer, 1.0)
        with torch.no_grad():  # sharp cross-attention over the (small) res5 memory: the queries' masks differ
            predictor.input_proj.weight.mul_(10)
        make_fp16_exact(model)
        predictor.text_features_test_clip = predictor.text_features_test_clip.as_subclass(KeepFloat)
        model.eval()
        state = {
            key: value.detach().clone() if key.endswith(("logit_scale", "empty_weight")) else value.half()
            for key, value in model.state_dict().items()
        }  # fp16 holds the fp32 values exactly
        token_key = "sem_seg_head.predictor.clip_model.token_embedding.weight"
        token_rows = state.pop(token_key)[used_tokens].clone()

        # ------------------------------------------------------------ inference
        generator = torch.Generator().manual_seed(0)
        image = smooth_image(*EVAL_IMAGE, generator)
        inference = run_inference(model, image)
        # the same image with designed proposals at the padded resolution (the release's upsampling
        # is then the identity): compact, one-row, one-column, one-pixel, empty and padding masks
        designed = designed_masks()
        override = run_inference(model, image, mask_override=torch.where(designed, 4.0, -4.0)[None])
        inference["designed_masks"] = designed
        inference["designed_crops_pooled"] = override["crops_pooled"]
        inference["designed_clip_image_features"] = override["clip_image_features"]
        inference["designed_sem_seg"] = override["sem_seg"]

        # ------------------------------------------------------------ training: matching and set loss
        model.train()
        images = torch.stack([smooth_image(*TRAIN_IMAGE, generator) for _ in range(2)])
        labels = torch.full((2, *TRAIN_IMAGE), 255, dtype=torch.long)
        labels[0, :20, :30], labels[0, 20:, :30], labels[0, 5:35, 30:] = 0, 2, 4  # 4 = giraffe: unseen
        labels[1, :, :25], labels[1, 10:30, 25:50], labels[1, 30:, 25:] = 1, 3, 5
        batched = []
        for img, label in zip(images, labels):
            seen_label = label.clone()
            seen_label[seen_label >= len(SEEN)] = 255  # the release's training labels: unseen pixels ignored
            classes = [c for c in seen_label.unique().tolist() if c != 255]
            instances = SimpleNamespace(
                gt_classes=torch.tensor(classes, dtype=torch.long),
                gt_masks=torch.stack([seen_label == c for c in classes]),
            )
            instances.to = lambda device, inst=instances: inst
            batched.append({"image": img, "instances": instances})
        matches: list[Any] = []
        original_matcher = model.criterion.matcher.forward
        model.criterion.matcher.forward = lambda outputs, targets: (
            matches.append(  # type: ignore[method-assign]
                original_matcher(outputs, targets)
            )
            or matches[-1]
        )
        losses = model(batched)
        model.criterion.matcher.forward = original_matcher  # type: ignore[method-assign]
        # SetCriterion matches the final layer first, then the auxiliary layers 0..L-2
        order = matches[1:] + matches[:1]
        training = {
            "images": images,
            "labels": labels,
            "matches": [[torch.stack([rows, cols]) for rows, cols in layer] for layer in order],
            "losses": {key: value.detach().float() for key, value in losses.items()},
        }

        config = {
            "all_classes": ALL_CLASSES,
            "unseen": UNSEEN,
            "segment_template": SEGMENT_TEMPLATE,
            "clip_templates": list(imagenet_templates.IMAGENET_TEMPLATES_SELECT_CLIP),
            "sizes": TINY,
            "pixel_mean": PIXEL_MEAN,
            "pixel_std": PIXEL_STD,
            "clip": {
                "embed_dim": 512,
                "quick_gelu": True,
                "vision_cfg": {
                    "image_size": CLIP_IMAGE,
                    "patch_size": CLIP_PATCH,
                    "width": CLIP_WIDTH,
                    "layers": 1,
                    "head_width": CLIP_WIDTH,
                },
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": CLIP_WIDTH, "heads": 1, "layers": 1},
            },
            "source": "dingjiansw101/ZegFormer@8cb9e8f + facebookresearch/detectron2 ResNet, fp32 CPU",
        }
        torch.save(
            {
                "config": config,
                "state_dict": state,
                "token_ids": used_tokens,
                "token_rows": token_rows,
                "token_key": token_key,
                "inference": inference,
                "training": training,
            },
            out / "golden.pt",
        )
    finally:
        for path in class_files:
            Path(path).unlink(missing_ok=True)
    masks = inference["mask_logits"][-1, 0]
    padded = F.interpolate(masks[None], size=(64, 96), mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
    print("mask areas on the padded image:", padded.flatten(1).sum(1).tolist())
    print("losses:", {k: round(float(v), 4) for k, v in training["losses"].items()})
    print("wrote", out / "golden.pt", "and", out / "official_r101_shapes.json")


if __name__ == "__main__":
    main()
