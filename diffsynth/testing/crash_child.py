"""A runner process that kills itself at a chosen point: the child of the crash tests and ``bench/resume.py``.

``python -m diffsynth.testing.crash_child CONFIG.json [options]`` runs
``SDVideoPipelineRunner`` on the config (a JSON file) like ``diffsynth run`` would, and

* ``--kill-at-event STAGE:N`` sends itself SIGKILL at the N-th progress event (1-based)
  of stage STAGE in this process (event stages are ``"<id> <name>"``; the first event
  of a stage is the one that announces it, before any of its work);
* ``--kill-in-stage STAGE:SECONDS`` sends itself SIGKILL that long after stage STAGE is
  announced (for stages that report no progress while they work, e.g. the smoother);
* ``--kill-after-unet K`` sends itself SIGKILL right after the K-th UNet forward call
  (a forward hook added by a runner subclass; no library module is patched);
* ``--enospc-after N`` makes every ``os.replace`` into the output folder after the
  first N raise ``OSError(ENOSPC)``: a full disk, injected in this process only
  (every committed file of the cache goes through ``os.replace``, see ``utils.atomic``);
* ``--unet-log PATH`` appends one byte to PATH per UNet forward call, with an
  unbuffered ``os.write``, so the count survives the kill.

A finished run prints ``done: <frames> frames, <n> UNet calls, <g> with an autograd graph``.

Exit status: 0 done, 3 the run stopped with a ``RunError`` (message on stderr),
-9 (as seen by the parent) killed as asked.

:class:`ForkServer` starts one such process in ``--serve`` mode: it imports torch and
the runner once and forks a fresh child per job, so each crash-test child costs a
render, not an interpreter start (about 3 s of imports on a small CPU). Each job is
still a separate process, and it is the one that is killed.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import subprocess
import sys
import threading
import traceback

__all__ = ["main", "ForkServer", "ChildResult"]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffsynth.testing.crash_child")
    p.add_argument("config", help="runner config, JSON")
    p.add_argument("--kill-at-event", default=None, metavar="STAGE:N")
    p.add_argument("--kill-in-stage", default=None, metavar="STAGE:SECONDS")
    p.add_argument("--kill-after-unet", type=int, default=None, metavar="K")
    p.add_argument("--enospc-after", type=int, default=None, metavar="N")
    p.add_argument("--unet-log", default=None, metavar="PATH")
    return p.parse_args(argv)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _event_killer(at_event: str | None, in_stage: str | None):
    """A progress callback that kills this process at the N-th event of a stage, or some time after a stage begins."""
    if at_event is None and in_stage is None:
        return None
    stage, n = at_event.split(":") if at_event else (None, "0")
    timed_stage, seconds = in_stage.split(":") if in_stage else (None, "0")
    seen, timing = [0], [False]

    def on_event(event) -> None:
        sid = event.stage.split(" ", 1)[0]
        if sid == stage:
            seen[0] += 1
            if seen[0] == int(n):
                _die()
        if sid == timed_stage and not timing[0]:
            timing[0] = True
            timer = threading.Timer(float(seconds), _die)
            timer.daemon = True
            timer.start()

    return on_event


def _inject_enospc(output_folder: str, after: int) -> None:
    """Every ``os.replace`` into ``output_folder`` after the first ``after`` fails as on a full disk."""
    real_replace = os.replace
    folder = os.path.abspath(output_folder) + os.sep
    count = [0]

    def replace(src, dst, **kwargs):
        if os.path.abspath(os.fspath(dst)).startswith(folder):
            count[0] += 1
            if count[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real_replace(src, dst, **kwargs)

    os.replace = replace


def main(argv: list[str] | None = None) -> int:
    import logging

    import torch

    from ..pipelines.runner import RunError, SDVideoPipelineRunner

    args = _parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)  # several of these share two cores in the test suite
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    if args.enospc_after is not None:
        _inject_enospc(config["data"]["output_folder"], args.enospc_after)
    log_fd = os.open(args.unet_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if args.unet_log else None
    unet_calls, graphs = [0], [0]

    def after_unet(module, inputs, output):
        unet_calls[0] += 1
        graphs[0] += bool(getattr(output, "requires_grad", False))  # an autograd graph keeps every activation alive
        if log_fd is not None:
            os.write(log_fd, b"u")
        if unet_calls[0] == args.kill_after_unet:
            _die()

    class CountingRunner(SDVideoPipelineRunner):
        def _load_pipeline(self, config):
            pipe, model_manager = super()._load_pipeline(config)
            pipe.unet.register_forward_hook(after_unet)
            return pipe, model_manager

    runner = CountingRunner(progress_bar_cmd=None, progress_callback=_event_killer(args.kill_at_event, args.kill_in_stage))
    try:
        frames = runner.run(config)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"done: {len(frames)} frames, {unet_calls[0]} UNet calls, {graphs[0]} with an autograd graph")
    return 0


# ---------------------------------------------------------------------- fork server


def _serve() -> int:
    """Read one JSON job per line from stdin (``{"argv", "log", "timeout"}``), fork a child per job,
    answer ``{"rc": exit code (negative: killed by that signal)}`` per line on stdout."""
    import torch

    torch.set_num_threads(1)
    from ..pipelines import runner  # noqa: F401  (the imports every child needs)

    with torch.device("meta"):  # the first meta-device build imports torch._refs (~1.5 s); models load on meta
        torch.nn.Embedding(2, 2)
    out = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                signal.alarm(int(job.get("timeout", 600)))  # a hung child dies of SIGALRM instead of hanging the tests
                code = main(job["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()
    return 0


class ChildResult:
    """How a child ended: ``rc`` (negative = killed by that signal) and its stdout+stderr."""

    def __init__(self, rc: int, log: str):
        self.rc = rc
        self.log = log

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL

    def __repr__(self) -> str:
        return f"ChildResult(rc={self.rc}, log=...{self.log[-2000:]!r})"


class ForkServer:
    """A pre-imported ``crash_child --serve`` process; ``run(argv, log)`` renders in a fresh forked child.

    Use as a context manager. Children get ``OMP_NUM_THREADS=1`` and one torch thread.
    """

    def __init__(self, timeout: float = 300):
        self.timeout = timeout
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "diffsynth.testing.crash_child", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )

    def run(self, argv: list[str], log: str) -> ChildResult:
        if self._proc.poll() is not None:
            raise RuntimeError(f"the crash-test fork server exited with {self._proc.returncode}")
        self._proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log), "timeout": self.timeout}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout + 30)
        if not ready:
            self.close()
            raise TimeoutError(f"crash-test child {argv} gave no answer in {self.timeout + 30:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the crash-test fork server died while running {argv}")
        with open(log, encoding="utf-8", errors="replace") as f:
            return ChildResult(json.loads(line)["rc"], f.read())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(_serve())
    sys.exit(main())
