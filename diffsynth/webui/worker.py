"""``python -m diffsynth.webui.worker OUTPUT [--nproc-per-node N | --input CLIPS]``: the WebUI's background render.

It is ``diffsynth run OUTPUT/config.json [--nproc-per-node N]`` (the same function, so the same stages, cache
keys and resume), or for a batch ``diffsynth run OUTPUT/batch_config.json --input CLIPS`` (each clip into
``OUTPUT/<clip name>/``), plus a record of the outcome in ``OUTPUT/worker.json`` for the page:
``running`` with the pid while it works, then ``finished``, ``cancelled`` or ``failed``
with the exit code (a batch with a failed clip exits 1). SIGTERM (the page's Cancel) stops it
like Ctrl-C does the command.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ..cli import main as cli_main
from .runs import BATCH_CONFIG_FILE, CONFIG_FILE, read_worker_record, write_worker_record


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffsynth.webui.worker", description="the WebUI's background render of an output folder")
    parser.add_argument("output_folder")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--nproc-per-node", type=int, default=None, help="run the render under torch's launcher on N processes")
    how.add_argument("--input", default=None, metavar="CLIPS", help="a folder or glob of clips: render OUTPUT/batch_config.json for each")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # a usage error: argparse printed it
        return int(exc.code or 0)
    out = os.path.abspath(args.output_folder)
    if args.input is not None:
        command = ["run", os.path.join(out, BATCH_CONFIG_FILE), "--input", args.input]
    else:
        command = ["run", os.path.join(out, CONFIG_FILE)]
        if args.nproc_per_node is not None:
            command += ["--nproc-per-node", str(args.nproc_per_node)]  # several processes: diffsynth run's launcher
    signal.signal(signal.SIGTERM, _interrupt)
    record = read_worker_record(out) or {}
    record.update(state="running", pid=os.getpid(), running_since=time.strftime("%Y-%m-%dT%H:%M:%S"))
    record.pop("exit_code", None)
    write_worker_record(out, record)
    code = 1  # what is recorded if cli_main raises (its traceback still goes to the log)
    try:
        code = cli_main(command)
    except KeyboardInterrupt:  # a Cancel that came before the render's own Ctrl-C handling was set up
        code = 130
        print("interrupted before the render started", file=sys.stderr)
    finally:
        record.update(state={0: "finished", 130: "cancelled"}.get(code, "failed"), exit_code=code, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_worker_record(out, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
