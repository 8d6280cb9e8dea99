"""The ``ovseg`` console command: a light front door for :mod:`ovseg.cli`.

``ovseg`` and ``ovseg --help`` answer without importing torch or Lightning (the sub-commands
import them when they run). Every run goes through :func:`main`, which turns the ways a run can
end into an exit status and one clear line:

- an error of the user's making (:class:`ovseg.errors.UserError`, a missing or unreadable file),
  also when wrapped by Lightning or jsonargparse: ``ovseg: error: ...`` on stderr, status 2, no
  traceback (``--debug`` or ``OVSEG_DEBUG=1``: the traceback too);
- a training run stopped by SIGTERM or Ctrl-C: which step it reached, the checkpoint saved and
  the command that resumes it, status 128 + the signal's number (143, 130);
- anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from ovseg.errors import USER_ERROR_STATUS, debug_requested, one_line, user_error_in

#: the sub-commands, as ``ovseg --help`` lists them (keep in step with :func:`ovseg.cli.run`)
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (with validation); --ckpt_path last resumes",
    "validate": "evaluate a model or checkpoint on the validation benchmarks",
    "test": "evaluate on the test split",
    "predict": "write label maps",
    "data": "data preparation: make-synthetic, check, make-shards, extract-concepts, cache-features",
    "convert": "turn an official checkpoint (SimZSS, MAFT+, ZegFormer) into an ovseg checkpoint",
    "app": "a local web page (Gradio) that segments uploaded images with a checkpoint",
}

HELP = """usage: ovseg [-h] [--debug] COMMAND ...

ovseg: open-vocabulary semantic segmentation (SimZSS, CDT/MAFT+, ZegFormer).

commands:
{commands}

Choose model and data with -c CONFIG (see configs/) and override any key on the command line:
  ovseg fit -c configs/experiment/smoke.yaml --trainer.max_steps 100
  ovseg fit -c configs/experiment/smoke.yaml --model SimZSS --model.lambda_local 0
  ovseg validate -c configs/experiment/smoke.yaml --ckpt_path runs/smoke/checkpoints/last.ckpt
Methods and DataModules go by short names (--model SimZSS, --data SyntheticDataModule);
`ovseg fit --model.help SimZSS` lists a method's options, `ovseg COMMAND --help` a command's;
data preparation: `ovseg data --help`.

options:
  -h, --help  show this help message and exit
  --debug     show the full traceback of configuration and data errors (also: OVSEG_DEBUG=1)
"""


def top_level_help() -> str:
    width = max(len(name) for name in SUBCOMMANDS) + 2
    return HELP.format(commands="\n".join(f"  {name:<{width}}{text}" for name, text in SUBCOMMANDS.items()))


def _stop_report(error: BaseException) -> tuple[str, int] | None:
    """The message and exit status recorded by :class:`ovseg.callbacks.StopReport` on a run stopped
    by a signal (on the exception, or on the one it caused), if any."""
    current: BaseException | None = error
    for _ in range(4):
        if current is None:
            return None
        report = getattr(current, "ovseg_stop", None)
        if report is not None:
            return report
        current = current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ovseg`` console script and ``python -m ovseg``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [arg for arg in args if arg != "--debug"]
    if not args:  # no command: the help, as an error
        print(top_level_help(), file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    if args[0] in ("-h", "--help"):
        print(top_level_help())
        return
    try:
        if args[0] == "data":  # argparse only: no Lightning import
            from ovseg.prepare.cli import main as data_main

            data_main(args[1:])
            return
        from ovseg.cli import run

        run(args)
    except SystemExit as stop:
        report = _stop_report(stop)
        if report is None:
            raise
        message, status = report
        print(f"ovseg: {message}", file=sys.stderr)
        sys.exit(status)
    except KeyboardInterrupt:
        print("ovseg: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None or debug:
            raise
        print(f"ovseg: error: {one_line(user_error)}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
