"""``make demo``: every method on the synthetic world, offline, in one table.

    python -m ovseg.demo [--seed 0] [--threads 1] [--jobs 2] [--retrain [NAME ...]] [--only NAME ...]
                         [--clip OPEN_CLIP_FILE] [-- OVSEG_FIT_OVERRIDES ...]

The runs (:data:`RUNS`), each ``ovseg fit`` of a shipped config in its own folder
``runs/demo[/seed-S]/<name>`` (``checkpoints/``, ``lightning_logs/``, ``log.txt``, ``results.json``):

1. ``clip``: CLIP pretrained from the scene captions (configs/clip/synthetic.yaml), which name every
   category, the unseen ones included; written as an open_clip file for the mask methods;
2. ``simzss`` and ``lit``: SimZSS and its LiT ablation (no concept loss), evaluated with both class
   embeddings (concept, eot);
3. ``zegformer``, ``cdt`` and ``cdt_no_cdt`` (the ablation with the plain text embeddings T), on
   the pretrained CLIP, and ``zegformer_random_clip`` / ``cdt_random_clip``, the same configs on a
   randomly initialised CLIP (the control: its names carry no meaning).

Every evaluation reports the zero-shot margin: unseen mIoU with the true names minus unseen mIoU
with the unseen names permuted among themselves, averaged over every permutation that leaves no
class its own names (:class:`~ovseg.benchmark.Benchmark`'s ``name_swap_control``). A run whose
``results.json`` matches its command line (config, seed, thread count, and the CLIP it starts from)
is reused, not retrained; ``--retrain`` retrains all or the named runs (and whatever starts from
them); ovseg's own code is not part of that check, so retrain after updating ovseg. Each run is its
own process with ``--threads`` OpenMP threads; the synthetic configs'
:class:`~ovseg.callbacks.ThreadCountInvariance` makes the figures the same for any thread count
(bit for bit on one machine and torch build; another CPU may round differently). ``--jobs`` runs
train side by side (default: as many as the cores allow, at most 2). ``--clip FILE`` starts the
runs on the pretrained CLIP from an open_clip file you already have (another seed's
``runs/demo/clip/open_clip.pt``, say: the mask methods' spread over their own seeds with one CLIP)
instead of training the ``clip`` run; its contents are part of those runs' keys. Ctrl-C or SIGTERM
stops the runs in progress (exit status 130 or 143); finished runs keep their ``results.json`` and
are reused next time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: the summary metrics of the table, in order
COLUMNS = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "zs_margin")
HEADERS = ("mIoU", "seen", "unseen", "hIoU", "zs margin")
#: where the CLIP run writes its open_clip file (relative to the run folder)
CLIP_FILE = "open_clip.pt"


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: folder under the demo root, and the name ``--retrain`` / ``--only`` take.
        label: the method as the table shows it.
        clip: the CLIP it starts from: ``"pretrained"`` (the ``clip`` run's file), ``"random"`` or ``"-"``.
        configs: config files under ``configs/``, merged in order.
        overrides: further command-line overrides.
        clip_options: the options that receive the ``clip`` run's open_clip file: where the CLIP
            run writes it, or where a run on the pretrained CLIP loads it from.
        alternative: ``(attribute, value, label)``: validate the trained model once more with one
            attribute changed (SimZSS's other class embedding), a second table row.
    """

    name: str
    label: str
    clip: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    clip_options: tuple[str, ...] = ()
    alternative: tuple[str, str, str] | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        return ("clip",) if self.clip == "pretrained" else ()


#: where each method's config takes the CLIP file
EXPORT_CLIP = ("--model.init_args.export_path",)
ZEGFORMER_CLIP = (
    "--model.init_args.clip_text.init_args.checkpoint_path",
    "--model.init_args.clip_image.init_args.checkpoint_path",
)
CDT_CLIP = ("--model.init_args.checkpoint_path",)

RUNS: tuple[DemoRun, ...] = (
    DemoRun("clip", "CLIP, dense tokens", "-", ("clip/synthetic.yaml",), clip_options=EXPORT_CLIP),
    DemoRun("zegformer", "ZegFormer", "pretrained", ("zegformer/synthetic.yaml",), clip_options=ZEGFORMER_CLIP),
    DemoRun("zegformer_random_clip", "ZegFormer", "random", ("zegformer/synthetic.yaml", "zegformer/random_clip.yaml")),
    DemoRun("cdt", "CDT (MAFT+)", "pretrained", ("cdt/synthetic.yaml",), clip_options=CDT_CLIP),
    DemoRun("cdt_random_clip", "CDT (MAFT+)", "random", ("cdt/synthetic.yaml", "cdt/random_clip.yaml")),
    DemoRun(
        "cdt_no_cdt",
        "no-CDT ablation",
        "pretrained",
        ("cdt/synthetic.yaml",),
        ("--model.init_args.use_cdt", "false"),
        clip_options=CDT_CLIP,
    ),
    DemoRun(
        "simzss",
        "SimZSS, concept",
        "-",
        ("simzss/synthetic.yaml",),
        alternative=("class_embedding", "eot", "SimZSS, eot"),
    ),
    DemoRun(
        "lit",
        "LiT (lambda 0), eot",
        "-",
        ("simzss/synthetic.yaml",),
        ("--model.init_args.lambda_local", "0", "--model.init_args.class_embedding", "eot"),
        alternative=("class_embedding", "concept", "LiT (lambda 0), concept"),
    ),
)
RUNS_BY_NAME = {run.name: run for run in RUNS}


def fit_arguments(
    run: DemoRun, root: Path, seed: int, extra: Sequence[str] = (), clip: Path | None = None
) -> list[str]:
    """The ``ovseg fit`` command line of ``run`` (without ``fit``); ``extra`` overrides come last.

    ``clip``: the open_clip file the runs on the pretrained CLIP load (default: the ``clip`` run's).
    """
    args: list[str] = []
    for config in run.configs:
        args += ["-c", str(CONFIGS / config)]
    args += ["--seed_everything", str(seed), "--trainer.default_root_dir", str(root / run.name), *run.overrides]
    clip_file = str(clip if clip is not None and run.name != "clip" else root / "clip" / CLIP_FILE)
    for option in run.clip_options:
        args += [option, clip_file]
    return [*args, *extra]


def run_key(
    run: DemoRun, root: Path, seed: int, threads: int, extra: Sequence[str] = (), clip: Path | None = None
) -> dict[str, Any]:
    """What a run's results depend on; a stored result with another key is stale."""
    key: dict[str, Any] = {"args": fit_arguments(run, root, seed, extra, clip), "seed": seed, "threads": threads}
    for config in run.configs:
        key[config] = (CONFIGS / config).read_text()
    for need in run.needs:  # a retrained (or another given) CLIP makes the runs that start from it stale
        if need == "clip" and clip is not None:
            key["clip_sha256"] = hashlib.sha256(clip.read_bytes()).hexdigest()
            continue
        stored = read_results(root / need)
        key[f"{need}_finished"] = stored.get("finished") if stored else None
    return key


def read_results(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def summary(results: dict[str, Any]) -> dict[str, float]:
    """The synthetic benchmark's summary metrics of a run's final validation, as floats."""
    benchmark = next(iter(results))
    return {key: float(value) for key, value in results[benchmark].items() if key != "IoU" and value.ndim == 0}


def validation_images(trainer: Any) -> int:
    """How many images the trainer's validation dataloaders hold (the table's "held-out scenes")."""
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return sum(len(loader.dataset) for loader in loaders)


# ---------------------------------------------------------------------------- one run (child process)
def train_one(
    run: DemoRun, root: Path, seed: int, threads: int, extra: Sequence[str] = (), clip: Path | None = None
) -> None:
    """Fit ``run`` in this process and write its ``results.json`` (called with ``--child``)."""
    import torch

    from ovseg.cli import run as ovseg_run

    torch.set_num_threads(threads)
    key = run_key(run, root, seed, threads, extra, clip)
    start = time.perf_counter()
    cli = ovseg_run(["fit", *fit_arguments(run, root, seed, extra, clip)])
    seconds = time.perf_counter() - start
    if cli is None or not cli.model.last_results:
        raise SystemExit(f"error: the {run.name} run produced no validation results")
    rows = {run.label: summary(cli.model.last_results)}
    if run.alternative is not None:
        attribute, value, label = run.alternative
        setattr(cli.model, attribute, value)
        cli.model.text_cache.invalidate()
        cli.model.print_metrics = False
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        rows[label] = summary(cli.model.last_results)
    record = {
        "key": key,
        "rows": rows,
        "minutes": seconds / 60,
        "threads": threads,
        "scenes": validation_images(cli.trainer),
        "finished": time.time(),
    }
    from ovseg.io import atomic_write_json

    atomic_write_json(root / run.name / "results.json", record, indent=1)


# ---------------------------------------------------------------------------- scheduling (parent)
def default_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def plan(names: Sequence[str] | None, given_clip: bool = False) -> list[DemoRun]:
    """The runs to show: all, or the named ones and the runs they start from; without the ``clip``
    run when ``given_clip`` (``--clip FILE``)."""
    if names:
        unknown = [name for name in names if name not in RUNS_BY_NAME]
        if unknown:
            raise SystemExit(f"error: unknown demo run(s) {unknown}; choose from {list(RUNS_BY_NAME)}")
        if given_clip and "clip" in names:
            raise SystemExit("error: --clip FILE replaces the clip run; leave `clip` out of --only")
        wanted = set(names) | {need for name in names for need in RUNS_BY_NAME[name].needs}
    else:
        wanted = set(RUNS_BY_NAME)
    return [run for run in RUNS if run.name in wanted and not (given_clip and run.name == "clip")]


def execute(
    runs: list[DemoRun],
    root: Path,
    seed: int,
    threads: int,
    jobs: int,
    retrain: set[str],
    extra: Sequence[str] = (),
    clip: Path | None = None,
) -> None:
    """Train what is stale, ``jobs`` processes at a time, respecting each run's ``needs`` (the
    ``clip`` run counts as done when ``clip``, an open_clip file, is given)."""
    console = Console()
    done: set[str] = {"clip"} if clip is not None else set()
    pending = list(runs)
    active: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    retrained: set[str] = set()
    try:
        while pending or active:
            for run in list(pending):
                if len(active) >= jobs:
                    break
                if not all(need in done for need in run.needs):
                    continue
                pending.remove(run)
                stale = run.name in retrain or any(need in retrained for need in run.needs)
                stored = read_results(root / run.name)
                if (
                    not stale
                    and stored is not None
                    and stored.get("key") == run_key(run, root, seed, threads, extra, clip)
                ):
                    reused = root / run.name / "results.json"
                    console.print(f"[dim]{run.name}: reusing {reused} (--retrain {run.name} to train again)")
                    done.add(run.name)
                    continue
                (root / run.name).mkdir(parents=True, exist_ok=True)
                log = open(root / run.name / "log.txt", "w")  # noqa: SIM115 (closed when the process ends)
                command = [sys.executable, "-m", "ovseg.demo", "--child", run.name, "--root", str(root)]
                command += ["--seed", str(seed), "--threads", str(threads)]
                command += ["--clip", str(clip)] if clip is not None else []
                command += ["--", *extra]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
                active[run.name] = (process, time.perf_counter(), log)
                retrained.add(run.name)
                console.print(f"{run.name}: training ({threads} thread(s)), log: {root / run.name / 'log.txt'}")
            if not active and pending:
                raise SystemExit(f"error: cannot schedule {[run.name for run in pending]} (missing runs they need)")
            time.sleep(0.5)
            for name, (process, started, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[name]
                minutes = (time.perf_counter() - started) / 60
                if process.returncode != 0:
                    stop_runs(active)
                    tail = (root / name / "log.txt").read_text(errors="replace").splitlines()[-15:]
                    print("\n".join(tail), file=sys.stderr)
                    raise SystemExit(
                        f"error: the {name} run failed (exit {process.returncode}); its log: {root / name / 'log.txt'}"
                    )
                done.add(name)
                console.print(f"{name}: done in {minutes:.1f} min")
    except (KeyboardInterrupt, Interrupted) as stop:  # Ctrl-C reaches the runs too; SIGTERM only us
        names = ", ".join(active) or "none"
        stop_runs(active)
        print(
            f"\ninterrupted: the run(s) in progress ({names}) stopped; finished runs keep their results.json, "
            "and the next `python -m ovseg.demo` (or `make demo`) reuses them and trains the rest",
            file=sys.stderr,
        )
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        raise SystemExit(128 + signum) from None


class Interrupted(Exception):
    """A termination signal (SIGTERM) received by the demo's scheduling process."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def stop_runs(active: dict[str, tuple[subprocess.Popen, float, Any]]) -> None:
    """Terminate the run processes in ``active`` (killed after 30 s), close their logs, empty it."""
    for process, _, _ in active.values():
        if process.poll() is None:
            process.terminate()
    for process, _, log in active.values():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    active.clear()


#: the table's columns after the run's label
TABLE_HEADERS = ("CLIP", *HEADERS, "minutes", "threads")


def table_rows(runs: list[DemoRun], root: Path) -> list[list[str]]:
    """One row of cells per evaluated model: label, CLIP, summary metrics, minutes, threads."""
    rows = []
    for run in runs:
        stored = read_results(root / run.name)
        assert stored is not None, f"{run.name} has no results.json"
        for label, metrics in stored["rows"].items():
            cells = [f"{metrics[key]:.1f}" if key in metrics else "-" for key in COLUMNS]
            minutes = f"{stored['minutes']:.1f}" if label == run.label else "(same)"
            rows.append([label, run.clip, *cells, minutes, str(stored["threads"])])
    return rows


def table(runs: list[DemoRun], root: Path, seed: int) -> Table:
    """:func:`table_rows` as a rich table for the terminal."""
    scenes = sorted({stored.get("scenes") for run in runs if (stored := read_results(root / run.name))} - {None})
    held_out = f", {scenes[0]} held-out scenes" if len(scenes) == 1 else ""
    result = Table(title=f"synthetic world, seed {seed}: validation mIoU (%){held_out}")
    result.add_column("run")
    for header in TABLE_HEADERS:
        result.add_column(header, justify="left" if header == "CLIP" else "right")
    for row in table_rows(runs, root):
        result.add_row(*row)
    return result


def markdown(runs: list[DemoRun], root: Path, clip: Path | None = None) -> str:
    """:func:`table_rows` as Markdown (written next to the runs, for the README), and the given CLIP."""
    lines = ["| run | " + " | ".join(TABLE_HEADERS) + " |", "|---|---|" + "---:|" * (len(TABLE_HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs, root)]
    lines += [f"\n{given_clip_line(clip)}"] if clip is not None else []
    return "\n".join(lines) + "\n"


def given_clip_line(clip: Path) -> str:
    return f"The runs on the pretrained CLIP started from {clip} (--clip)."


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ovseg.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs trained side by side")
    parser.add_argument("--root", type=Path, default=None, help="default runs/demo (runs/demo/seed-S for S != 0)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"only these runs (of {list(RUNS_BY_NAME)})")
    parser.add_argument("--retrain", nargs="*", metavar="NAME", help="retrain all, or the named runs")
    parser.add_argument(
        "--clip",
        type=Path,
        metavar="FILE",
        help="open_clip file the runs on the pretrained CLIP start from, instead of training the clip run",
    )
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to every run's `ovseg fit`
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = parser.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        raise SystemExit("error: --threads and --jobs must be at least 1")
    root = args.root or Path("runs/demo" if args.seed == 0 else f"runs/demo/seed-{args.seed}")
    clip: Path | None = args.clip.resolve() if args.clip is not None else None
    if clip is not None and not clip.is_file():
        raise SystemExit(
            f"error: --clip {args.clip}: no such file; give an open_clip file (the demo's clip run writes "
            f"runs/demo/clip/{CLIP_FILE}), or leave --clip out to train the CLIP"
        )
    if args.child is not None:
        train_one(RUNS_BY_NAME[args.child], root, args.seed, args.threads, extra, clip)
        return
    runs = plan(args.only, given_clip=clip is not None)
    if args.retrain is None:
        retrain: set[str] = set()
    else:
        retrain = {run.name for run in plan(args.retrain)} if args.retrain else set(RUNS_BY_NAME)
        retrain &= set(args.retrain) if args.retrain else retrain
    start = time.perf_counter()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None  # stop the runs too
    try:
        execute(runs, root, args.seed, args.threads, args.jobs, retrain, extra, clip)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    console = Console(width=None if sys.stdout.isatty() else 120)  # a log file keeps the table whole
    console.print(table(runs, root, args.seed))
    if clip is not None:
        console.print(given_clip_line(clip), soft_wrap=True)
    (root / "results.md").write_text(markdown(runs, root, clip))
    console.print(
        f"wall time {(time.perf_counter() - start) / 60:.1f} min with {args.jobs} job(s) x {args.threads} thread(s); "
        f"table also in {root / 'results.md'}"
    )


if __name__ == "__main__":
    main()
