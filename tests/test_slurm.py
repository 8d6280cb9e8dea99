"""SLURM: the sbatch template is valid bash and its srun line launches a 2-node x 1-task DDP run
(simulated on this machine with a fake ``srun``: both ranks join one gloo process group and end with
identical weights); SIGUSR1 under SLURM saves ``hpc_ckpt_*.ckpt`` and asks ``scontrol`` to requeue."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts/slurm/ovseg.sbatch"
SMOKE = REPO / "configs/experiment/smoke.yaml"
TIMEOUT_S = 150

SLURMLIB = '''
import hashlib, os, signal
import lightning as L
import torch


class StateHash(L.Callback):
    """Writes world size, rank and a hash of the weights to hash_rank<R>.txt at the end of training."""

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(f"hash_rank{trainer.global_rank}.txt", "w") as f:
            f.write(f"{world} {trainer.world_size} {trainer.global_rank} {trainer.global_step} {digest.hexdigest()}")


class SignalAtStep(L.Callback):
    """Sends SIGUSR1 to this process after optimizer step 2 (as SLURM does before the time limit)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
'''

FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: starts SLURM_NTASKS copies of the command on this machine, one per "node".
pids=()
for ((r = 0; r < SLURM_NTASKS; r++)); do
  SLURM_PROCID=$r SLURM_NODEID=$r SLURM_LOCALID=0 "$@" > "rank$r.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> scontrol_calls.txt
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "LOCAL_RANK", "NODE_RANK"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: the fake srun and its ranks
        process.communicate()
        pytest.fail(f"{cmd[:3]} did not finish within {TIMEOUT_S} s (deadlock?)")
    return subprocess.CompletedProcess(cmd, process.returncode, out, "")


FAST = [
    "--trainer.max_steps",
    "4",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.logger",
    "false",
    "--data.init_args.num_train",
    "32",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.num_val",
    "2",
    "--model.init_args.print_metrics",
    "false",
]


def test_sbatch_template_is_valid_bash_with_one_srun_line():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    srun = [line for line in text.splitlines() if re.match(r"\s*srun\b", line)]
    assert len(srun) == 1, srun
    assert "ovseg fit" in srun[0] and '"$@"' in srun[0]
    assert "--trainer.num_nodes" in srun[0] and "--trainer.devices" in srun[0]
    assert "#SBATCH --signal=SIGUSR1@" in text and "#SBATCH --requeue" in text


def test_readme_multinode_section_quotes_the_template():
    """The README's section shows the template's own srun line and submits files that exist."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Multi-node training") :]
    section = section[: section.index("\n## ", 3)]
    (srun,) = [line for line in SBATCH.read_text().splitlines() if re.match(r"\s*srun\b", line)]
    assert srun.strip() in section
    submitted = re.findall(r"sbatch .*?\\?\n?\s*(scripts/\S+) (configs/\S+)", section)
    assert submitted
    for paths in submitted:
        assert all((REPO / p).is_file() for p in paths), paths
    assert "SIGUSR1" in section and "--ckpt_path last" in section and "hpc_ckpt" in section


def test_two_simulated_nodes_join_one_process_group_and_end_with_identical_weights(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    (tmp_path / "slurmlib.py").write_text(SLURMLIB)
    env = _clean_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        SLURM_JOB_ID="777",
        SLURM_JOB_NAME="ovseg",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_TASKS_PER_NODE="1(x2)",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        SLURM_NODELIST="localhost",
        SLURM_CPUS_PER_TASK="1",
        MASTER_PORT=str(_free_port()),
        GLOO_SOCKET_IFNAME="lo",
    )
    # The sbatch script itself, run with bash: its srun line (with the fake srun) starts the 2 ranks.
    result = _run(
        [
            "bash",
            str(SBATCH),
            str(SMOKE),
            "--trainer.accelerator",
            "cpu",
            "--trainer.strategy",
            "ddp",
            "--trainer.callbacks+=slurmlib.StateHash",
            *FAST,
        ],
        tmp_path,
        env,
    )
    logs = "\n".join(
        f"--- rank{r}\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:]
        for r in range(2)
        if (tmp_path / f"rank{r}.log").exists()
    )
    assert result.returncode == 0, result.stdout[-2000:] + logs
    rows = [(tmp_path / f"hash_rank{r}.txt").read_text().split() for r in range(2)]
    for rank, (world, trainer_world, global_rank, step, _) in enumerate(rows):
        assert (world, trainer_world, global_rank, step) == ("2", "2", str(rank), "4"), rows
    assert rows[0][4] == rows[1][4], "the two ranks ended with different weights"
    assert "MEMBER: 2/2" in logs or "distributed_backend=gloo" in logs


def test_sigusr1_under_slurm_saves_hpc_checkpoint_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    (tmp_path / "slurmlib.py").write_text(SLURMLIB)
    env = _clean_env(
        PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="ovseg",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_NODELIST="localhost",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        MASTER_PORT=str(_free_port()),
    )
    result = _run(
        [
            sys.executable,
            "-m",
            "ovseg",
            "fit",
            "-c",
            str(SMOKE),
            *FAST,
            "--trainer.default_root_dir",
            "hpc",
            "--trainer.callbacks+=slurmlib.SignalAtStep",
        ],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Handling auto-requeue signal" in result.stdout
    (checkpoint,) = (tmp_path / "hpc").glob("hpc_ckpt_*.ckpt")
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", "4242"]
