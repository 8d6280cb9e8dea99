"""``make demo``: SimZSS and its LiT ablation on the synthetic world, offline, side by side.

    python -m ovseg.demo [--config configs/simzss/synthetic.yaml] [extra ovseg overrides...]

Both runs use the same config, seed and budget; the LiT run only sets ``lambda_local: 0`` (no
concept loss). Each trained model is evaluated with both class embeddings (the config's, then the
other: ``eot`` or ``concept``), and the final validation metrics and per-class IoU of all four are
printed together; "minutes" is the training run's wall-clock time. Each run owns its folder:
``runs/demo/simzss`` and ``runs/demo/lit`` (``checkpoints/last.ckpt``, ``lightning_logs/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ovseg.cli import run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simzss" / "synthetic.yaml"


def train(config: Path, name: str, extra: list[str]):
    """Fit one run; returns its final validation results, wall-clock seconds and class names."""
    Console().rule(f"[bold]{name}")
    start = time.perf_counter()
    cli = run(["fit", "-c", str(config), "--trainer.default_root_dir", f"runs/demo/{name}", *extra])
    seconds = time.perf_counter() - start
    results = dict(cli.model.last_results)
    if not results:
        raise RuntimeError(f"the {name} run produced no validation results (is validation disabled?)")
    names = list(cli.datamodule.benchmarks[0].vocabulary.display_names)
    return results, seconds, names, cli


def revalidate(cli, **attributes) -> dict:
    """Validate the trained model again with some attributes changed (e.g. the class embedding)."""
    for key, value in attributes.items():
        setattr(cli.model, key, value)
    cli.model.text_cache.invalidate()
    cli.model.print_metrics = False
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return dict(cli.model.last_results)


def side_by_side(runs: dict[str, tuple[dict, float, list[str]]]) -> Table:
    """One table: summary metrics then per-class IoU, one column per run."""
    table = Table(title="synthetic world: SimZSS vs LiT (validation, %)")
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    first_results, _, class_names = next(iter(runs.values()))
    benchmark = next(iter(first_results))
    for key in ("mIoU", "pAcc", "mAcc", "fwIoU"):
        table.add_row(key, *[f"{float(results[benchmark][key]):.2f}" for results, _, _ in runs.values()])
    table.add_row("minutes", *[f"{seconds / 60:.1f}" for _, seconds, _ in runs.values()])
    table.add_section()
    for index, name in enumerate(class_names):
        table.add_row(
            f"IoU {name}", *[f"{float(results[benchmark]['IoU'][index]):.1f}" for results, _, _ in runs.values()]
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args, extra = parser.parse_known_args()
    runs = {}
    for label, name, flags in (
        ("SimZSS", "simzss", []),
        ("LiT (lambda 0)", "lit", ["--model.init_args.lambda_local", "0"]),
    ):
        results, seconds, names, cli = train(args.config, name, [*extra, *flags])
        embedding = cli.model.class_embedding
        runs[f"{label}, {embedding}"] = (results, seconds, names)
        other = "eot" if embedding == "concept" else "concept"
        runs[f"{label}, {other}"] = (revalidate(cli, class_embedding=other), seconds, names)
    Console().print(side_by_side(runs))


if __name__ == "__main__":
    main()
