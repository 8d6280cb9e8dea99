"""SimZSS global loss across 2 CPU processes (gloo): per-rank halves + all-gather with gradients
give the single-process loss on the whole batch, and DDP-averaged gradients equal the
single-process gradients.

Two paths are checked in the same pair of processes:

- ``GlobalContrastiveLoss`` with a gather built on ``torch.distributed.nn.functional.all_gather``
  (image and text features from small linear layers);
- the module's own ``SimZSS._gather`` (Lightning's ``all_gather(sync_grads=True)``), with tiny
  encoders and a real Lightning ``Trainer``/``DDPStrategy`` attached (no ``fit``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from spawn_ranks import become_rank, free_port, run_ranks  # tests/spawn_ranks.py

WORLD = 2
HALF = 3  # samples per rank
TIMEOUT_S = 90  # a hang fails the test instead of blocking the run
CAPTIONS = [
    "a dog sitting next to a red car",
    "two traffic lights above a busy street",
    "a cat sleeping on a bed",
    "a dog chasing a cat",
    "a horse on the beach",
    "a bus parked near a tree",
]


# ------------------------------------------------------------------ what both sides compute


def _linear_setup():
    """Full-batch inputs and two linear 'encoders', identical on every process."""
    g = torch.Generator().manual_seed(0)
    x_image = torch.randn(WORLD * HALF, 5, generator=g, dtype=torch.float64)
    x_text = torch.randn(WORLD * HALF, 7, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    image_layer = torch.nn.Linear(5, 8).double()
    text_layer = torch.nn.Linear(7, 8).double()
    return x_image, x_text, image_layer, text_layer


def _linear_loss(part, gather, rank):
    from ovseg.contrastive import GlobalContrastiveLoss

    x_image, x_text, image_layer, text_layer = _linear_setup()
    loss_fn = GlobalContrastiveLoss().double()
    loss_fn.logit_scale.data.fill_(2.5)
    image = F.normalize(image_layer(x_image[part]), dim=-1)
    text = F.normalize(text_layer(x_text[part]), dim=-1)
    loss = loss_fn(image, text, gather, rank)
    loss.backward()
    params = {f"image.{n}": p for n, p in image_layer.named_parameters()}
    params.update({f"text.{n}": p for n, p in text_layer.named_parameters()})
    params["logit_scale"] = loss_fn.logit_scale
    return loss.detach(), {name: p.grad.detach().clone() for name, p in params.items()}


def _make_module():
    from ovseg.encoders.text_transformer import CLIPTextTransformer
    from ovseg.encoders.timm_vit import TimmViT
    from ovseg.methods.simzss.module import SimZSS

    torch.manual_seed(0)
    module = SimZSS(TimmViT.tiny(), CLIPTextTransformer.tiny(output_dim=64), lambda_local=0.0)
    return module.train()


def _module_batch(part):
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (WORLD * HALF, 3, 56, 56), generator=g, dtype=torch.uint8)
    captions = CAPTIONS[part]
    # lambda_local = 0: the concepts are not used; given (empty) in the batch, nothing is tagged
    empty = {
        "concept_labels": torch.full((len(captions), 1), -1),
        "concept_token_positions": torch.zeros(len(captions), 1, 1, dtype=torch.long),
        "concept_token_mask": torch.zeros(len(captions), 1, 1, dtype=torch.bool),
    }
    return {"image": images[part], "caption": captions, **empty}


def _module_loss(module, part):
    loss = module.training_loss(_module_batch(part))["loss"]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _release_losses(trainer, rank):
    """Per-rank global and local losses of the converted official fixture model in release mode, and the
    local loss with the per-rank class set."""
    from test_simzss_official import FIXTURES, converted_module, golden_fixture

    golden = golden_fixture()
    module = converted_module(golden)
    module.trainer = trainer
    part = slice(rank * 2, rank * 2 + 2)
    indices = golden["concept_indices"][part]
    batch = {
        "image": golden["images"][part],
        "caption": golden["captions"][part],
        "concept_labels": golden["concept_labels"][part],
        "concept_token_positions": indices,
        "concept_token_mask": indices != 0,
    }
    with torch.no_grad():
        terms = module.training_loss(batch)
        module.local_loss.class_set = "rank"
        rank_local = module.training_loss(batch)["loss_local"]
    expected = torch.load(FIXTURES / "ddp.pt", weights_only=True)
    return {
        "global": terms["loss_global"],
        "local": terms["loss_local"],
        "rank_local": rank_local,
        "expected_global": expected["cliploss"][rank],
        "expected_local": expected["ccloss"][rank],
    }


# ------------------------------------------------------------------ the distributed side


def _worker(rank: int, port: int, out_dir: str) -> None:
    become_rank(rank, port, WORLD)
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.nn.functional import all_gather

    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        num_nodes=1,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.setup_environment()  # initialises the gloo process group from the env
    assert dist.is_initialized() and dist.get_world_size() == WORLD and dist.get_rank() == rank
    assert trainer.world_size == WORLD and trainer.global_rank == rank

    def ddp_average(grads):
        for grad in grads.values():  # what DDP does to the gradients of the per-rank mean loss
            dist.all_reduce(grad)
            grad /= WORLD
        return grads

    def mean_over_ranks(value):
        value = value.clone()
        dist.all_reduce(value)
        return value / WORLD

    part = slice(rank * HALF, (rank + 1) * HALF)
    results = {}

    # 1) GlobalContrastiveLoss with an autograd all-gather
    def gather(tensor):
        return torch.cat(all_gather(tensor), dim=0)

    loss, grads = _linear_loss(part, gather, rank)
    results["linear"] = {"loss": loss, "mean_loss": mean_over_ranks(loss), "grads": ddp_average(grads)}

    # 2) the module's own gather (Lightning's all_gather with sync_grads=True)
    module = _make_module()
    module.trainer = trainer
    _, gather_rank = module._gather()
    assert gather_rank == rank
    loss, grads = _module_loss(module, part)
    results["module"] = {"loss": loss, "mean_loss": mean_over_ranks(loss), "grads": ddp_average(grads)}

    # 3) the release's distributed class set, on the official fixture's batch (2 captions per rank)
    results["release"] = _release_losses(trainer, rank)

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run_two_processes(out_dir: str) -> list[dict]:
    return run_ranks(_worker, (free_port(), out_dir), WORLD, TIMEOUT_S, out_dir)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return _run_two_processes(str(tmp_path_factory.mktemp("simzss_ddp")))


# ------------------------------------------------------------------ the checks


def _assert_grads_equal(got, want, **tolerance):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def test_gathered_global_loss_equals_single_process_loss_and_gradients(rank_results):
    from ovseg.contrastive import identity_gather

    full_loss, full_grads = _linear_loss(slice(None), identity_gather, 0)
    local = [r["linear"] for r in rank_results]
    # the per-rank losses differ (each scores its own half against everything) ...
    assert not torch.allclose(local[0]["loss"], local[1]["loss"])
    # ... and their mean is the loss of the whole batch
    for result in local:
        torch.testing.assert_close(result["mean_loss"], full_loss, rtol=1e-10, atol=1e-12)
        _assert_grads_equal(result["grads"], full_grads, rtol=1e-8, atol=1e-12)
    assert float(full_grads["text.weight"].abs().sum()) > 0 and float(full_grads["logit_scale"].abs()) > 0


def test_module_gather_path_equals_single_process_loss_and_gradients(rank_results):
    module = _make_module()
    assert module._gather()[1] == 0  # no trainer: identity gather
    full_loss, full_grads = _module_loss(module, slice(None))
    trainable = [
        name
        for name, _ in module.named_parameters()
        if name.startswith("model.text_encoder.") or name == "global_loss.logit_scale"
    ]
    assert sorted(full_grads) == sorted(trainable)
    for result in (r["module"] for r in rank_results):
        torch.testing.assert_close(result["mean_loss"], full_loss, rtol=1e-5, atol=1e-6)
        _assert_grads_equal(result["grads"], full_grads, rtol=1e-4, atol=1e-6)


def test_release_class_set_gives_the_releases_per_rank_losses(rank_results):
    """The release classifies a rank's concepts among the classes of all ranks (a class absent from the
    rank has a zero prototype, logit 0): ovseg's class_set="global" reproduces its per-rank losses, which
    the per-rank class set does not (rank 1 lacks two of rank 0's classes)."""
    for result in (r["release"] for r in rank_results):
        assert abs(float(result["global"]) - float(result["expected_global"])) <= 1e-5
        assert abs(float(result["local"]) - float(result["expected_local"])) <= 1e-5
    assert abs(float(rank_results[1]["release"]["rank_local"]) - float(rank_results[1]["release"]["local"])) > 1e-3
