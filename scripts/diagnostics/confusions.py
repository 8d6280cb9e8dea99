"""Per-class IoU of demo runs, and what each class's pixels are labelled as.

    python scripts/diagnostics/confusions.py runs/demo/cdt runs/demo/seed-1/cdt [--scenes 400] [--classes car boat]

Each argument is a folder of ``make demo`` / ``python -m ovseg.demo`` (it holds ``results.json`` and
``checkpoints/last.ckpt``). The run's model is rebuilt from the ``ovseg fit`` command line stored in
``results.json``, loads its last checkpoint and labels ``--scenes`` validation scenes of the
synthetic world (the demo validates on the first 100; more gives steadier per-class figures).
Printed per run: seen and unseen mIoU, the IoU of every class, and for the classes asked for (default:
every seen class) the three labels their pixels get most often, in % of the class's pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from ovseg.cli import build, read_checkpoint
from ovseg.metrics import confusion_matrix, metrics_from_confusion


def confusion_of_run(folder: Path, scenes: int) -> tuple[Tensor, list[str], list[int], str]:
    """(K, K) confusion matrix (rows: ground truth, columns: prediction), class names, unseen ids
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
    total = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            labels = list(batch["label"])
            sizes = [tuple(label.shape[-2:]) for label in labels]
            predictions = model.segment_tensors(batch["image"], benchmark.vocabulary, benchmark.inference, sizes)
            for prediction, label in zip(predictions, labels):
                total += confusion_matrix(prediction.labels, label, num_classes, benchmark.ignore_index).cpu()
    names = list(benchmark.vocabulary.display_names)
    return total, names, list(benchmark.unseen_indices), benchmark.absent_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="demo run folders")
    parser.add_argument("--scenes", type=int, default=400, help="validation scenes (default 400)")
    parser.add_argument("--classes", nargs="*", default=None, help="classes whose confusions to print")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for folder in args.runs:
        confusion, names, unseen, absent_policy = confusion_of_run(folder, args.scenes)
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


if __name__ == "__main__":
    main()
