"""scripts/diagnostics: the thread-dependence check and the per-class confusions of demo runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ovseg import demo

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "diagnostics"
SMALL_DATA = ["--data.init_args.batch_size", "2", "--data.init_args.image_size", "48", "--data.init_args.num_val", "2"]


def run_script(name: str, *args: str, cwd: Path = REPO) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_thread_dependence_compares_one_step_at_one_and_two_threads():
    """A tiny CDT (random CLIP, timm ConvNeXt trunk): the 1-thread step repeats bit for bit; with the
    config's ThreadCountInvariance, 1 and 2 threads give the same loss and gradients, without it
    some gradients differ (LayerNorms, oneDNN's convolutions)."""
    args = ["-c", "configs/cdt/synthetic.yaml", "-c", "tests/fast/cdt.yaml", *SMALL_DATA]
    out = run_script("thread_dependence.py", *args, "--time", "2")
    assert "ThreadCountInvariance: applied; oneDNN off" in out and "1 thread twice: gradients identical" in out
    losses = re.search(r"loss: (\S+) \(1 thread\), (\S+) \(2 threads\), (\S+) \(1 thread, again\)", out)
    assert losses and losses[1] == losses[2] == losses[3], out
    counts = re.search(r"parameters: (\d+) of (\d+) gradients differ", out)
    assert counts and int(counts[1]) == 0 and int(counts[2]) > 50, out
    assert re.search(r"backward: 0 leaf modules get equal gradients from above", out)
    timed = re.search(
        r"1 thread: (\S+) s per training step \(forward, backward, mean of 2 after one warm-up; oneDNN off", out
    )
    assert timed and 0 < float(timed[1]) < 60, out

    out = run_script("thread_dependence.py", *args, "--without-invariance")
    assert "ThreadCountInvariance: left out; oneDNN on" in out and "1 thread twice: gradients identical" in out
    counts = re.search(r"parameters: (\d+) of (\d+) gradients differ", out)
    assert counts and 0 < int(counts[1]) <= int(counts[2]), out
    kinds = re.search(
        r"backward: (\d+) leaf modules get equal gradients from above and pass on different ones: (.*)", out
    )
    assert kinds and int(kinds[1]) > 0 and "LayerNorm" in kinds[2], out


def test_confusions_rebuilds_a_demo_run_and_matches_its_validation(tmp_path, monkeypatch):
    """The demo's fast CLIP run, then its confusions on the same scenes it validated on: the seen
    and unseen mIoU equal the ones the run stored, and every class's row is printed."""
    monkeypatch.chdir(tmp_path)
    fast = ["-c", str(REPO / "tests/fast/clip.yaml"), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    fast += ["--data.init_args.num_val", "4", "--data.init_args.batch_size", "4", "--data.init_args.image_size", "32"]
    demo.main(["--root", str(tmp_path / "demo"), "--only", "clip", "--", *fast])
    stored = json.loads((tmp_path / "demo/clip/results.json").read_text())["rows"]["CLIP, dense tokens"]
    out = run_script(
        "confusions.py",
        *(str(tmp_path / "demo/clip"), "--scenes", "4", "--classes", "car", "kite", "--name-permutations"),
        cwd=tmp_path,
    )
    figures = re.search(r"seen (\S+), unseen (\S+) mIoU \(4 scenes\)", out)
    expected = (round(stored["mIoU_seen"], 1), round(stored["mIoU_unseen"], 1))
    assert figures and (float(figures[1]), float(figures[2])) == expected, out
    assert "car pixels labelled:" in out and "kite pixels labelled:" in out
    iou_line = out.splitlines()[1]
    assert iou_line.startswith("  IoU: sky ") and "KITE" in iou_line and "kite" not in iou_line  # unseen: capitals
    # the renamed confusion matrix's cyclic shift equalled the name-swapped pass (else exit 1), the
    # true names' figure is the unseen mIoU the run stored, and the control the run's margin's
    namings = re.search(r"unseen names permuted: true names (\S+);.*mean over all 24 namings .*rank (\d+) of 24", out)
    assert namings and float(namings[1]) == expected[1] and 1 <= int(namings[2]) <= 24, out
    control = re.search(r"the benchmark's control (-?[\d.]+)", out)
    assert control and abs(float(control[1]) - (stored["mIoU_unseen"] - stored["zs_margin"])) < 0.051, out


def test_name_permutations_equal_relabelled_predictions():
    """Renaming the unseen classes on the confusion matrix gives what relabelling every predicted
    pixel and counting again gives (an independent computation), for all 24 namings of 4 classes."""
    import itertools

    import torch

    from ovseg.metrics import confusion_matrix, metrics_from_confusion

    sys.path.insert(0, str(SCRIPTS))
    try:
        from confusions import renamed_confusion, unseen_miou_of_namings
    finally:
        sys.path.remove(str(SCRIPTS))
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 7, (3, 20, 20), generator=generator)
    prediction = torch.where(
        torch.rand(label.shape, generator=generator) < 0.6, label, torch.randint(0, 7, label.shape)
    )
    unseen = [2, 4, 5, 6]
    confusion = confusion_matrix(prediction, label, 7, 255)
    namings = unseen_miou_of_namings(confusion, unseen, "zero")
    assert len(namings) == 24 and len(set(namings.values())) > 1
    for names_of in itertools.permutations(unseen):
        # class unseen[i] carries the names of class names_of[i]: pixels labelled names_of[i] become unseen[i]
        relabel = torch.arange(7)
        relabel[list(names_of)] = torch.tensor(unseen)
        direct = confusion_matrix(relabel[prediction], label, 7, 255)
        assert torch.equal(renamed_confusion(confusion, unseen, names_of), direct)
        assert namings[names_of] == float(metrics_from_confusion(direct, "zero", unseen)["mIoU_unseen"])
    assert namings[tuple(unseen)] == float(metrics_from_confusion(confusion, "zero", unseen)["mIoU_unseen"])
