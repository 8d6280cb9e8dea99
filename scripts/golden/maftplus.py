"""Golden fixtures from the official MAFT+ code (not run in CI).

Runs the release's modules (jiaosiyu1999/MAFT-Plus, checked at fd12806) on a tiny random model and
writes, under ``tests/fixtures/maftplus/``:

* ``inference.pt``: the official state dict (official key layout; the 49408-row token table of
  the text tower is left out to keep the file small: the text classifier is given instead), the
  input image, the text classifier (one row per name) with the number of names per class, and the
  official outputs: in-vocabulary logits of every decoder prediction, mask logits, CDT output,
  out-of-vocabulary logits and the semantic map;
* ``losses.pt``: inputs and official values of the RC loss and the mask-aware loss on a square and
  a non-square map.

``tests/test_cdt_official.py`` converts the state dict with ``methods/cdt/convert.py`` and checks
ovseg against these numbers.

Usage::

    python scripts/golden/maftplus.py /work/.mirror/jiaosiyu1999+MAFT-Plus/repo-checkout

The checkout must be a work tree (``git -C MIRROR worktree add /tmp/maftplus fd12806`` or a clone).
Only torch, open_clip, timm and scipy are needed: ``scripts/golden/maftplus_d2stub`` stands in for
detectron2 and fvcore.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "maftplus"

#: (height, width) of the test image: padded to 96 x 64, a portrait stride-32 map of 3 x 2
IMAGE_SIZE = (90, 60)
#: the vocabulary: names per class (the official max over names' logits is exercised)
CLASSES = (("cat", "kitty"), ("sky",), ("grass", "lawn", "turf"))
SIZES = {"hidden_dim": 32, "num_queries": 8, "heads": 4, "dec_layers": 4, "dec_ffn_dim": 64, "enc_layers": 1}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_NAME = "convnext_base_ovseg_golden"  # "convnext_" and "_base" make the official code take it


def load_tiny_clip() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_clip", FIXTURES / "tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_clip"] = module  # timm's registry looks the defining module up
    spec.loader.exec_module(module)
    module.register_tiny_convnext()
    return module


def import_official(checkout: Path) -> dict[str, types.ModuleType]:
    """The official modules, imported without running ``maft/__init__.py`` (which pulls in the
    datasets and detectron2's training machinery)."""
    sys.path.insert(0, str(HERE / "maftplus_d2stub"))
    for package in (
        "maft",
        "maft.modeling",
        "maft.modeling.backbone",
        "maft.modeling.meta_arch",
        "maft.modeling.pixel_decoder",
        "maft.modeling.transformer_decoder",
        "maft.utils",
    ):
        module = types.ModuleType(package)
        module.__path__ = [str(checkout / package.replace(".", "/"))]
        sys.modules[package] = module
    names = {
        "clip": "maft.modeling.backbone.clip",
        "pixel_decoder": "maft.modeling.pixel_decoder.msdeformattn",
        "decoder": "maft.modeling.transformer_decoder.fcclip_transformer_decoder",
        "head": "maft.modeling.meta_arch.fcclip_head",
        "maft_plus": "maft.maft_plus",
        "ma_loss": "maft.modeling.maft.mask_aware_loss",
        "rc_loss": "maft.modeling.maft.representation_compensation",
    }
    return {key: importlib.import_module(name) for key, name in names.items()}


def official_config(tiny_clip: types.ModuleType, num_classes: int):
    from detectron2.config import CfgNode

    return CfgNode(
        {
            "MODEL": {
                "FC_CLIP": {
                    "CLIP_MODEL_NAME": OPEN_CLIP_NAME,
                    "CLIP_PRETRAINED_WEIGHTS": None,
                    "EMBED_DIM": tiny_clip.CLIP_CONFIG["embed_dim"],
                },
                "SEM_SEG_HEAD": {
                    "NAME": "FCCLIPHead",
                    "IN_FEATURES": ["res2", "res3", "res4", "res5"],
                    "IGNORE_VALUE": 255,
                    "NUM_CLASSES": num_classes,
                    "LOSS_WEIGHT": 1.0,
                    "PIXEL_DECODER_NAME": "MSDeformAttnPixelDecoder",
                    "CONVS_DIM": SIZES["hidden_dim"],
                    "MASK_DIM": SIZES["hidden_dim"],
                    "NORM": "GN",
                    "TRANSFORMER_ENC_LAYERS": SIZES["enc_layers"],
                    "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
                    "COMMON_STRIDE": 4,
                },
                "MASK_FORMER": {
                    "TRANSFORMER_IN_FEATURE": "multi_scale_pixel_decoder",
                    "TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
                    "DROPOUT": 0.0,
                    "NHEADS": SIZES["heads"],
                    "HIDDEN_DIM": SIZES["hidden_dim"],
                    "NUM_OBJECT_QUERIES": SIZES["num_queries"],
                    "DIM_FEEDFORWARD": SIZES["dec_ffn_dim"],
                    "DEC_LAYERS": SIZES["dec_layers"],
                    "PRE_NORM": False,
                    "ENFORCE_INPUT_PROJ": False,
                },
            }
        }
    )


def build_official(modules: dict[str, types.ModuleType], tiny_clip: types.ModuleType) -> torch.nn.Module:
    """MAFT_Plus on the tiny CLIP, random weights (every parameter re-drawn so that none is a constant)."""
    import open_clip
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_sem_seg_head

    open_clip.factory._MODEL_CONFIGS[OPEN_CLIP_NAME] = tiny_clip.CLIP_CONFIG
    cfg = official_config(tiny_clip, len(CLASSES))
    backbones = []
    for _ in range(2):  # the student and the RC teacher
        backbone = modules["clip"].CLIP(cfg, None)
        backbone._out_feature_channels.update({f"res{i + 2}": c for i, c in enumerate(tiny_clip.DIMS)})
        backbones.append(backbone)
    head = build_sem_seg_head(cfg, backbones[0].output_shape())
    metadata = MetadataCatalog.get("golden")
    metadata.stuff_classes = [",".join(names) for names in CLASSES]
    model = modules["maft_plus"].MAFT_Plus(
        backbone=backbones[0],
        backbone_t=backbones[1],
        sem_seg_head=head,
        criterion=None,
        num_queries=SIZES["num_queries"],
        object_mask_threshold=0.0,
        overlap_threshold=0.8,
        train_metadata=metadata,
        test_metadata={"golden": metadata},
        size_divisibility=32,
        sem_seg_postprocess_before_inference=False,
        pixel_mean=[255 * m for m in OPENAI_MEAN],
        pixel_std=[255 * s for s in OPENAI_STD],
        semantic_on=True,
        panoptic_on=False,
        instance_on=False,
        test_topk_per_image=100,
        rc_weights=0.1,
        cdt_params=[tiny_clip.CLIP_CONFIG["embed_dim"], SIZES["heads"]],
    )
    with torch.no_grad():  # fan-in scaled weights keep every output O(1), so 1e-5 is a tight bound
        for name, parameter in model.named_parameters():
            if "token_embedding" in name:
                continue
            if parameter.dim() > 1:
                parameter.copy_(torch.randn_like(parameter) * (parameter[0].numel() ** -0.5))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
        model.sem_seg_head.predictor.mask_embed.layers[-1].weight.mul_(0.1)  # mask logits within about +-1
        model.backbone.clip_model.logit_scale.fill_(1.0)
        model.sem_seg_head.predictor.logit_scale.fill_(1.0)
    return model.eval()


def inference_fixture(modules: dict[str, types.ModuleType], tiny_clip: types.ModuleType) -> dict:
    model = build_official(modules, tiny_clip)
    dim = tiny_clip.CLIP_CONFIG["embed_dim"]
    num_names = [len(names) for names in CLASSES]
    text = torch.nn.functional.normalize(torch.randn(sum(num_names), dim), dim=-1)
    model.get_text_classifier = lambda dataname: (text, num_names)
    image = torch.randint(0, 256, (3, *IMAGE_SIZE), dtype=torch.uint8)

    recorded: dict[str, object] = {}
    model.sem_seg_head.register_forward_hook(lambda m, i, o: recorded.__setitem__("head", o))
    model.cdt.register_forward_hook(lambda m, i, o: recorded.__setitem__("cdt", o))
    module = modules["maft_plus"]
    original = module.get_classification_logits

    def record_out_vocab(*args, **kwargs):
        recorded["out_vocab"] = original(*args, **kwargs)
        return recorded["out_vocab"]

    module.get_classification_logits = record_out_vocab
    try:
        with torch.no_grad():
            result = model(
                [
                    {
                        "image": image.float(),
                        "file_name": "golden.jpg",
                        "meta": {"dataname": "golden"},
                        "height": IMAGE_SIZE[0],
                        "width": IMAGE_SIZE[1],
                    }
                ]
            )
    finally:
        module.get_classification_logits = original
    head = recorded["head"]
    in_vocab = torch.stack([a["pred_logits"] for a in head["aux_outputs"]] + [head["pred_logits"]])
    masks = torch.stack([a["pred_masks"] for a in head["aux_outputs"]] + [head["pred_masks"]])
    state = {k: v.clone() for k, v in model.state_dict().items() if "token_embedding" not in k}
    return {
        "state_dict": state,
        "image": image,
        "text": text,
        "num_names": num_names,
        "classes": [list(names) for names in CLASSES],
        "sizes": SIZES,
        "in_vocab_logits": in_vocab,
        "mask_logits": masks,
        "cdt": recorded["cdt"],
        "out_vocab_logits": recorded["out_vocab"],
        "sem_seg": result[0]["sem_seg"],
    }


def loss_fixture(modules: dict[str, types.ModuleType]) -> dict:
    rc = modules["rc_loss"].Representation_Compensation()
    ma = modules["ma_loss"].MA_Loss()
    cases = {}
    for name, (h, w) in {"square": (6, 6), "portrait": (34, 25)}.items():
        student, teacher = torch.randn(2, 8, h, w), torch.randn(2, 8, h, w)
        class_logits = torch.randn(2, 5, 4) * 3  # (B, N, K+1), void last
        mask_logits = torch.randn(2, 5, h, w) * 2
        gt_size = (4 * h, 4 * w)
        labels = [torch.tensor([0, 2]), torch.tensor([1])]
        masks = [(torch.rand(len(lab), *gt_size) > 0.5).float() for lab in labels]
        targets = [{"labels": lab, "masks": m} for lab, m in zip(labels, masks)]
        cases[name] = {
            "student": student,
            "teacher": teacher,
            "rc_loss": rc(student, teacher),
            "class_logits": class_logits,
            "mask_logits": mask_logits,
            "labels": labels,
            "masks": masks,
            "mask_aware_loss": ma(class_logits, mask_logits, targets),
        }
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a work tree of jiaosiyu1999/MAFT-Plus (fd12806)")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    if not (args.checkout / "maft" / "maft_plus.py").is_file():
        parser.error(f"{args.checkout} is not a MAFT-Plus work tree (no maft/maft_plus.py)")
    torch.manual_seed(0)
    tiny_clip = load_tiny_clip()
    modules = import_official(args.checkout)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(inference_fixture(modules, tiny_clip), args.out / "inference.pt")
    torch.save(loss_fixture(modules), args.out / "losses.pt")
    for path in sorted(args.out.glob("*.pt")):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
