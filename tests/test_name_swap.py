"""The zero-shot margin's control: unseen mIoU with the unseen names permuted among themselves,
read off the true names' confusion matrix (ovseg.metrics.unseen_miou_with_wrong_names)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ovseg.benchmark import Benchmark
from ovseg.cli import build
from ovseg.metrics import confusion_matrix, metrics_from_confusion, unseen_miou_with_wrong_names

REPO = Path(__file__).resolve().parents[1]


def renamed_columns(num_classes: int, unseen: list[int], names_of: list[int] | tuple[int, ...]) -> list[int]:
    """Class ``unseen[i]`` given the names of ``names_of[i]``: the column of class scores (or counts)
    that class now reads is the one ``names_of[i]`` had; every other class keeps its own."""
    columns = list(range(num_classes))
    for target, source in zip(unseen, names_of):
        columns[target] = source
    return columns


def derangement_mean(conf: torch.Tensor, unseen: list[int], policy: str) -> float:
    """Brute force: relabel the predictions for every derangement of the unseen names, count again."""
    values = [
        float(
            metrics_from_confusion(conf[:, renamed_columns(conf.shape[1], unseen, names_of)], policy, unseen)[
                "mIoU_unseen"
            ]
        )
        for names_of in itertools.permutations(unseen)
        if all(a != b for a, b in zip(unseen, names_of))  # no class keeps its own names
    ]
    return sum(values) / len(values)


@pytest.mark.parametrize("policy", ["zero", "exclude"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_control_is_the_mean_over_all_derangements(policy, seed):
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 8, (2, 30, 30), generator=generator)
    noise = torch.randint(0, 8, label.shape, generator=generator)
    prediction = torch.where(torch.rand(label.shape, generator=generator) < 0.5, label, noise)
    conf = confusion_matrix(prediction, label, 8)
    unseen = [1, 3, 4, 6] if seed != 2 else [0, 2, 3, 5, 7]  # 9 and 44 derangements
    got = float(unseen_miou_with_wrong_names(conf, unseen, policy))
    assert got == pytest.approx(derangement_mean(conf, unseen, policy), abs=1e-9)
    results = metrics_from_confusion(conf, policy, unseen, name_swap_control=True)
    assert float(results["mIoU_unseen_swapped"]) == pytest.approx(got, abs=1e-12)
    assert float(results["zs_margin"]) == pytest.approx(float(results["mIoU_unseen"]) - got, abs=1e-12)


def test_control_by_hand_and_with_an_unseen_class_absent_from_the_ground_truth():
    """Unseen a, b, c; GT rows: a 4 px (2 labelled a, 2 labelled b), b 2 px (both b), c none."""
    conf = torch.zeros(4, 4, dtype=torch.long)
    conf[1, 1], conf[1, 2], conf[2, 2], conf[0, 0] = 2, 2, 2, 5
    # a as b: 2 / (4 + 4 - 2); a as c: 0 / 4; b as a: 0 / (2 + 2); b as c: 0 / 2
    expected_a, expected_b = (1 / 3 + 0) / 2, 0.0
    # c has no GT: "exclude" leaves it out; "zero" counts it as 0 (with the names of a or b, both
    # predicted, it is a predicted class without GT), though with its true names it is left out
    excluded = float(unseen_miou_with_wrong_names(conf, [1, 2, 3], "exclude"))
    assert excluded == pytest.approx(100 * (expected_a + expected_b) / 2)
    assert excluded == pytest.approx(derangement_mean(conf, [1, 2, 3], "exclude"))
    zero = float(unseen_miou_with_wrong_names(conf, [1, 2, 3], "zero"))
    assert zero == pytest.approx(100 * (expected_a + expected_b + 0) / 3)
    assert zero == pytest.approx(derangement_mean(conf, [1, 2, 3], "zero"))  # c always gets predicted names


def test_control_needs_two_unseen_classes():
    with pytest.raises(ValueError, match="at least two unseen classes"):
        unseen_miou_with_wrong_names(torch.eye(3, dtype=torch.long), [1], "zero")


FAST = ["--data.init_args.image_size", "64", "--trainer.logger", "false"]


@pytest.mark.parametrize("method", ["clip", "simzss", "zegformer", "cdt"])
def test_renaming_the_unseen_classes_only_relabels_each_methods_predictions(method):
    """The control's premise, on every method with random weights: a pass with the unseen names
    cycled (Benchmark.name_swapped_vocabulary) gives the true names' class probabilities with the
    unseen columns permuted the same way, so counting it again is not needed."""
    config = f"configs/{method}/synthetic.yaml"
    cli = build(["-c", str(REPO / config), "-c", str(REPO / f"tests/fast/{method}.yaml"), *FAST])
    model, datamodule = cli.model.eval(), cli.datamodule
    datamodule.setup("validate")
    benchmark: Benchmark = datamodule.benchmarks[0]
    assert benchmark.name_swap_control and len(benchmark.unseen_classes) >= 2
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        true = model.class_probabilities(images, benchmark.vocabulary, benchmark.inference, (64, 64))
        swapped = model.class_probabilities(images, benchmark.name_swapped_vocabulary(), benchmark.inference, (64, 64))
    unseen = sorted(benchmark.unseen_indices)
    columns = renamed_columns(true.shape[1], unseen, unseen[1:] + unseen[:1])  # each takes the next one's names
    assert true.shape[1] == len(benchmark.vocabulary)
    torch.testing.assert_close(swapped, true[:, columns], rtol=0, atol=1e-6)
    assert not torch.allclose(swapped, true, atol=1e-4)  # the renaming did change the columns
