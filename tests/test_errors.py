"""Issue 18, through the ``ovseg`` command: errors of the user's making end in one line naming the file
or key (status 2, no traceback unless ``--debug``/``OVSEG_DEBUG``), a run stopped by a signal is not
reported as finished, ``--ckpt_path last`` with nothing to resume is an error, bad checkpoint files are
named, options are exact, each run owns its outputs, the terminal is quiet and the CLI discoverable.

Subprocesses where the process itself matters (exit status, traceback, signals, start-up time); the
other checks call :func:`ovseg.command.main`, the console script's function, in this process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ovseg.command import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs/experiment/smoke.yaml")
TINY = [
    "--data.init_args.num_train",
    "8",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.num_val",
    "2",
    "--data.init_args.eval_batch_size",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]

SIGNALLIB = '''
import os, signal
import lightning as L


class TermAtStep(L.Callback):
    """Sends SIGTERM to this process after optimizer step 3 (as a scheduler or `kill` does)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
'''


def ovseg(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "ovseg", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=180
    )


def exits(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``ovseg ARGS`` run in this process."""
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out, err = capsys.readouterr()
    code = stop.value.code
    if isinstance(code, str):  # sys.exit(MESSAGE): Python prints MESSAGE to stderr and exits with 1
        return 1, out, err + code + "\n"
    return (0 if code is None else code), out, err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    """Status 2 and one ``ovseg: error:`` line naming ``names`` (no traceback: checked in subprocesses,
    where no test harness writes its own)."""
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("ovseg: error: ")]
    assert len(lines) == 1, err[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ 2, 11: a signal, a quiet terminal


def test_sigterm_saves_reports_and_exits_143_then_resumes_and_validates_with_the_real_step(tmp_path, capsys):
    (tmp_path / "signallib.py").write_text(SIGNALLIB)
    fit = [
        "fit",
        "-c",
        SMOKE,
        *TINY[:-2],
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "6",
        "--trainer.default_root_dir",
        "run",
    ]
    stopped = ovseg(tmp_path, *fit, "--trainer.callbacks+=signallib.TermAtStep")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 3
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("ovseg: ")]
    assert "stopped by SIGTERM at step 3 of 6, not finished" in line and str(checkpoint) in line
    assert line.endswith("--ckpt_path last") and "Traceback" not in stopped.stderr
    # 11: none of Lightning's noise, and a truthful progress bar (the run had one)
    terminal = stopped.stdout + stopped.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "litlogger", "LeafSpec", "in eval mode", "Epoch 0/-2"):
        assert noise not in terminal, noise
    assert "Epoch 1 " in terminal  # step 3 of 2-batch epochs

    # resuming finishes the run (exit 0 from main: no SystemExit)
    main([*fit, "--ckpt_path", "last"])
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 6
    capsys.readouterr()
    # 11: validate titles the table with the checkpoint's step and prints only ovseg's table
    main(["validate", "-c", SMOKE, *TINY, "--trainer.logger", "false", "--ckpt_path", str(checkpoint)])
    out = capsys.readouterr().out
    assert "val metrics (%), epoch 3, step 6" in out  # 2 batches per epoch
    assert "Validate metric" not in out and out.count("┃ benchmark ┃") == 1, out  # one table


# ------------------------------------------------------------------ 3, 9: resuming and run folders


def test_ckpt_path_last_needs_a_checkpoint_and_each_run_owns_its_folder(tmp_path, capsys):
    one_step = ["fit", "-c", SMOKE, *TINY, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    code, _, err = exits(capsys, *one_step, "--trainer.default_root_dir", "wrong", "--ckpt_path", "last")
    assert_one_line_error(code, err, "--ckpt_path last", str(Path("wrong") / "checkpoints"), "--allow_fresh_start")
    assert not (tmp_path / "wrong/checkpoints").exists()
    code, _, err = exits(
        capsys, "validate", *one_step[1:3], *TINY, "--trainer.default_root_dir", "wrong", "--ckpt_path", "last"
    )
    assert_one_line_error(code, err, "--ckpt_path last: no checkpoint found", str(Path("wrong") / "checkpoints"))

    main([*one_step, "--trainer.default_root_dir", "a", "--ckpt_path", "last", "--allow_fresh_start", "true"])
    assert "starting from scratch" in capsys.readouterr().err
    main([*one_step, "--trainer.default_root_dir", "a"])  # the same command again: replaces last.ckpt
    assert "a/checkpoints/last.ckpt is from an earlier run; this run replaces it" in capsys.readouterr().err
    main([*one_step, "--trainer.default_root_dir", "b"])
    for run in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == ["last.ckpt"]
        assert (tmp_path / run / "lightning_logs").is_dir()
    assert not (tmp_path / "runs").exists()  # nothing where the config's own default_root_dir points
    assert len(list((tmp_path / "a/lightning_logs").iterdir())) == 2  # one log version per run


# ------------------------------------------------------------------ 4: checkpoint files


def test_bad_checkpoint_files_are_named(tmp_path, capsys):
    empty, noise, missing = tmp_path / "empty.ckpt", tmp_path / "noise.ckpt", tmp_path / "missing.ckpt"
    empty.write_bytes(b"")
    noise.write_bytes(os.urandom(4096))
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0, "global_step": 1}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    validate = ["validate", "-c", SMOKE, *TINY, "--trainer.logger", "false", "--ckpt_path"]
    for path, words in (
        (empty, "is empty (0 bytes)"),
        (noise, "is not an ovseg/Lightning checkpoint"),
        (truncated, "is truncated"),
        (missing, "no such checkpoint file"),
    ):
        code, _, err = exits(capsys, *validate, str(path))
        assert_one_line_error(code, err, str(path), words)


# ------------------------------------------------------------------ 5: one line, no traceback


def _eval_config(tmp_path: Path, names: str, num_classes: int | None = None) -> Path:
    (tmp_path / "names.txt").write_text(names)
    count = "" if num_classes is None else f", num_classes: {num_classes}"
    config = tmp_path / "eval.yaml"
    config.write_text(
        "class_path: ovseg.datamodules.benchmarks.EvaluationDataModule\n"
        f"init_args:\n  root: {tmp_path}\n  benchmarks:\n"
        f"    - {{name: mine, data_root: ., class_names: {tmp_path / 'names.txt'}{count}}}\n"
    )
    return config


def test_user_errors_are_one_line_without_traceback_unless_debug(tmp_path, capsys):
    config = _eval_config(tmp_path, "\n\n")
    args = ["validate", "-c", SMOKE, "--trainer.logger", "false", "--data", str(config)]
    plain = ovseg(tmp_path, *args)
    assert_one_line_error(plain.returncode, plain.stderr, str(tmp_path / "names.txt"), "the vocabulary is empty")
    assert "Traceback" not in plain.stderr
    assert len(plain.stderr.splitlines()) <= 3, plain.stderr
    with pytest.raises(ValueError, match="the vocabulary is empty"):  # --debug: the raw exception and its traceback
        main([*args, "--debug"])
    (tmp_path / "no_nltk_data").mkdir()
    no_tagger = ovseg(
        tmp_path,
        "fit",
        "-c",
        SMOKE,
        *TINY,
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
        env={"NLTK_DATA": str(tmp_path / "no_nltk_data")},
    )
    assert_one_line_error(no_tagger.returncode, no_tagger.stderr, "averaged_perceptron_tagger_eng", "NLTK_DATA")
    assert "Traceback" not in no_tagger.stderr

    for names, count, words in (
        ("sky\ngrass\nsky\n", None, "duplicated class name 'sky' in classes 0 and 2"),
        ("sky\ngrass\n", 3, "has 2 classes, expected 3"),
    ):
        code, _, err = exits(capsys, *args[:-1], str(_eval_config(tmp_path, names, count)))
        assert_one_line_error(code, err, "benchmark 'mine'", str(tmp_path / "names.txt"), words)
    code, _, err = exits(
        capsys,
        *args[:-1],
        str(REPO / "configs/data/eval_synthetic.yaml"),
        "--data.init_args.root",
        str(tmp_path / "nope"),
    )
    assert_one_line_error(code, err, str(tmp_path / "nope"))


def test_encoder_weight_files_and_hub_names_that_do_not_fit_are_one_line(tmp_path, capsys):
    """A weight file of another architecture, and a Hub model that is not there, are the user's to fix."""
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "wrong_vit.pth")
    code, _, err = exits(
        capsys,
        "validate",
        "-c",
        SMOKE,
        "--trainer.logger",
        "false",
        "--model.init_args.image_encoder.init_args.checkpoint_path",
        str(tmp_path / "wrong_vit.pth"),
    )
    assert_one_line_error(code, err, "wrong_vit.pth")
    code, _, err = exits(capsys, "validate", "-c", SMOKE, "--ckpt_path", f"hf://{tmp_path}/absent_model")
    assert code == 2 and "absent_model" in err and "Traceback" not in err


# ------------------------------------------------------------------ 7, 12: exact options, short names, help


def test_help_is_fast_and_lists_commands_methods_and_datamodules(tmp_path, capsys):
    start = time.perf_counter()
    top = ovseg(tmp_path, "--help")
    seconds = time.perf_counter() - start
    assert top.returncode == 0 and seconds < 2.0, seconds
    for command in ("fit", "validate", "test", "predict", "data"):
        assert f"\n  {command} " in top.stdout, command
    assert "--model SimZSS" in top.stdout
    bare = ovseg(tmp_path)  # no command: the same help, as an error
    assert bare.returncode == 2 and "commands:" in bare.stderr

    # 11: progress bars stay off when the output is not a terminal (no lines run together by "\r")
    made = ovseg(
        tmp_path, "data", "make-synthetic", "--format", "mmseg", "--out", "m", "--num-images", "3", "--image-size", "32"
    )
    assert made.returncode == 0 and "\r" not in made.stderr + made.stdout, made.stderr[-500:]
    assert len(list((tmp_path / "m").rglob("*.png"))) == 3

    code, out, _ = exits(capsys, "fit", "--help")
    assert code == 0
    for name in ("SimZSS", "CDT", "ZegFormer", "SyntheticDataModule", "EvaluationDataModule", "CocoCaptionsDataModule"):
        assert name in out, name
    code, out, _ = exits(capsys, "fit", "--model.help", "SimZSS")
    assert code == 0 and "--model.lambda_local" in out


def test_short_class_names_and_exact_option_names(tmp_path, capsys):
    code, out, _ = exits(
        capsys,
        "fit",
        "-c",
        SMOKE,
        "--model",
        "SimZSS",
        "--model.lambda_local",
        "0.5",
        "--data",
        "SyntheticDataModule",
        "--print_config",
    )
    assert code == 0
    assert "class_path: ovseg.methods.simzss.SimZSS" in out and "lambda_local: 0.5" in out
    code, _, err = exits(capsys, "fit", "-c", SMOKE, "--trainer.max_step", "20", "--print_config")
    assert code == 2 and "--trainer.max_step" in err
    # 8: a negative batch size stops at the command line, named, not in torch's sampler
    code, _, err = exits(capsys, "fit", "-c", SMOKE, "--data.init_args.batch_size", "-4")
    assert_one_line_error(code, err, "--data.init_args.batch_size must be at least 1, got -4")


# ------------------------------------------------------------------ 10: CI and make stop at once


def test_ci_run_and_make_test_stop_when_the_nltk_data_is_missing(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci/run", repo / ".ci/run")
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    ci = subprocess.run(["bash", str(repo / ".ci/run")], capture_output=True, text=True, timeout=60)
    assert ci.returncode == 1
    assert ci.stderr.strip().splitlines() == [
        f".ci/run: error: {repo}/../shared/nltk_data does not exist (NLTK's tagger for the tests); put the shared "
        "folder next to the repository or set NLTK_DATA and run make test"
    ]
    made = subprocess.run(
        ["make", "-C", str(repo), "test", f"NLTK_DATA={tmp_path}/none"], capture_output=True, text=True, timeout=60
    )
    assert made.returncode != 0 and f"NLTK_DATA={tmp_path}/none does not exist" in made.stderr
    assert not (repo / ".venv").exists()  # stopped before installing anything


def test_make_install_stops_before_pip_when_the_disk_is_too_full(tmp_path):
    """MIN_FREE_GB above any disk's free space plays a full disk: one message, no venv started."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    (repo / "pyproject.toml").write_text("")
    made = subprocess.run(
        ["make", "-C", str(repo), "install", "MIN_FREE_GB=1000000"], capture_output=True, text=True, timeout=60
    )
    assert made.returncode != 0
    assert f"make: error: {repo}/ has " in made.stderr and "the venv needs about 6.2 GB" in made.stderr
    assert not (repo / ".venv").exists()


# ------------------------------------------------------------------ 8: the progress bar after a resume


def test_progress_bar_counts_the_epoch_not_the_remaining_steps():
    """Resumed at step 30 of 44 in epoch 0 (32 batches per epoch, limited by max_steps): Lightning's
    bar shows ``30/14``; ovseg's counts the epoch's batches, cut at the step limit, and drops ``/-2``."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from ovseg.callbacks import OVSegProgressBar

    def trainer(ready: int, step: int):
        progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
        return SimpleNamespace(
            num_training_batches=32,
            max_epochs=-1,
            max_steps=44,
            global_step=step,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        )

    lightning_bar, bar = RichProgressBar(), OVSegProgressBar()
    for progress_bar in (lightning_bar, bar):
        progress_bar._trainer = trainer(ready=30, step=30)
    assert lightning_bar.total_train_batches == 14  # the defect: 30 batches done of "14"
    assert bar.total_train_batches == 32
    bar._trainer = trainer(ready=0, step=32)  # epoch 1: 12 steps left
    assert bar.total_train_batches == 12
    assert bar._get_train_description(1).strip() == "Epoch 1"
    assert lightning_bar._get_train_description(0).strip() == "Epoch 0/-2"


# ------------------------------------------------------------------ 6: data check = validate's checks


def test_data_check_rejects_what_validate_rejects_and_reports_orphans(tmp_path, capsys):
    from ovseg.datamodules.synthetic import SyntheticWorld
    from ovseg.prepare.synthetic import write_mmseg

    root = tmp_path / "data/synthetic_mmseg"
    write_mmseg(SyntheticWorld(image_size=(32, 40), seed=1), root, num_images=2, progress=False)
    labels = sorted((root / "annotations/validation").glob("*.png"))
    orphan = labels[0].with_name("copied_without_image.png")
    orphan.write_bytes(labels[0].read_bytes())
    config = tmp_path / "eval.yaml"
    config.write_text(
        "class_path: ovseg.datamodules.benchmarks.EvaluationDataModule\n"
        f"init_args:\n  root: {tmp_path / 'data'}\n  benchmarks:\n"
        "    - {name: synthetic, data_root: synthetic_mmseg, class_names: class_names.txt, "
        "unseen_classes: [sky, giraffe]}\n"
    )
    code, out, _ = exits(capsys, "data", "check", "--data", str(config), "--no-progress")
    assert code == 1
    assert "unseen_classes names ['giraffe'], which are not in its class names" in out
    assert f"orphan label {orphan}: no matching image" in out and "no problems found" not in out
    code, _, err = exits(capsys, "validate", "-c", SMOKE, "--trainer.logger", "false", "--data", str(config))
    assert_one_line_error(code, err, "benchmark 'synthetic'", "unseen_classes names ['giraffe']")


# ------------------------------------------------------------------ 1, 8: unfinished and corrupt feature stores


def test_unfinished_feature_store_is_refused_before_the_first_step_unless_allowed(tmp_path, capsys, caplog):
    import yaml

    from ovseg.datamodules.synthetic import SyntheticDataModule
    from ovseg.encoders import TimmViT
    from ovseg.prepare.feature_cache import CacheViews, build_feature_cache

    fast = yaml.safe_load((REPO / "tests/fast/simzss.yaml").read_text())["model"]["init_args"]["image_encoder"]
    dataset = SyntheticDataModule(num_train=8, image_size=56).train_dataset()

    def build(**options):
        torch.manual_seed(0)  # the same random backbone each time (the store checks its fingerprint)
        return build_feature_cache(
            TimmViT(**fast["init_args"]),
            dataset,
            tmp_path / "store",
            CacheViews("center", 56),
            batch_size=4,
            device="cpu",
            progress=False,
            **options,
        )

    store = build(max_batches=1)  # as if killed after its first batch
    fit = [
        "fit",
        "-c",
        str(REPO / "configs/simzss/coco_vitb14_cached.yaml"),
        "-c",
        str(REPO / "tests/fast/simzss.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
        "--data.init_args.store",
        str(store),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.eval_data",
        "null",
    ]
    code, _, err = exits(capsys, *fit)
    assert_one_line_error(
        code,
        err,
        f"feature store {store} is unfinished: 4 of 8 images cached",
        "--views center and --size 56",
        "--data.init_args.allow_partial true",
    )
    main([*fit, "--data.init_args.allow_partial", "true"])  # trains on the 4 finished images
    assert "training on the finished part of the unfinished feature store" in caplog.text
    capsys.readouterr()
    build()  # the same command again finishes the store, saying so
    assert f"resuming the feature store {store}: 4 of 8 images already cached" in caplog.text
    main(fit)

    (store / "index.json").write_text('{"num_done": 4, "num_ima')
    code, _, err = exits(capsys, *fit)
    assert_one_line_error(code, err, f"feature store index {store / 'index.json'} is corrupt")


# ------------------------------------------------------------------ 8: captions: a missing key, cut captions


def test_caption_files_missing_keys_and_cut_captions_are_named_and_counted(tmp_path, capsys, caplog):
    import json

    from ovseg.prepare.synthetic import make_synthetic

    root = make_synthetic("coco", tmp_path / "coco", num_images=2, image_size=32, progress=False)
    annotations = root / "annotations/captions_train2017.json"
    doc = json.loads(annotations.read_text())
    doc["annotations"][0]["caption"] = " ".join(["a red ball on the green grass next to the sea"] * 12)  # > 77 tokens
    annotations.write_text(json.dumps(doc))
    main(["data", "extract-concepts", "--coco", str(annotations), "--no-progress"])
    total = len(doc["annotations"])
    assert f"1 of {total} captions are longer than the text context (77 tokens) and were cut" in caplog.text

    del doc["annotations"][1]["caption"]
    annotations.write_text(json.dumps(doc))
    code, _, err = exits(capsys, "data", "extract-concepts", "--coco", str(annotations), "--no-progress")
    assert code != 0
    assert f"{annotations}: annotation {doc['annotations'][1]['id']!r}" in err and "has no 'caption' key" in err


def test_a_synthetic_mask_config_without_its_clip_file_says_how_to_make_it(capsys):
    """configs/cdt/synthetic.yaml starts from runs/clip_synthetic/open_clip.pt: before the CLIP
    config has run, fit ends in one line naming the file and the command that writes it."""
    code, _, err = exits(capsys, "fit", "-c", str(REPO / "configs" / "cdt" / "synthetic.yaml"))
    assert_one_line_error(
        code, err, "runs/clip_synthetic/open_clip.pt does not exist", "ovseg fit -c configs/clip/synthetic.yaml"
    )
