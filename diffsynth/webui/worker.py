"""``python -m diffsynth.webui.worker OUTPUT [--nproc-per-node N]``: the WebUI's background render of ``OUTPUT/config.json``.

It is ``diffsynth run OUTPUT/config.json [--nproc-per-node N]`` (the same function, so the same stages, cache
keys and resume) plus a record of the outcome in ``OUTPUT/worker.json`` for the page:
``running`` with the pid while it works, then ``finished``, ``cancelled`` or ``failed``
with the exit code. SIGTERM (the page's Cancel) stops it like Ctrl-C does the command.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from ..cli import main as cli_main
from .runs import CONFIG_FILE, read_worker_record, write_worker_record


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launcher = []
    if len(argv) == 3 and argv[1] == "--nproc-per-node" and argv[2].isdigit():
        launcher = argv[1:]  # several processes: the render runs under torch's launcher (diffsynth run --nproc-per-node)
    elif len(argv) != 1:
        print("usage: python -m diffsynth.webui.worker OUTPUT_FOLDER [--nproc-per-node N]", file=sys.stderr)
        return 2
    out = os.path.abspath(argv[0])
    signal.signal(signal.SIGTERM, _interrupt)
    record = read_worker_record(out) or {}
    record.update(state="running", pid=os.getpid(), running_since=time.strftime("%Y-%m-%dT%H:%M:%S"))
    record.pop("exit_code", None)
    write_worker_record(out, record)
    code = 1  # what is recorded if cli_main raises (its traceback still goes to the log)
    try:
        code = cli_main(["run", os.path.join(out, CONFIG_FILE), *launcher])
    except KeyboardInterrupt:  # a Cancel that came before the render's own Ctrl-C handling was set up
        code = 130
        print("interrupted before the render started", file=sys.stderr)
    finally:
        record.update(state={0: "finished", 130: "cancelled"}.get(code, "failed"), exit_code=code, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_worker_record(out, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
