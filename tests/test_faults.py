"""Faults: a training run killed with SIGKILL and restarted with ``--ckpt_path last`` ends with the
weights of a run that was never interrupted; a save killed half-way never leaves a half-written
``last.ckpt``; wrong inputs (another method's checkpoint, a bad vocabulary, a missing benchmark
root) fail with messages that name the problem."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs/experiment/smoke.yaml"
TIMEOUT_S = 180

# Test-only callbacks, importable by the `ovseg` subprocesses through PYTHONPATH.
FAULTLIB = '''
import os, signal
import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs this process right after optimizer step $OVSEG_KILL_AT_STEP (no cleanup at all)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == int(os.environ["OVSEG_KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
'''

# 8 steps of 8 images (4 steps per epoch), a checkpoint (and last.ckpt) every 4 steps, validation
# every 4 steps; ReseedEveryEpoch makes the resumed run draw the same random numbers.
OVERLAY = """
trainer:
  max_steps: 8
  val_check_interval: 4
  deterministic: true
  enable_progress_bar: false
  logger: false
  default_root_dir: run
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: checkpoints, every_n_train_steps: 4, save_last: true, save_top_k: 0}
    - class_path: ovseg.callbacks.ReseedEveryEpoch
model:
  init_args: {print_metrics: false}
data:
  init_args: {num_train: 32, batch_size: 8, num_val: 2, eval_batch_size: 2}
"""


def _ovseg(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "ovseg", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "faultlib.py").write_text(FAULTLIB)
    (path / "overlay.yaml").write_text(OVERLAY)
    return path


def _fit_args() -> list[str]:
    return ["fit", "-c", str(SMOKE), "-c", "overlay.yaml"]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_sigkill_then_resume_from_last_equals_an_uninterrupted_run(tmp_path):
    # 1) killed after step 6: the last checkpoint is the one of step 4
    killed = _workdir(tmp_path / "killed")
    first = _ovseg(killed, *_fit_args(), "--trainer.callbacks+=faultlib.KillAtStep", env={"OVSEG_KILL_AT_STEP": "6"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    assert not list((killed / "checkpoints").glob(".*tmp*"))  # no save was under way
    # 2) restarted with --ckpt_path last: continues from step 4 to 8
    resumed = _ovseg(killed, *_fit_args(), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    # 3) the same 8 steps without interruption
    straight = _workdir(tmp_path / "straight")
    uninterrupted = _ovseg(straight, *_fit_args())
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    got, want = _weights(last), _weights(straight / "checkpoints" / "last.ckpt")
    assert set(got) == set(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"resumed run differs from the uninterrupted run in {different[:5]}"


KILL_DURING_SAVE = '''
import os, signal, sys
import torch
from ovseg.callbacks import AtomicCheckpointIO

path = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.arange(10)}, path)  # the good, complete file

real_fdopen = os.fdopen


class HalfThenDie:
    """Writes half of the bytes, flushes them to disk, then the process is SIGKILLed."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        data = bytes(data)
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)


os.fdopen = lambda fd, mode: HalfThenDie(real_fdopen(fd, mode))
io.save_checkpoint({"step": 2, "weights": torch.arange(10 ** 6)}, path)
'''


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_intact(tmp_path):
    from ovseg.callbacks import AtomicCheckpointIO

    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    folder = tmp_path / "checkpoints"
    path = folder / "last.ckpt"
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    # the target still holds the complete previous checkpoint ...
    assert torch.load(path, weights_only=False)["step"] == 1
    # ... the partial write lies in a hidden temp file next to it (not matched by `--ckpt_path last`)
    (partial,) = folder.glob(".last.ckpt.tmp-*")
    assert 0 < partial.stat().st_size
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    # the next successful save replaces the file and removes the leftover
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=False)["step"] == 3
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]


def test_configs_use_the_atomic_checkpoint_io(tmp_path, monkeypatch):
    import lightning as L

    from ovseg.callbacks import AtomicCheckpointIO

    for config in sorted((REPO / "configs").rglob("*.yaml")):
        text = config.read_text()
        if "\ntrainer:" in "\n" + text and "ModelCheckpoint" in text:
            assert "ovseg.callbacks.AtomicCheckpointIO" in text, config
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[AtomicCheckpointIO()], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------ bad inputs, clear messages


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ovseg", *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO
    )


def test_missing_benchmark_root_through_the_cli_names_benchmark_and_path(tmp_path, monkeypatch):
    from ovseg.cli import run

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_data"
    # raised when the DataModule is built (jsonargparse wraps it in a ValueError that keeps the text)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        run(
            [
                "validate",
                "-c",
                str(SMOKE),
                "--data",
                str(REPO / "configs/data/eval_synthetic.yaml"),
                "--data.init_args.root",
                str(missing),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger",
                "false",
            ]
        )
    message = str(error.value)
    assert "benchmark 'synthetic'" in message and str(missing) in message and "not found" in message
