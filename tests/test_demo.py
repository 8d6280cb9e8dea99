"""``make demo`` (ovseg.demo): which runs it trains, how they start from the pretrained CLIP, reuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovseg import demo
from ovseg.demo import RUNS, RUNS_BY_NAME, fit_arguments, plan, run_key

REPO = Path(__file__).resolve().parents[1]


def test_every_method_with_pretrained_and_random_clip_and_the_cdt_ablation():
    shown = {(run.label, run.clip) for run in RUNS}
    assert {("ZegFormer", "pretrained"), ("ZegFormer", "random")} <= shown
    assert {("CDT (MAFT+)", "pretrained"), ("CDT (MAFT+)", "random"), ("no-CDT ablation", "pretrained")} <= shown
    assert {"clip", "simzss", "lit"} <= set(RUNS_BY_NAME)
    # the runs that start from the pretrained CLIP are scheduled after it
    order = [run.name for run in RUNS]
    assert all(order.index("clip") < order.index(run.name) for run in RUNS if run.needs)


def test_pretrained_runs_load_the_clip_runs_file_and_random_ones_do_not(tmp_path):
    clip_file = str(tmp_path / "clip" / "open_clip.pt")
    clip_args = fit_arguments(RUNS_BY_NAME["clip"], tmp_path, 0)
    assert clip_args[clip_args.index("--model.init_args.export_path") + 1] == clip_file
    for name in ("zegformer", "cdt", "cdt_no_cdt"):
        args = fit_arguments(RUNS_BY_NAME[name], tmp_path, 3)
        assert args.count(clip_file) == (2 if name == "zegformer" else 1)  # zegformer: text and image towers
        assert args[args.index("--seed_everything") + 1] == "3"
    for name in ("zegformer_random_clip", "cdt_random_clip"):
        args = fit_arguments(RUNS_BY_NAME[name], tmp_path, 0)
        assert clip_file not in args and args[3].endswith("random_clip.yaml")
    assert fit_arguments(RUNS_BY_NAME["cdt_no_cdt"], tmp_path, 0, ["--x", "1"])[-2:] == ["--x", "1"]


def test_plan_adds_what_a_run_starts_from_and_refuses_unknown_names():
    assert [run.name for run in plan(["cdt"])] == ["clip", "cdt"]
    assert [run.name for run in plan(None)] == [run.name for run in RUNS]
    with pytest.raises(SystemExit, match=r"unknown demo run\(s\) \['cdt_plus'\]"):
        plan(["cdt_plus"])


def test_a_retrained_clip_makes_the_runs_that_start_from_it_stale(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "results.json").write_text(json.dumps({"finished": 1.0}))
    cdt, lit = RUNS_BY_NAME["cdt"], RUNS_BY_NAME["lit"]
    before = run_key(cdt, tmp_path, 0, 1), run_key(lit, tmp_path, 0, 1)
    (tmp_path / "clip" / "results.json").write_text(json.dumps({"finished": 2.0}))
    assert run_key(cdt, tmp_path, 0, 1) != before[0]
    assert run_key(lit, tmp_path, 0, 1) == before[1]  # LiT does not use the CLIP
    assert run_key(lit, tmp_path, 0, 2) != before[1]  # the thread count is part of the key
    assert run_key(lit, tmp_path, 1, 1) != before[1]


def test_a_given_clip_file_replaces_the_clip_run(tmp_path):
    clip = tmp_path / "release" / "open_clip.pt"
    clip.parent.mkdir()
    clip.write_bytes(b"weights v1")
    assert [run.name for run in plan(["cdt"], given_clip=True)] == ["cdt"]
    assert "clip" not in [run.name for run in plan(None, given_clip=True)]
    with pytest.raises(SystemExit, match="--clip FILE replaces the clip run"):
        plan(["clip", "cdt"], given_clip=True)
    for name in ("zegformer", "cdt"):
        args = fit_arguments(RUNS_BY_NAME[name], tmp_path / "demo", 1, clip=clip)
        assert args.count(str(clip)) == (2 if name == "zegformer" else 1)
        assert str(tmp_path / "demo" / "clip" / "open_clip.pt") not in args
    # the file's contents, not the clip run's results.json, decide whether a run is stale
    key = run_key(RUNS_BY_NAME["cdt"], tmp_path / "demo", 1, 1, clip=clip)
    (tmp_path / "demo" / "clip").mkdir(parents=True)
    (tmp_path / "demo" / "clip" / "results.json").write_text(json.dumps({"finished": 5.0}))
    assert run_key(RUNS_BY_NAME["cdt"], tmp_path / "demo", 1, 1, clip=clip) == key
    clip.write_bytes(b"weights v2")
    assert run_key(RUNS_BY_NAME["cdt"], tmp_path / "demo", 1, 1, clip=clip) != key
    with pytest.raises(SystemExit, match=r"--clip .*nowhere\.pt: no such file"):
        demo.main(["--clip", str(tmp_path / "nowhere.pt"), "--only", "cdt"])


def test_the_demo_with_a_given_clip_trains_only_the_runs_on_it(tmp_path, monkeypatch, capsys):
    """The scheduler (its processes faked): no clip run, the child is told the file, the table
    names it, a second call reuses the result and a changed file retrains."""
    clip = tmp_path / "open_clip.pt"
    clip.write_bytes(b"weights v1")
    root = tmp_path / "demo"
    commands: list[list[str]] = []

    class FinishedRun:  # the child's work, done at once: write results.json as train_one would
        returncode = 0

        def __init__(self, command: list[str], **kwargs: object) -> None:
            commands.append(command)
            run = RUNS_BY_NAME[command[command.index("--child") + 1]]
            given = Path(command[command.index("--clip") + 1])
            metrics = {"mIoU": 50.0, "mIoU_seen": 60.0, "mIoU_unseen": 40.0, "hIoU": 48.0, "zs_margin": 30.0}
            record = {"key": run_key(run, root, 1, 1, clip=given), "rows": {run.label: metrics}, "minutes": 0.1}
            (root / run.name / "results.json").write_text(json.dumps({**record, "threads": 1, "scenes": 4}))

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", FinishedRun)
    argv = ["--seed", "1", "--root", str(root), "--only", "cdt", "--clip", str(clip)]
    demo.main(argv)
    out = capsys.readouterr().out
    assert len(commands) == 1 and "clip" not in [c[c.index("--child") + 1] for c in commands]
    assert commands[0][commands[0].index("--clip") + 1] == str(clip.resolve())
    assert f"pretrained CLIP started from {clip.resolve()} (--clip)" in out and "60.0" in out
    assert f"from {clip.resolve()}" in (root / "results.md").read_text()
    assert not (root / "clip").exists()
    demo.main(argv)
    assert "cdt: reusing" in capsys.readouterr().out and len(commands) == 1
    clip.write_bytes(b"weights v2")
    demo.main(argv)
    assert "cdt: training" in capsys.readouterr().out and len(commands) == 2


def test_trains_once_then_reuses_and_retrains_on_request(tmp_path, monkeypatch, capsys):
    """The CLIP run with the fast-mode overlay, twice: the second call reuses results.json; the
    table shows the run's metrics, the exported open_clip file exists."""
    monkeypatch.chdir(tmp_path)
    fast = ["-c", str(REPO / "tests/fast/clip.yaml"), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    fast += ["--data.init_args.num_val", "4", "--data.init_args.batch_size", "4", "--data.init_args.image_size", "32"]
    argv = ["--root", str(tmp_path / "demo"), "--only", "clip", "--", *fast]
    demo.main(argv)
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "demo/clip/results.json").read_text())
    assert "clip: training (1 thread(s))" in out and "clip: done" in out
    assert (tmp_path / "demo/clip/open_clip.pt").is_file()
    assert record["threads"] == 1 and record["key"]["args"][-len(fast) :] == fast
    assert record["scenes"] == 4 and "4 held-out scenes" in out
    row = record["rows"]["CLIP, dense tokens"]
    assert {"mIoU", "mIoU_seen", "mIoU_unseen", "zs_margin"} <= row.keys()
    assert f"{row['mIoU']:.1f}" in out and f"{row['mIoU']:.1f}" in (tmp_path / "demo/results.md").read_text()
    demo.main(argv)
    assert "clip: reusing" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo/clip/results.json").read_text())["finished"] == record["finished"]
    demo.main(["--retrain", "clip", *argv])
    assert "clip: training" in capsys.readouterr().out


def test_a_failed_run_stops_the_demo_with_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"the clip run failed \(exit [1-9]\d*\); its log: .*clip/log\.txt"):
        demo.main(["--root", str(tmp_path / "demo"), "--only", "clip", "--", "--trainer.no_such_option", "1"])
    assert sys.executable  # the child ran with this interpreter


def demo_processes(root: Path) -> list[int]:
    """Pids of live processes whose command line names ``root`` (the demo and its runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(root) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                if (entry / "stat").read_text().split()[2] != "Z":  # not a zombie
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_runs_and_exits_with_one_message(tmp_path, stop):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the demo
    alone, while a run trains: the demo stops the run too, names it, exits 130 / 143 without a
    traceback, and leaves no results.json and no process behind."""
    fast = ["-c", str(REPO / "tests/fast/clip.yaml"), "--trainer.max_steps", "100000"]
    fast += ["--data.init_args.num_val", "4", "--data.init_args.batch_size", "4", "--data.init_args.image_size", "32"]
    command = [sys.executable, "-m", "ovseg.demo", "--root", str(tmp_path / "demo"), "--only", "clip", "--", *fast]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a background job of a non-interactive shell (nohup ... &, some CI
        # runners) inherits SIGINT ignored, and then Python never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        check_stopped(process, tmp_path, stop)
    finally:  # never leave a training demo behind, whatever failed
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check_stopped(process: subprocess.Popen, tmp_path, stop: str) -> None:
    log = tmp_path / "demo/clip/log.txt"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "Seed set" in log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.2)  # until the run has started
    assert log.is_file(), "the clip run did not start"
    time.sleep(2)
    if stop == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == (130 if stop == "ctrl-c" else 143), err
    assert "interrupted: the run(s) in progress (clip) stopped" in err
    assert "Traceback" not in err
    assert not (tmp_path / "demo/clip/results.json").exists()
    assert demo_processes(tmp_path / "demo") == []
