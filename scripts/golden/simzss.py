"""Golden fixtures of the official SimZSS release (tileb1/simzss @2142ac5) for tests/test_simzss_official.py.

Not run in CI. Needs a checkout of the release (``git clone https://github.com/tileb1/simzss``) and einops
(``pip install --target DIR einops``; pass ``--extra-path DIR``)::

    python scripts/golden/simzss.py --official /path/to/simzss [--extra-path DIR] [--out tests/fixtures/simzss]

Two phases, each in its own process (the release's ``src/open_clip`` fork shadows pip's ``open_clip``):

* ``model``: the release's ``SimZSS`` (text tower, DVT ``Denoiser`` around a ``ViTWrapper``),
  ``ShallowDecoder`` and ``ZSLoss`` at tiny sizes with random weights: writes ``model.pt`` (the
  state dict in the release's key layout, inputs, outputs, losses and gradients);
* ``concepts``: the release's ``make_shards_spacy.extract_nouns`` and data.py's bank filter on 240
  captions: writes ``concepts.json``.

Stand-ins (documented gaps):

* spaCy ``en_core_web_trf`` cannot be installed here: the ``spacy`` module the release imports is
  replaced by a parser whose noun chunks, compound modifiers and lemmas are ovseg's NLTK ones
  (``ConceptExtractor.noun_chunks``), so the fixtures check the release's *rules* on a given parse;
* timm >= 1.0 removed ``VisionTransformer._intermediate_layers`` which the release's ``ViTWrapper``
  calls: it is re-added with timm 0.9's behaviour (patch embed, pos embed, patch drop, pre-norm,
  blocks, outputs of the requested blocks); ``timm.create_model`` is made to build a tiny random
  ViT (no download);
* data.py's bank filter is a closure inside ``get_wds_dataset``: its rule (keep, in order, the concepts
  whose string is in the sorted unique bank; label = index) is applied here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = 0
BATCH, GRID_PX, WIDTH, TEXT_WIDTH, N_CLASSES = 4, 56, 64, 16, 10
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = [
    "a dog sitting next to a red car",
    "two traffic lights above a busy street",
    "a cat sleeping on a bed near a window",
    "a man riding a horse on the beach",
]
# text parameters whose gradients are compared
GRAD_KEYS = [
    "text.text_projection",
    "text.ln_final.weight",
    "text.positional_embedding",
    "text.transformer.resblocks.0.attn.in_proj_weight",
    "text.transformer.resblocks.1.mlp.c_fc.weight",
    "logit_scale",
]


def _tiny_timm(timm):
    """Make timm build tiny random ViTs and give them timm 0.9's ``_intermediate_layers``."""
    from timm.models.vision_transformer import VisionTransformer

    create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        kwargs.update(depth=2, embed_dim=WIDTH, num_heads=2, img_size=GRID_PX)
        return create(name, pretrained=False, **kwargs)

    def _intermediate_layers(self, x, n=1):
        outputs, num_blocks = [], len(self.blocks)
        take = set(range(num_blocks - n, num_blocks) if isinstance(n, int) else n)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in take:
                outputs.append(x)
        return outputs

    timm.create_model = create_model
    VisionTransformer._intermediate_layers = _intermediate_layers


def build_release(official: Path):
    """The release's SimZSS at the fixtures' sizes (seeded), its args and the fixture inputs."""
    import timm
    import torch

    _tiny_timm(timm)
    from DenoisingViT import Denoiser, ViTWrapper
    from open_clip.model import SimZSS
    from open_clip.tokenizer import tokenize

    torch.manual_seed(SEED)
    args = types.SimpleNamespace(
        visual_norm=None,
        model="ours_dinov2_ViT-B-14_reg",
        n_classes=N_CLASSES,
        beta_ema=0.0,
        n_dense_cls=1,
        decoder_type="shallow",
        decoder_softmax_dim="patch",
        temp_decoder=0.1,
        indices_type="concept",
        image_features_type="cls",
        lambda_loss=1.0,
    )
    model = SimZSS(
        args,
        embed_dim=WIDTH,
        output_dict=True,
        vision_cfg={
            "ours": True,
            "timm_model_name_nooverride": "vit_small_patch14_reg4_dinov2.lvd142m",
            "patch_size": 14,
            "image_size": GRID_PX,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 2},
    )
    vit = ViTWrapper(model_type="vit_small_patch14_reg4_dinov2.lvd142m", stride=14)
    model.visual = Denoiser(feature_dim=WIDTH, vit=vit, denoiser_type="transformer", image_size=GRID_PX, patch_size=14)
    with torch.no_grad():  # random but not-too-small weights everywhere; fp16-exact token embedding
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
        model.text.token_embedding.weight.copy_(model.text.token_embedding.weight.half().float())
        model.logit_scale.fill_(math.log(1 / 0.07) + 0.3)
    model.lock_image_tower()
    model.eval()

    images = torch.rand(BATCH, 3, GRID_PX, GRID_PX)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    normalized = (images - mean) / std
    text = tokenize(CAPTIONS)
    # concepts: (B, 32, 16) token indices (0 = padding) and (B, 32) labels (-1 = padding)
    g = torch.Generator().manual_seed(1)
    indices = torch.zeros(BATCH, 32, 16, dtype=torch.long)
    labels = -torch.ones(BATCH, 32, dtype=torch.long)
    lengths = (text != 0).sum(1)
    counts = [3, 2, 4, 1]
    for b, count in enumerate(counts):
        for c in range(count):
            n_tok = int(torch.randint(1, 4, (1,), generator=g))
            start = int(torch.randint(1, int(lengths[b]) - n_tok, (1,), generator=g))
            indices[b, c, :n_tok] = torch.arange(start, start + n_tok)
            labels[b, c] = int(torch.randint(0, 6, (1,), generator=g))

    return model, args, {"images": images, "normalized": normalized, "text": text, "indices": indices, "labels": labels}


def release_losses(model, args, normalized, text, indices, labels, rank=0, world_size=1):
    """The release's (global, local) loss terms of ``ZSLoss`` (lambda 1) on one rank's batch."""
    import torch
    from open_clip.loss import ClipLoss, ZSLoss

    model.zero_grad()
    output = model(normalized, text, concept_indices=indices.clone(), concepts_labels=labels.clone())
    loss = ZSLoss.__new__(ZSLoss)  # its __init__ puts a buffer on CUDA; the same attributes on CPU
    torch.nn.Module.__init__(loss)
    loss.use_dense_loss, loss.args, loss.n_classes, loss.lambda_loss = True, args, N_CLASSES, 1.0
    loss.cliploss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss.class_counts = torch.zeros(N_CLASSES)
    terms, *_ = loss(
        output["image_features"],
        output["text_features"],
        output["logit_scale"],
        output["cls_embeds_txt"],
        output["cls_embeds_visual"],
        output["logit_scale_local"],
        output["classification_weights_ema"],
        output["concepts_labels"],
        output_dict=True,
    )
    return terms


def run_model(official: Path, out: Path) -> None:
    import torch

    model, args, inputs = build_release(official)
    images, normalized, text = inputs["images"], inputs["normalized"], inputs["text"]
    indices, labels = inputs["indices"], inputs["labels"]
    patches = model(normalized, just_visual_tokens=True)
    eos, tokens = model.text(text)

    fixture = {
        "images": images,
        "captions": CAPTIONS,
        "text": text,
        "concept_indices": indices,
        "concept_labels": labels,
        "patches": patches.detach(),
        "eos": eos.detach(),
        "tokens": tokens.detach(),
    }
    params = dict(model.named_parameters())
    for name in ("cliploss", "ccloss"):
        terms = release_losses(model, args, normalized, text, indices, labels)
        terms[name].backward()
        fixture[name] = terms[name].detach()
        fixture[f"{name}_grads"] = {
            key: torch.zeros_like(params[key]) if params[key].grad is None else params[key].grad.detach().clone()
            for key in GRAD_KEYS
        }
        fixture[f"{name}_grads"]["text.token_embedding.rows"] = (
            params["text.token_embedding.weight"].grad[text.unique()].clone()
        )
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    state["text.token_embedding.weight"] = state["text.token_embedding.weight"].half()  # exact, smaller file
    fixture["state_dict"] = state
    fixture["token_ids_used"] = text.unique()
    torch.save(fixture, out / "model.pt")
    print(f"model: cliploss {fixture['cliploss']:.6f}, ccloss {fixture['ccloss']:.6f} -> {out / 'model.pt'}")


def _ddp_worker(rank: int, official: str, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(official, "src"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, args, inputs = build_release(Path(official))
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    terms = release_losses(
        model,
        args,
        inputs["normalized"][part],
        inputs["text"][part],
        inputs["indices"][part],
        inputs["labels"][part],
        rank=rank,
        world_size=2,
    )
    torch.save({name: value.detach() for name, value in terms.items()}, os.path.join(out, f".ddp_rank{rank}.pt"))
    dist.destroy_process_group()


def run_ddp(official: Path, out: Path) -> None:
    """The release's per-rank losses with the fixture batch split over 2 gloo processes."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(str(official), str(out), port), nprocs=2, start_method="spawn")
    ranks = [torch.load(out / f".ddp_rank{r}.pt") for r in range(2)]
    for r in range(2):
        (out / f".ddp_rank{r}.pt").unlink()
    torch.save(
        {"cliploss": torch.stack([r["cliploss"] for r in ranks]), "ccloss": torch.stack([r["ccloss"] for r in ranks])},
        out / "ddp.pt",
    )
    print(f"ddp: ccloss per rank {[float(r['ccloss']) for r in ranks]}")


def golden_captions() -> list[str]:
    """240 varied captions: hand-written edge cases and combinations of varied structures."""
    hand = [
        "two traffic lights above a busy street",
        "a park bench under a tree",
        "a dog bed on the floor",
        "giraffes standing by the bus on the street",
        "a 3d picture of a dog and a cat",
        "a man in a t-shirt holding a tennis racket",
        "the dog's toy lies next to the sofa",
        "A Café with chairs and tables outside",
        "people walking on the sidewalk near parked cars",
        "a pizza with cheese, tomatoes and olives on a wooden table",
        "a baseball player swinging a bat",
        "an old clock tower in the city centre",
        "a bowl of fruit: apples, bananas, oranges and grapes",
        "cats cats cats everywhere",
        "a fire hydrant painted red and yellow",
        "the stop sign at the corner",
        "a teddy bear sitting on a chair",
        "a laptop computer and a cell phone on a desk",
        "kites flying over the beach on a windy day",
        "a train going over a bridge across the river",
        "a skier going down a snowy mountain slope",
        "the kitchen has a refrigerator, a microwave and an oven",
        "a woman with an umbrella in the rain",
        "sheep grazing in a grassy field near a fence",
        "a surfboard leaning against a wall",
        "an elephant and its baby by the water",
        "a bathroom with a toilet, a sink and a bathtub",
        "motorcycles parked in a row along the road",
        "a boy eating a hot dog at a baseball game",
        "2 zebras and 1 giraffe in a zoo enclosure",
        "a plate of broccoli and carrots",
        "a living room with a couch, a tv and a coffee table",
        "a stuffed animal on a bed with pillows",
        "an airplane flying in the blue sky",
        "the boats in the harbor at sunset",
        "a cup of coffee next to a book",
        "a bicycle chained to a pole",
        "a vase of flowers on a window sill",
        "the sandwich is cut in half",
        "a giraffe eating leaves from a tree",
        "a horse-drawn carriage on a cobblestone street",
        "a glass of wine and a bottle",
        "a dog catching a frisbee",
        "a double-decker bus driving down a street",
        "the snowboarder jumps off a ramp",
        "a group of people playing frisbee in a park",
        "a clock on the wall above the door",
        "an oven mitt hanging from a hook",
        "a close-up of a donut with sprinkles",
        "a street sign for main st.",
        "the skateboarder is doing a trick on a rail",
        "rows of books on shelves in a library",
        "a mirror reflecting a sink and towels",
        "a television remote on the sofa cushion",
        "a child flying a kite",
        "x-ray of a hand",
        "a cow standing in the grass",
        "bowls and spoons",
        "",
        "the",
        "dogs",
        "a very very very long caption " + "with a dog and a cat and a bird " * 6,
        " ".join(
            f"a {n}"
            for n in [
                "dog",
                "cat",
                "car",
                "bus",
                "tree",
                "house",
                "road",
                "sky",
                "bird",
                "boat",
                "chair",
                "table",
                "bed",
                "cup",
                "plate",
                "bottle",
                "person",
                "horse",
                "sheep",
                "cow",
                "train",
                "truck",
                "bench",
                "clock",
                "vase",
                "book",
                "laptop",
                "mouse",
                "keyboard",
                "phone",
                "oven",
                "sink",
                "toilet",
                "couch",
            ]
        ),
    ]
    subjects = [
        "a dog",
        "two cats",
        "a young man",
        "the little girl",
        "a brown horse",
        "three sheep",
        "a woman",
        "several people",
        "a black bear",
        "the baseball players",
        "a tabby cat",
        "an old truck",
    ]
    verbs = [
        "sitting on",
        "standing next to",
        "looking at",
        "walking past",
        "lying under",
        "playing with",
        "jumping over",
        "parked beside",
    ]
    objects = [
        "a wooden bench",
        "the kitchen table",
        "a large tree",
        "some traffic cones",
        "a stop sign",
        "a fire truck",
        "the dining table",
        "a potted plant",
        "two computer monitors",
        "a tennis court",
        "the water bottles",
        "a street light",
        "a pile of snow",
        "the car door",
        "an ice cream cone",
    ]
    places = [
        "",
        " in a park",
        " on the street",
        " at the beach",
        " in a living room",
        " near the river",
        " during the night",
        " in front of a building",
    ]
    generated = []
    for i in range(240 - len(hand)):
        s, v, o, p = subjects[i % 12], verbs[(i * 5) % 8], objects[(i * 7) % 15], places[(i * 3) % 8]
        generated.append(f"{s} {v} {o}{p}" + ("." if i % 4 == 0 else ""))
    return hand + generated


def run_concepts(official: Path, out: Path) -> None:
    import importlib.util

    sys.path.insert(0, str(REPO))
    from ovseg.concepts import ConceptExtractor

    parser = ConceptExtractor()

    class Token:
        def __init__(self, text, lemma="", dep="", children=()):
            self.text, self.lemma_, self.dep_, self.children = text, lemma or text, dep, list(children)

        def __str__(self):
            return self.text

    class Chunk:
        def __init__(self, chunk):
            compound = [Token(chunk.modifier, dep="compound")] if chunk.modifier else []
            self.root = Token(chunk.head, chunk.lemma, "ROOT", compound)
            self.tokens = [Token(word) for word in chunk.words]

        def __iter__(self):
            return iter(self.tokens)

        def __str__(self):
            return " ".join(chunk.text for chunk in self.tokens)

    def nlp(text):
        return types.SimpleNamespace(noun_chunks=[Chunk(c) for c in parser.noun_chunks(text)])

    sys.modules["spacy"] = types.SimpleNamespace(load=lambda name: nlp)
    spec = importlib.util.spec_from_file_location("make_shards_spacy", official / "src/training/make_shards_spacy.py")
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    with open(official / "src/training/class_names/7_dataset_eval_merged.txt") as handle:
        bank = sorted({line.strip().lower() for line in handle})
    index = {name: i for i, name in enumerate(bank)}
    records = []
    for caption in golden_captions():
        _, concept_indices, _, all_concepts = release.extract_nouns(release.tokenizer, caption)
        kept = [(name, row) for name, row in zip(all_concepts, concept_indices) if name in index]
        records.append(
            {
                "caption": caption,
                "concepts": [
                    {"name": name, "label": index[name], "positions": [int(p) for p in row if p != 0]}
                    for name, row in kept
                ],
            }
        )
    (out / "concepts.json").write_text(json.dumps({"bank_size": len(bank), "captions": records}, indent=0))
    print(f"concepts: {len(records)} captions, {sum(len(r['concepts']) for r in records)} concepts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of tileb1/simzss")
    parser.add_argument("--extra-path", default="", help="folder with einops (pip install --target)")
    parser.add_argument("--out", type=Path, default=REPO / "tests/fixtures/simzss")
    parser.add_argument("--phase", choices=["model", "ddp", "concepts"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "model":
        return run_model(args.official, args.out)
    if args.phase == "concepts":
        return run_concepts(args.official, args.out)
    if args.phase == "ddp":
        return run_ddp(args.official, args.out)
    base = [sys.executable, __file__, "--official", str(args.official), "--out", str(args.out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    paths = [str(args.official / "src")] + ([args.extra_path] if args.extra_path else [])
    subprocess.run(base + ["--phase", "model"], check=True, env=dict(env, PYTHONPATH=os.pathsep.join(paths)))
    subprocess.run(base + ["--phase", "ddp"], check=True, env=dict(env, PYTHONPATH=os.pathsep.join(paths)))
    subprocess.run(base + ["--phase", "concepts"], check=True, env=dict(env, PYTHONPATH=str(REPO)))


if __name__ == "__main__":
    main()
