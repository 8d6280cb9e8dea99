"""SimZSS losses and module against plain, independent computations written out here.

Equation numbers follow ``methods/simzss/loss.py`` (reference brief ../shared/reference/simzss.md,
sections 2.2 and 2.3): (1) concept = mean of its token features, (2) visual concept =
softmax(cos / 0.1)-pooling of the patch tokens of its own image queried by its class prototype,
(3) symmetric InfoNCE, (4) prototypes = per-label sums over the batch, normalised, (5) CE over the
classes present in the batch with scale 1/0.07, (6) L = L_g + lambda L_l.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.contrastive import GlobalContrastiveLoss
from ovseg.encoders.text_transformer import CLIPTextTransformer
from ovseg.encoders.timm_vit import TimmViT
from ovseg.methods.simzss.loss import ConceptLoss, gather_concepts
from ovseg.methods.simzss.module import CONCEPT_KEYS, SimZSS
from ovseg.vocabulary import Vocabulary

POOL_TAU = 0.1
LOCAL_SCALE = 1 / 0.07


# --------------------------------------------------------------------------- plain references


def _dot(a, b):
    return sum(a[k] * b[k] for k in range(a.shape[0]))


def _norm(a):
    return torch.sqrt(_dot(a, a))


def _log_sum_exp(values):
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def ref_global_loss(image, text, scale):
    """Eq. (3) with explicit loops: s_ij = scale <x_i, y_j>,
    L = -1/(2B) sum_i log softmax_j(s_i.)_i - 1/(2B) sum_j log softmax_i(s_.j)_j."""
    b = image.shape[0]
    s = [[scale * _dot(image[i], text[j]) for j in range(b)] for i in range(b)]
    image_to_text = sum(s[i][i] - _log_sum_exp([s[i][j] for j in range(b)]) for i in range(b))
    text_to_image = sum(s[j][j] - _log_sum_exp([s[i][j] for i in range(b)]) for j in range(b))
    return -(image_to_text + text_to_image) / (2 * b)


def ref_local_loss(tokens, patches, labels, positions, mask, target="label", return_logits=False):
    """Eqs. (1), (2), (4), (5) written out concept by concept."""
    batch, slots = labels.shape
    concepts = []  # (caption index, label, pooled token feature)
    for b in range(batch):
        for c in range(slots):
            if int(labels[b, c]) < 0:
                continue
            pos = [int(positions[b, c, t]) for t in range(positions.shape[2]) if bool(mask[b, c, t])]
            concepts.append((b, int(labels[b, c]), sum(tokens[b, p] for p in pos) / len(pos)))
    if not concepts:
        return None
    present = sorted({label for _, label, _ in concepts})
    prototypes = {}
    for k in present:
        h = sum(feature for _, label, feature in concepts if label == k)
        prototypes[k] = h / _norm(h)
    losses, all_logits = [], []
    for b, label, _ in concepts:
        query = prototypes[label]
        sims = [
            _dot(query, patches[b, n]) / (_norm(query) * _norm(patches[b, n])) / POOL_TAU
            for n in range(patches.shape[1])
        ]
        denominator = sum(torch.exp(s) for s in sims)
        visual = sum(torch.exp(s) / denominator * patches[b, n] for n, s in enumerate(sims))
        visual = visual / _norm(visual)
        logits = [LOCAL_SCALE * _dot(visual, prototypes[k]) for k in present]
        if target == "label":
            index = present.index(label)
        else:
            index = max(range(len(present)), key=lambda i: float(logits[i].detach()))
        losses.append(_log_sum_exp(logits) - logits[index])
        all_logits.append(torch.stack(logits))
    loss = sum(losses) / len(losses)
    return (loss, torch.stack(all_logits), present, concepts) if return_logits else loss


def local_inputs(dtype=torch.float64, seed=0):
    """4 captions, 3 concept slots, labels repeated across captions, 2 captions without concept,
    multi-token concepts with padded (masked) positions pointing at garbage tokens."""
    g = torch.Generator().manual_seed(seed)
    batch, length, dim, patches_n, slots, width = 6, 9, 8, 7, 3, 3
    tokens = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    patches = F.normalize(torch.randn(batch, patches_n, dim, generator=g, dtype=dtype), dim=-1)
    labels = torch.full((batch, slots), -1, dtype=torch.long)
    positions = torch.zeros(batch, slots, width, dtype=torch.long)
    mask = torch.zeros(batch, slots, width, dtype=torch.bool)

    def put(b, c, label, pos):
        labels[b, c] = label
        positions[b, c, : len(pos)] = torch.tensor(pos)
        mask[b, c, : len(pos)] = True
        positions[b, c, len(pos) :] = 7  # padding points at a real token; the mask must hide it

    put(0, 0, 5, [1, 2])
    put(0, 1, 12, [4])
    # caption 1: no concept
    put(2, 0, 5, [3])
    put(2, 2, 40, [5, 6, 7])  # slot 1 left empty in the middle
    put(3, 0, 12, [2])
    put(3, 1, 12, [6, 7])
    # caption 4: no concept
    put(5, 0, 33, [1])
    return tokens, patches, labels, positions, mask


def concept_loss(**kwargs):
    """A float64 ConceptLoss whose fixed scale is exactly 1/0.07 (the default buffer is float32)."""
    loss_fn = ConceptLoss(**kwargs).double()
    loss_fn.logit_scale.fill_(LOCAL_SCALE)
    return loss_fn


# --------------------------------------------------------------------------- eq. (3)


def _global_inputs(batch=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(3.0), math.log(60.0)])
def test_global_loss_matches_plain_infonce_values_and_gradients(log_scale):
    image, text = _global_inputs()
    loss_fn = GlobalContrastiveLoss().double()
    loss_fn.logit_scale.data.fill_(log_scale)
    loss = loss_fn(image, text)
    grads = torch.autograd.grad(loss, [image, text, loss_fn.logit_scale])

    t = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    image_ref, text_ref = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    expected = ref_global_loss(image_ref, text_ref, torch.exp(t))
    expected_grads = torch.autograd.grad(expected, [image_ref, text_ref, t])

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert float(grads[2].abs()) > 1e-6  # the learnable temperature is trained below the cap


def test_global_loss_is_asymmetric_in_the_right_way():
    """Swapping image and text gives the same loss (symmetric), but permuting only the texts
    changes it: the positives are the diagonal."""
    image, text = _global_inputs()
    loss_fn = GlobalContrastiveLoss().double()
    torch.testing.assert_close(loss_fn(image, text), loss_fn(text, image))
    assert not torch.allclose(loss_fn(image, text), loss_fn(image, text.roll(1, 0)))


def test_global_loss_initial_scale_and_clamp_at_100():
    loss_fn = GlobalContrastiveLoss().double()
    assert float(loss_fn.scale().detach()) == pytest.approx(1 / 0.07)
    image, text = _global_inputs()

    loss_fn.logit_scale.data.fill_(math.log(250.0))  # above ln 100
    assert float(loss_fn.scale().detach()) == pytest.approx(100.0)
    loss = loss_fn(image, text)
    loss.backward()
    expected = ref_global_loss(image.detach(), text.detach(), torch.tensor(100.0, dtype=torch.float64))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-10)
    assert float(loss_fn.logit_scale.grad) == 0.0  # float(None) would raise: the grad exists
    assert float(image.grad.abs().sum()) > 0  # the features are still trained

    capped = GlobalContrastiveLoss().double()
    capped.logit_scale.data.fill_(math.log(100.0))
    torch.testing.assert_close(capped(image, text), loss.detach())


def test_global_loss_rank_offset_with_a_simulated_gather():
    """Two simulated ranks (the gather puts the local half at its rank's slot of the batch): the
    mean of the rank losses and its gradients equal the single-process loss on the whole batch."""
    image, text = _global_inputs(batch=6)
    loss_fn = GlobalContrastiveLoss().double()
    full = loss_fn(image, text)
    full_grads = torch.autograd.grad(full, [image, text, loss_fn.logit_scale])
    halves = [slice(0, 3), slice(3, 6)]

    def rank_loss(rank, targets_rank):
        local_image, local_text = image[halves[rank]], text[halves[rank]]
        whole = {id(local_image): image, id(local_text): text}

        def gather(local):
            parts = [whole[id(local)][part] for part in halves]
            parts[rank] = local
            return torch.cat(parts)

        return loss_fn(local_image, local_text, gather, targets_rank)

    mean = (rank_loss(0, 0) + rank_loss(1, 1)) / 2
    mean_grads = torch.autograd.grad(mean, [image, text, loss_fn.logit_scale])
    torch.testing.assert_close(mean, full, rtol=1e-10, atol=1e-10)
    for got, want in zip(mean_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # the targets depend on the rank: rank 1's half scored with rank 0's targets is different
    assert not torch.allclose(rank_loss(1, 0), rank_loss(1, 1))


# --------------------------------------------------------------------------- eqs. (1), (2), (4), (5)


def test_gather_concepts_mean_pools_masked_positions():
    tokens, _, labels, positions, mask = local_inputs()
    concepts, concept_labels, caption = gather_concepts(tokens, labels, positions, mask)
    assert concept_labels.tolist() == [5, 12, 5, 40, 12, 12, 33]
    assert caption.tolist() == [0, 0, 2, 2, 3, 3, 5]
    torch.testing.assert_close(concepts[0], (tokens[0, 1] + tokens[0, 2]) / 2)
    torch.testing.assert_close(concepts[3], (tokens[2, 5] + tokens[2, 6] + tokens[2, 7]) / 3)
    torch.testing.assert_close(concepts[6], tokens[5, 1])


def test_local_loss_matches_plain_computation_values_and_gradients():
    tokens, patches, labels, positions, mask = local_inputs()
    tokens.requires_grad_()
    out = concept_loss()(tokens, patches, labels, positions, mask)
    assert out.num_concepts == 7
    (grad,) = torch.autograd.grad(out.loss, tokens)

    tokens_ref = tokens.detach().clone().requires_grad_()
    expected, logits, present, concepts = ref_local_loss(
        tokens_ref, patches, labels, positions, mask, return_logits=True
    )
    (expected_grad,) = torch.autograd.grad(expected, tokens_ref)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)
    # tokens outside every concept (and masked padding positions) get no gradient
    assert float(grad[1].abs().sum()) == 0.0 and float(grad[4].abs().sum()) == 0.0
    assert float(grad[0, 7].abs().sum()) == 0.0 and float(grad[0, 1].abs().sum()) > 0
    # logged accuracy: fraction of concepts whose argmax is their own class
    own = torch.tensor([present.index(label) for _, label, _ in concepts])
    assert float(out.accuracy) == pytest.approx(float((logits.argmax(1) == own).double().mean()))


def test_local_loss_argmax_target_is_ce_against_the_logits_argmax():
    tokens, patches, labels, positions, mask = local_inputs()
    tokens.requires_grad_()
    got = concept_loss(target="argmax")(tokens, patches, labels, positions, mask).loss
    (grad,) = torch.autograd.grad(got, tokens)

    tokens_ref = tokens.detach().clone().requires_grad_()
    expected, logits, present, concepts = ref_local_loss(
        tokens_ref, patches, labels, positions, mask, target="argmax", return_logits=True
    )
    (expected_grad,) = torch.autograd.grad(expected, tokens_ref)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)
    # the example is one where the two targets differ, so the check above is meaningful
    own = torch.tensor([present.index(label) for _, label, _ in concepts])
    assert (logits.argmax(1) != own).any()
    label_loss = concept_loss(target="label")(tokens.detach(), patches, labels, positions, mask).loss
    assert not torch.allclose(label_loss, got.detach())
    with pytest.raises(ValueError):
        ConceptLoss(target="soft")


def test_local_loss_softmax_runs_over_present_classes_only():
    """Absent classes never enter the softmax: relabelling (large ids, gaps: the rest of a bank)
    changes nothing, and the loss equals a CE over exactly the P present classes."""
    tokens, patches, labels, positions, mask = local_inputs()
    loss_fn = concept_loss()
    base = loss_fn(tokens, patches, labels, positions, mask).loss
    remap = {5: 0, 12: 999, 40: 3, 33: 572}
    relabelled = labels.clone()
    for old, new in remap.items():
        relabelled[labels == old] = new
    torch.testing.assert_close(loss_fn(tokens, patches, relabelled, positions, mask).loss, base)

    _, logits, present, concepts = ref_local_loss(tokens, patches, labels, positions, mask, return_logits=True)
    assert logits.shape == (7, len(present)) == (7, 4)
    own = torch.tensor([present.index(label) for _, label, _ in concepts])
    torch.testing.assert_close(base, F.cross_entropy(logits, own))
    # a softmax padded with absent bank classes (zero weights, logit 0) would give another value
    padded = torch.cat([logits, torch.zeros(7, 10, dtype=logits.dtype)], 1)
    assert not torch.allclose(base, F.cross_entropy(padded, own))


def test_local_loss_captions_without_concepts_contribute_nothing():
    tokens, patches, labels, positions, mask = local_inputs()
    keep = torch.tensor([0, 2, 3, 5])  # captions 1 and 4 have no concept
    loss_fn = concept_loss()
    full = loss_fn(tokens, patches, labels, positions, mask)
    subset = loss_fn(tokens[keep], patches[keep], labels[keep], positions[keep], mask[keep])
    torch.testing.assert_close(full.loss, subset.loss, rtol=1e-12, atol=1e-12)
    assert full.num_concepts == subset.num_concepts == 7
    # changing the patches of a caption without concepts changes nothing either
    other = patches.clone()
    other[1] = F.normalize(torch.randn_like(other[1]), dim=-1)
    torch.testing.assert_close(loss_fn(tokens, other, labels, positions, mask).loss, full.loss)


def test_local_loss_pools_over_the_concepts_own_image():
    tokens, patches, labels, positions, mask = local_inputs()
    loss_fn = concept_loss()
    base = loss_fn(tokens, patches, labels, positions, mask).loss
    swapped = patches.clone()
    swapped[[0, 2]] = patches[[2, 0]]
    assert not torch.allclose(loss_fn(tokens, swapped, labels, positions, mask).loss, base)


def test_local_loss_without_concepts_is_zero_and_backpropagates():
    tokens, patches, labels, positions, mask = local_inputs()
    tokens.requires_grad_()
    out = concept_loss()(tokens, patches, torch.full_like(labels, -1), positions, mask)
    assert out.num_concepts == 0
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert tokens.grad is not None and float(tokens.grad.abs().sum()) == 0.0


# --------------------------------------------------------------------------- the Lightning module

CAPTIONS = [
    "a dog sitting next to a red car",
    "two traffic lights above a busy street",
    "a cat sleeping on a bed",
    "a dog chasing a cat",
]
WIDTH = 64  # TimmViT.tiny() width


def make_module(seed=0, **kwargs):
    torch.manual_seed(seed)
    image_encoder = TimmViT.tiny(model_kwargs={"depth": 2, "embed_dim": WIDTH, "num_heads": 2, "img_size": 56})
    text_encoder = CLIPTextTransformer.tiny(output_dim=WIDTH)
    return SimZSS(image_encoder, text_encoder, **kwargs)


def make_batch(captions=CAPTIONS, seed=1, size=(56, 56)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(captions), 3, *size), generator=g, dtype=torch.uint8)
    return {"image": images, "caption": list(captions)}


def independent_features(module, images, captions):
    """Frozen [CLS] / patch tokens straight from the timm model, text features from the encoder."""
    encoder = module.model.image_encoder
    with torch.no_grad():
        tokens = encoder.model.forward_features(encoder.normalize(images.float() / 255))
    patches = F.normalize(tokens[:, encoder.num_prefix_tokens :], dim=-1)
    cls = F.normalize(tokens[:, 0], dim=-1)
    text = module.model.text_encoder(module.model.text_encoder.tokenize(captions))
    return cls, patches, text


@pytest.fixture(scope="module")
def concept_tensors():
    module = make_module()
    encoded = [module.concepts.encode(caption) for caption in CAPTIONS]
    return {key: torch.stack([e[key] for e in encoded]) for key in CONCEPT_KEYS}


def test_module_loss_matches_plain_losses_and_gradients(concept_tensors):
    lam = 0.05
    module = make_module(lambda_local=lam)
    module.train()
    batch = make_batch()
    terms = module.training_loss(batch)
    terms["loss"].backward()

    # value: eq. (6) on independently computed features
    reference = make_module(lambda_local=lam)
    reference.load_state_dict(module.state_dict())
    cls, patches, text = independent_features(reference, batch["image"], batch["caption"])
    t = reference.global_loss.logit_scale
    concepts = concept_tensors
    assert int((concepts["concept_labels"] >= 0).sum()) == 7
    global_ref = ref_global_loss(cls.double(), F.normalize(text.pooled, dim=-1).double(), torch.exp(t).double())
    local_ref = ref_local_loss(
        text.tokens.double(),
        patches.double(),
        concepts["concept_labels"],
        concepts["concept_token_positions"],
        concepts["concept_token_mask"],
    )
    total_ref = global_ref + lam * local_ref
    torch.testing.assert_close(terms["loss_global"].double(), global_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_local"].double(), local_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), total_ref.detach(), rtol=1e-5, atol=1e-6)
    assert float(terms["logit_scale"]) == pytest.approx(1 / 0.07)

    # gradients of the trainable parts equal those of the plain loss
    names = [n for n, _ in reference.named_parameters() if n.startswith("model.text_encoder.")]
    names.append("global_loss.logit_scale")
    ref_params = dict(reference.named_parameters())
    expected = torch.autograd.grad(total_ref, [ref_params[n] for n in names])
    params = dict(module.named_parameters())
    for name, want in zip(names, expected):
        got = params[name].grad
        assert got is not None, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert float(module.global_loss.logit_scale.grad.abs()) > 0
    assert float(params["model.text_encoder.text.text_projection"].grad.abs().sum()) > 0


def test_module_image_encoder_is_frozen_and_stays_in_eval_mode():
    module = make_module()
    module.train()
    encoder = module.model.image_encoder
    assert not any(m.training for m in encoder.modules())
    assert module.model.text_encoder.training and module.training
    module.eval()
    module.train(True)
    assert not any(m.training for m in encoder.modules())

    module.training_loss(make_batch())["loss"].backward()
    for name, param in encoder.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    text_params = list(module.model.text_encoder.named_parameters())
    assert text_params
    for name, param in text_params:
        assert param.requires_grad and param.grad is not None, name
    assert float(module.global_loss.logit_scale.grad.abs()) > 0
    assert sum(float(p.grad.abs().sum()) for _, p in text_params) > 0


def test_lambda_zero_is_exactly_the_global_loss():
    module = make_module(lambda_local=0.0)
    terms = module.training_loss(make_batch())
    assert "loss_local" not in terms
    assert torch.equal(terms["loss"], terms["loss_global"])
    with_local = make_module(lambda_local=0.5)
    terms_local = with_local.training_loss(make_batch())
    torch.testing.assert_close(terms_local["loss_global"], terms["loss_global"])
    assert float(terms_local["loss_local"].detach()) > 0
    torch.testing.assert_close(terms_local["loss"], terms["loss_global"] + 0.5 * terms_local["loss_local"])


def test_precomputed_concepts_equal_on_the_fly_extraction(concept_tensors):
    module = make_module(lambda_local=0.3)
    batch = make_batch()
    on_the_fly = module.training_loss(batch)
    precomputed = module.training_loss({**batch, **concept_tensors})
    assert on_the_fly["concepts_per_caption"] == pytest.approx(7 / 4)
    for key in ("loss", "loss_local", "loss_global", "concept_accuracy"):
        torch.testing.assert_close(precomputed[key], on_the_fly[key], rtol=1e-6, atol=1e-7)
    # and the batch's concepts are really the ones used
    no_concepts = {**concept_tensors, "concept_labels": torch.full_like(concept_tensors["concept_labels"], -1)}
    empty = module.training_loss({**batch, **no_concepts})
    assert float(empty["loss_local"].detach()) == 0.0
    torch.testing.assert_close(empty["loss"], on_the_fly["loss_global"])


def test_absent_bank_entries_change_nothing_in_the_module(tmp_path):
    """A bank with extra concepts (absent from the batch, shifting every label) gives the same loss."""
    names = ["dog", "car", "traffic light", "cat", "bed"]
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n".join(names) + "\n")
    large.write_text("\n".join(names + ["aardvark", "apple", "bag", "zebra", "chair"]) + "\n")
    batch = make_batch()
    loss_small = make_module(lambda_local=1.0, concept_bank=str(small)).training_loss(batch)
    loss_large = make_module(lambda_local=1.0, concept_bank=str(large)).training_loss(batch)
    assert loss_small["concepts_per_caption"] == loss_large["concepts_per_caption"] == pytest.approx(7 / 4)
    torch.testing.assert_close(loss_large["loss_local"], loss_small["loss_local"])
    torch.testing.assert_close(loss_large["loss"], loss_small["loss"])


def test_predict_scores_is_scaled_cosine_on_the_patch_grid():
    module = make_module()
    module.eval()
    module.global_loss.logit_scale.data.fill_(math.log(30.0))
    batch = make_batch(captions=["x", "y"], size=(56, 84))  # 4 x 6 grid: rows != columns
    images = batch["image"].float() / 255
    g = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(3, WIDTH, generator=g), dim=-1)
    with torch.no_grad():  # as OVSegModule.class_probabilities calls it
        scores = module.predict_scores(images, queries)
    assert scores.shape == (2, 3, 4, 6)

    encoder = module.model.image_encoder
    with torch.no_grad():
        tokens = encoder.model.forward_features(encoder.normalize(images))
    b, q, i, j = 1, 2, 2, 5
    patch = tokens[b, encoder.num_prefix_tokens + i * 6 + j]
    cosine = float(_dot(patch, queries[q]) / (_norm(patch) * _norm(queries[q])))
    assert float(scores[b, q, i, j]) == pytest.approx(30.0 * cosine, rel=1e-5, abs=1e-5)
    # every pixel, vectorised the independent way
    patches = F.normalize(tokens[:, encoder.num_prefix_tokens :], dim=-1).reshape(2, 4, 6, WIDTH)
    torch.testing.assert_close(scores, 30.0 * torch.einsum("bhwd,qd->bqhw", patches, queries), rtol=1e-5, atol=1e-5)
    # the cap of the learnable scale applies at inference too
    module.global_loss.logit_scale.data.fill_(math.log(400.0))
    with torch.no_grad():
        capped = module.predict_scores(images, queries)
    torch.testing.assert_close(capped, scores * (100.0 / 30.0), rtol=1e-5, atol=1e-5)


def test_logit_scale_parameter_is_clamped_after_each_step():
    """OpenCLIP clamps the parameter in place after the optimizer step; so does SimZSS."""
    loss = GlobalContrastiveLoss(max_scale=100.0)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(400.0))
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(20.0))
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(math.log(20.0))


def test_concept_class_embedding_is_the_mean_of_the_name_tokens():
    text = CLIPTextTransformer.tiny(output_dim=64)
    model = SimZSS(TimmViT.tiny(), text, class_embedding="concept").eval()
    vocabulary = Vocabulary.from_names(["traffic light", "dog"], templates=["a photo of a {}.", "{}"])
    embeddings = model.text_embeddings(vocabulary)
    # Independent computation: "a photo of a" is 4 BPE tokens, "traffic light" 2, after <start>.
    with torch.no_grad():
        tokens = text(text.tokenize(["a photo of a traffic light.", "traffic light"])).tokens
    first = F.normalize(tokens[0, 5:7].mean(0), dim=-1)
    second = F.normalize(tokens[1, 1:3].mean(0), dim=-1)
    torch.testing.assert_close(embeddings[0], F.normalize(first + second, dim=-1))
    with pytest.raises(ValueError, match="separate word"):
        model.text_embeddings(Vocabulary.from_names(["dog"], templates=["a photo of {}s."]))
