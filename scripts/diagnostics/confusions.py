"""Per-class IoU of demo runs, and what each class's pixels are labelled as.

    python scripts/diagnostics/confusions.py runs/demo/cdt runs/demo/seed-1/cdt [--scenes 400] [--classes car boat]
                                             [--name-permutations]

Each argument is a folder of ``make demo`` / ``python -m ovseg.demo`` (it holds ``results.json`` and
``checkpoints/last.ckpt``). The run's model is rebuilt from the ``ovseg fit`` command line stored in
``results.json``, loads its last checkpoint and labels ``--scenes`` validation scenes of the
synthetic world (the demo validates on the first 100; more gives steadier per-class figures).
Printed per run: seen and unseen mIoU, the IoU of every class, and for the classes asked for (default:
every seen class) the three labels their pixels get most often, in % of the class's pixels.

``--name-permutations``: the unseen mIoU under every naming of the unseen classes (each unseen
class given the names of one of them, one class per name set), read off the same confusion matrix:
the methods score each class against its own names independently, so naming class u with the
names of class v labels as u the pixels labelled v with the true names, i.e. column v of the
matrix becomes column u. Printed: the true names, the mean over the derangements (no class keeps
its names: the benchmark's ``mIoU_unseen_swapped``, which the script checks) with their minimum and
maximum, the mean over all namings, and the true names' rank among all namings; with a random CLIP
the names carry nothing, and the true naming is one draw among them. The script checks the premise
on the run itself: a second pass with the benchmark's cyclic shift of the unseen names
(``Benchmark.name_swapped_vocabulary``) must give the renamed matrix.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ovseg.cli import build, read_checkpoint
from ovseg.metrics import AbsentPolicy, confusion_matrix, metrics_from_confusion, unseen_miou_with_wrong_names


def confusion_of_run(
    folder: Path, scenes: int, name_swapped: bool = False
) -> tuple[Tensor, Tensor | None, list[str], list[int], AbsentPolicy]:
    """(K, K) confusion matrix (rows: ground truth, columns: prediction), the same with the
    benchmark's name-swapped vocabulary (when ``name_swapped``, else None), class names, unseen ids
    and the benchmark's absent-class policy."""
    results, checkpoint_path = folder / "results.json", folder / "checkpoints" / "last.ckpt"
    for path in (results, checkpoint_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: give the folder of a finished demo run (e.g. runs/demo/cdt)")
    stored = json.loads(results.read_text())
    args = [*stored["key"]["args"], "--data.init_args.num_val", str(scenes)]
    cli = build(args)
    model, datamodule = cli.model, cli.datamodule
    checkpoint = read_checkpoint(checkpoint_path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    datamodule.setup("validate")
    benchmark = datamodule.benchmarks[0]
    num_classes = len(benchmark.vocabulary)
    vocabularies = [benchmark.vocabulary] + ([benchmark.name_swapped_vocabulary()] if name_swapped else [])
    totals = [torch.zeros(num_classes, num_classes, dtype=torch.long) for _ in vocabularies]
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            labels = list(batch["label"])
            sizes = [tuple(label.shape[-2:]) for label in labels]
            for vocabulary, total in zip(vocabularies, totals):
                predictions = model.segment_tensors(batch["image"], vocabulary, benchmark.inference, sizes)
                for prediction, label in zip(predictions, labels):
                    total += confusion_matrix(prediction.labels, label, num_classes, benchmark.ignore_index).cpu()
    names = list(benchmark.vocabulary.display_names)
    swapped = totals[1] if name_swapped else None
    return totals[0], swapped, names, list(benchmark.unseen_indices), benchmark.absent_policy


def renamed_confusion(confusion: Tensor, unseen: Sequence[int], names_of: Sequence[int]) -> Tensor:
    """The confusion matrix had unseen class ``unseen[i]`` been given the names of class
    ``names_of[i]`` (a permutation of ``unseen``): column ``names_of[i]`` moves to ``unseen[i]``."""
    columns = list(range(confusion.shape[1]))
    for target, source in zip(unseen, names_of):
        columns[target] = source
    return confusion[:, columns]


def unseen_miou_of_namings(
    confusion: Tensor, unseen: Sequence[int], absent_policy: AbsentPolicy
) -> dict[tuple[int, ...], float]:
    """Unseen mIoU for every naming of the unseen classes, keyed by ``names_of`` (see
    :func:`renamed_confusion`); the key ``tuple(sorted(unseen))`` is the true naming."""
    unseen = sorted(unseen)
    return {
        names_of: float(
            metrics_from_confusion(renamed_confusion(confusion, unseen, names_of), absent_policy, unseen)["mIoU_unseen"]
        )
        for names_of in itertools.permutations(unseen)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="demo run folders")
    parser.add_argument("--scenes", type=int, default=400, help="validation scenes (default 400)")
    parser.add_argument("--classes", nargs="*", default=None, help="classes whose confusions to print")
    parser.add_argument(
        "--name-permutations", action="store_true", help="unseen mIoU under every naming of the unseen classes"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for folder in args.runs:
        confusion, swapped, names, unseen, absent_policy = confusion_of_run(folder, args.scenes, args.name_permutations)
        metrics = metrics_from_confusion(confusion, absent_policy, unseen)  # as the run's validation
        seen = [k for k in range(len(names)) if k not in unseen]
        print(
            f"{folder}: seen {float(metrics['mIoU_seen']):.1f}, unseen {float(metrics['mIoU_unseen']):.1f} mIoU"
            f" ({args.scenes} scenes)"
        )
        shown = [names[k].upper() if k in unseen else names[k] for k in range(len(names))]
        iou = metrics["IoU"]  # NaN: a class neither present nor predicted
        print("  IoU: " + ", ".join(f"{shown[k]} {float(iou[k]):.0f}" for k in range(len(names))))
        wanted = args.classes if args.classes is not None else [names[k] for k in seen]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise SystemExit(f"error: --classes {' '.join(unknown)}: not in the vocabulary ({', '.join(names)})")
        for name in wanted:
            k = names.index(name)
            share = confusion[k].double() / confusion[k].sum().clamp(min=1)
            values, indices = torch.topk(share, 3)
            labelled = ", ".join(f"{shown[j]} {100 * v:.0f}%" for v, j in zip(values.tolist(), indices.tolist()))
            print(f"  {name} pixels labelled: {labelled}")
        if swapped is not None:
            print_namings(confusion, swapped, unseen, absent_policy)


def print_namings(confusion: Tensor, swapped: Tensor, unseen: Sequence[int], absent_policy: AbsentPolicy) -> None:
    """The ``--name-permutations`` lines of one run (``swapped``: the name-swapped pass's matrix)."""
    order = sorted(unseen)
    cyclic = tuple(order[1:] + order[:1])  # Benchmark.name_swapped_vocabulary: each takes the next one's names
    if not torch.equal(renamed_confusion(confusion, order, cyclic), swapped):
        raise SystemExit(
            "error: the name-swapped pass differs from the renamed confusion matrix: this method does not "
            "score the classes independently of their order, so --name-permutations does not apply"
        )
    namings = unseen_miou_of_namings(confusion, order, absent_policy)
    true = namings[tuple(order)]
    deranged = [value for key, value in namings.items() if all(a != b for a, b in zip(key, order))]
    rank = 1 + sum(value > true for value in namings.values())
    control = float(unseen_miou_with_wrong_names(confusion, order, absent_policy))
    mean = sum(deranged) / len(deranged)
    all_present = bool((confusion[order].sum(dim=1) > 0).all())
    if (all_present or absent_policy == "exclude") and abs(control - mean) > 1e-9:
        raise SystemExit(f"error: the benchmark's control {control} is not the mean over the derangements {mean}")
    print(
        f"  unseen names permuted: true names {true:.1f}; a pass with the cyclic shift "
        f"{namings[cyclic]:.1f} (equal to the renamed matrix); mean over the {len(deranged)} derangements "
        f"{mean:.1f} (min {min(deranged):.1f}, max {max(deranged):.1f}; the benchmark's control "
        f"{control:.1f}{'' if all_present else ', some unseen class absent from these scenes'}); mean over "
        f"all {len(namings)} namings {sum(namings.values()) / len(namings):.1f}; "
        f"the true names rank {rank} of {len(namings)}"
    )


if __name__ == "__main__":
    main()
