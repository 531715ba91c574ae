"""A worker of the distributed tests and ``bench/distributed.py``: the runner on one rank, with a UNet hook.

Started by torch's launcher (or alone, as a world of one)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 \\
        -m diffsynth.testing.dist_child CONFIG.json --output-folder OUT [--kill-rank R --kill-after-unet K] [--log-dir DIR]

* ``--kill-rank R --kill-after-unet K``: rank R sends itself SIGKILL right after its K-th UNet
  forward call, in the launcher's first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so a
  restarted group runs to the end;
* ``--kill-rank R --freeze-after-unet K``: the same with SIGSTOP: a rank that stops answering
  without dying (its heartbeat stops too);
* ``--log-dir DIR``: one byte per UNet call into ``DIR/unet.rank<R>.attempt<A>`` (unbuffered,
  survives the kill), and ``DIR/times.rank<R>.attempt<A>.json`` at the end: seconds in UNet
  calls, waiting at barriers and in all, the wall-clock times of the first and last UNet call,
  and the bytes this rank sent in exchanges (the denoising's boundary predictions).

The forward hook is added by a runner subclass; no library module is patched. Exit status:
0 done, 1 the run stopped (message on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import logging

    import torch

    from ..distributed import Cluster, ClusterError, env_world_size
    from ..pipelines.runner import RunError, SDVideoPipelineRunner

    p = argparse.ArgumentParser(prog="python -m diffsynth.testing.dist_child")
    p.add_argument("config")
    p.add_argument("--output-folder", required=True)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-after-unet", type=int, default=None)
    p.add_argument("--freeze-after-unet", type=int, default=None, help="rank --kill-rank stops (SIGSTOP) instead of dying")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--dist-timeout", type=float, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    config["data"]["output_folder"] = os.path.abspath(args.output_folder)
    started = time.monotonic()
    cluster = Cluster.from_env(device="cpu", timeout=args.dist_timeout) if env_world_size() > 1 else Cluster.solo()
    if cluster.world == 1:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    attempt = cluster.restart
    log_fd = None
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        log_fd = os.open(os.path.join(args.log_dir, f"unet.rank{cluster.rank}.attempt{attempt}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    calls = [0]
    denoise = [0.0, None, None, None]  # seconds in UNet calls; start of the current call; wall clock of the first start, last end

    def before_unet(module, inputs):
        denoise[1] = time.monotonic()
        if denoise[2] is None:
            denoise[2] = time.time()

    def after_unet(module, inputs, output):
        calls[0] += 1
        denoise[0] += time.monotonic() - denoise[1]
        denoise[3] = time.time()
        if log_fd is not None:
            os.write(log_fd, b"u")
        if cluster.rank == args.kill_rank and attempt == 0 and calls[0] in (args.kill_after_unet, args.freeze_after_unet):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL if calls[0] == args.kill_after_unet else signal.SIGSTOP)

    class CountingRunner(SDVideoPipelineRunner):
        def _load_pipeline(self, config):
            pipe, model_manager = super()._load_pipeline(config)
            pipe.unet.register_forward_pre_hook(before_unet)
            pipe.unet.register_forward_hook(after_unet)
            return pipe, model_manager

    try:
        CountingRunner(cluster=cluster, progress_bar_cmd=None).run(config, config_dir=os.path.dirname(os.path.abspath(args.config)))
    except (RunError, ClusterError, ValueError) as exc:
        cluster.report_error(str(exc))
        print(f"[{cluster.me}] error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.log_dir:
            times = {"unet_seconds": denoise[0], "wait_seconds": cluster.waited, "total_seconds": time.monotonic() - started,
                     "first_unet_at": denoise[2], "last_unet_at": denoise[3], "bytes_exchanged": cluster.exchanged, "unet_calls": calls[0]}
            with open(os.path.join(args.log_dir, f"times.rank{cluster.rank}.attempt{attempt}.json"), "w", encoding="utf-8") as f:
                json.dump(times, f)
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
