"""Video renders as background processes that outlive the browser, and what a page shows of them.

A render started from the WebUI is ``diffsynth run OUTPUT/config.json`` run by a detached
worker process (``python -m diffsynth.webui.worker OUTPUT``): it is not a child of the
Streamlit script, so closing the tab, a dropped websocket or a restarted Streamlit server
does not stop it. Everything the page shows is read from the output folder — the runner's
``manifest.json`` (through ``diffsynth status``'s stage table), the frames on disk, and two
files of the worker: ``worker.json`` (pid, command, outcome) and ``worker.log`` (its output).

A render started with ``diffsynth run`` on the command line writes the same folder, so the
page lists it like its own: running renders are found by looking at the processes' command
lines, and Resume of any stopped render is ``diffsynth run OUTPUT/config.json`` again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from ..cache.manifest import STAGES
from ..utils.atomic import atomic_write_text
from ..utils.sizes import human_bytes, human_seconds

logger = logging.getLogger("diffsynth")

CONFIG_FILE = "config.json"
WORKER_FILE = "worker.json"
LOG_FILE = "worker.log"
WORKER_MODULE = "diffsynth.webui.worker"

# Popen objects of the workers this process started: polling them reaps the finished ones (no zombies).
_children: dict[int, subprocess.Popen] = {}


class RunBusy(ValueError):
    """A render is already running in this output folder."""


def _key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def write_run_config(config: dict, out: str | None = None) -> str:
    """Write ``config`` to ``OUTPUT/config.json`` (where the runner keeps it too) and return that path."""
    out = out or config["data"]["output_folder"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CONFIG_FILE)
    atomic_write_text(path, json.dumps(config, indent=4))
    return path


# ---------------------------------------------------------------------- finding the processes of a render


def _cli_config_arg(cmdline: list[str]) -> str | None:
    """The config path of a ``diffsynth run CONFIG`` command line (console script, ``-m diffsynth.cli`` or ``-c`` code
    importing ``diffsynth.cli``), else None."""
    for i, token in enumerate(cmdline[:-1]):
        if token != "run":
            continue
        before = cmdline[:i]
        if any(os.path.basename(t) == "diffsynth" or t in ("diffsynth.cli", "diffsynth") or "diffsynth.cli" in t for t in before):
            return cmdline[i + 1]
    return None


def _render_folder(proc: psutil.Process, cmdline: list[str]) -> str | None:
    """The output folder a process renders into, if it is a WebUI worker or a ``diffsynth run``."""
    if WORKER_MODULE in cmdline:
        at = cmdline.index(WORKER_MODULE)
        return cmdline[at + 1] if at + 1 < len(cmdline) else None
    config_arg = _cli_config_arg(cmdline)
    if config_arg is None:
        return None
    from ..cli import load_config

    try:
        cwd = proc.cwd()
        config_path = os.path.join(cwd, config_arg)
        out = load_config(config_path)["data"]["output_folder"]
    except (psutil.Error, OSError, ValueError, KeyError, TypeError) as exc:
        # Its config cannot be read from here (deleted, another user's): the page cannot attribute it to a folder.
        logger.debug("cannot tell where pid %d renders: %s", proc.pid, exc)
        return None
    return os.path.join(cwd, out)


def _alive(proc: psutil.Process) -> bool:
    child = _children.get(proc.pid)
    if child is not None and child.poll() is not None:
        del _children[proc.pid]
        return False
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rendering_processes() -> dict[str, list[psutil.Process]]:
    """Live processes that render (WebUI workers and ``diffsynth run`` commands), by their output folder's real path."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid == os.getpid() or not cmdline:
            continue
        folder = _render_folder(proc, cmdline)
        if folder is not None and _alive(proc):
            found.setdefault(_key(folder), []).append(proc)
    return found


def render_processes(out: str, scan: dict[str, list[psutil.Process]] | None = None) -> list[psutil.Process]:
    """The live processes rendering into ``out``; ``scan`` reuses one ``rendering_processes()`` for many folders."""
    return (rendering_processes() if scan is None else scan).get(_key(out), [])


# ---------------------------------------------------------------------- start, resume, cancel


def read_worker_record(out: str) -> dict | None:
    path = os.path.join(out, WORKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_worker_record(out: str, record: dict) -> None:
    atomic_write_text(os.path.join(out, WORKER_FILE), json.dumps(record, indent=2))


def start_render(out: str, python: str = sys.executable, cwd: str | None = None, processes: int = 1) -> subprocess.Popen:
    """Start (or resume: it is the same) the render of ``OUTPUT/config.json`` in a detached worker process.

    Refuses with ``RunBusy`` while another process renders into ``out``: two writers of one
    folder would each redo the other's work. Output goes to ``OUTPUT/worker.log``.
    ``processes`` > 1: the worker runs the render under torch's launcher on that many
    processes (one per GPU; ``diffsynth run --nproc-per-node``).
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    out = os.path.abspath(out)
    if not os.path.isfile(os.path.join(out, CONFIG_FILE)):
        raise ValueError(f"{out} has no {CONFIG_FILE}: start a render from the form first")
    busy = render_processes(out)
    if busy:
        raise RunBusy(f"a render is already running in {out} (pid {', '.join(str(p.pid) for p in busy)}); cancel it first or wait for it")
    argv = [python, "-m", WORKER_MODULE, out] + (["--nproc-per-node", str(processes)] if processes > 1 else [])
    cwd = cwd or os.getcwd()
    write_worker_record(out, {"state": "starting", "argv": argv, "cwd": cwd, "processes": processes,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(out, LOG_FILE), "ab") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} started by the WebUI: {' '.join(argv)}\n".encode())
        log.flush()
        if os.name == "nt":
            flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, creationflags=flags)
        else:
            # A new session: no signal sent to the Streamlit server's process group (Ctrl-C in its terminal) reaches the render.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    _children[proc.pid] = proc
    return proc


def cancel_render(out: str) -> list[int]:
    """Ask every process rendering into ``out`` to stop (SIGTERM); returns their pids.

    Stopping is safe at any instant (every file is committed atomically): a WebUI worker
    finishes its current write and exits, a command-line render stops at once, and both keep
    everything finished so far. Resume continues from there.
    """
    pids = []
    for proc in render_processes(out):
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue  # it ended between the listing and the signal: nothing left to stop
        pids.append(proc.pid)
    return pids


# ---------------------------------------------------------------------- what a page shows


@dataclass
class RunInfo:
    out: str
    state: str  # running | done | stopped | cancelled | failed | not started
    message: str
    fraction: float
    stage: str
    table: dict | None
    pids: list[int] = field(default_factory=list)
    last_frames: list[str] = field(default_factory=list)
    video: str | None = None
    log_tail: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.out))


def is_run_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json")) or os.path.isfile(os.path.join(path, CONFIG_FILE))


def list_runs(root: str) -> list[str]:
    """Render folders in ``root`` (its subfolders, and ``root`` itself, holding a manifest or config), newest first."""
    if not os.path.isdir(root):
        return []
    candidates = [root] + [os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    runs = [c for c in candidates if is_run_folder(c)]

    def updated(path: str) -> float:
        return max(os.path.getmtime(os.path.join(path, f)) for f in ("manifest.json", CONFIG_FILE, WORKER_FILE) if os.path.isfile(os.path.join(path, f)))

    return sorted(runs, key=updated, reverse=True)


_STEPS = re.compile(r"^(\d+)/(\d+) steps(?:, (\d+)/(\d+) of step \d+)?$")
_FRAMES = re.compile(r"^(\d+)/(\d+)$")


def _row_fraction(row: dict) -> float:
    """How much of one stage is done, from a stage-table row (``diffsynth status``'s counts)."""
    if row["status"] == "done":
        return 1.0
    if row["status"] == "pending":
        return 0.0
    steps = _STEPS.match(row["frames"])
    if steps:
        done, total, part, n = (int(g) if g else 0 for g in steps.groups())
        return (done + (part / n if n else 0.0)) / total if total else 0.0
    frames = _FRAMES.match(row["frames"])
    if frames and int(frames.group(2)):
        return int(frames.group(1)) / int(frames.group(2))
    return 0.0


def progress_of(table: dict, steps: int) -> tuple[float, str]:
    """Overall fraction done (denoising weighs one unit per step, every other stage one) and the current stage's label."""
    weights = {sid: (max(1, steps) if sid == 4 else 1) for sid, _ in STAGES}
    rows = table["rows"]
    done = sum(weights[r["id"]] * _row_fraction(r) for r in rows)
    current = next((r for r in rows if r["status"] != "done"), None)
    label = "all stages done" if current is None else f"stage {current['id']}: {current['name']}" + (f" ({current['frames']})" if current["frames"] != "-" else "")
    return done / sum(weights.values()), label


def last_frames(out: str, count: int = 4) -> list[str]:
    """Paths of the ``count`` highest-numbered decoded frames (final ``frames/``, else the decoded-but-unsmoothed ones)."""
    for folder in (os.path.join(out, "frames"), os.path.join(out, "latents", "decoded")):
        if not os.path.isdir(folder):
            continue
        names = sorted(n for n in os.listdir(folder) if n.endswith(".png") and n.split(".")[0].isdigit())
        if names:
            return [os.path.join(folder, n) for n in names[-count:]]
    return []


def log_tail(out: str, lines: int = 30) -> str:
    path = os.path.join(out, LOG_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws its bar with carriage returns: keep only the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def run_info(out: str, check_keys: bool = False, scan: dict[str, list[psutil.Process]] | None = None) -> RunInfo:
    """Everything a page shows about the render in ``out``, read from the folder and the process table
    (``scan``: a ``rendering_processes()`` to reuse)."""
    from ..cli import stage_table

    out = os.path.abspath(out)
    pids = [p.pid for p in render_processes(out, scan)]
    record = read_worker_record(out) or {}
    config = None
    if os.path.isfile(os.path.join(out, CONFIG_FILE)):
        with open(os.path.join(out, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
    table = stage_table(out, config, check_keys=check_keys) if is_run_folder(out) else None
    steps = ((config or {}).get("pipeline", {}).get("pipeline_inputs", {}) or {}).get("num_inference_steps") or 20
    fraction, stage = progress_of(table, steps) if table else (0.0, "not started")
    video = os.path.join(out, "video.mp4")
    complete = table is not None and all(r["status"] == "done" for r in table["rows"]) and os.path.isfile(video)
    recorded = record.get("state")
    if pids:
        state, message = "running", f"rendering (pid {', '.join(map(str, pids))}); closing the browser does not stop it"
    elif complete:
        state, message = "done", f"finished: {video}"
    elif recorded == "cancelled":
        state, message = "cancelled", "cancelled; Resume continues where it stopped"
    elif recorded == "failed":
        state, message = "failed", f"the render stopped with an error (exit code {record.get('exit_code')}); see the log. Fix the cause and Resume"
    elif recorded in ("running", "starting", "finished"):
        state, message = "stopped", "the render process is gone (killed, crashed or the machine restarted); Resume continues where it stopped"
    elif table is not None and fraction > 0:
        state, message = "stopped", "not running; Resume continues where it stopped"
    else:
        state, message = "not started", "not started"
    return RunInfo(out=out, state=state, message=message, fraction=fraction, stage=stage, table=table, pids=pids,
                   last_frames=last_frames(out), video=video if os.path.isfile(video) else None, log_tail=log_tail(out))


# ---------------------------------------------------------------------- estimates


def estimate_rows(estimate: dict) -> list[dict]:
    """An estimate's ``as_json()`` as table rows: per stage and in total, time, disk peak, RAM peak, device peak, source."""
    def device(value) -> str:
        return "-" if value is None else human_bytes(value)

    rows = [{"id": int(sid), "stage": stage["name"], "time": "done" if stage["done"] else human_seconds(stage["seconds"]),
             "disk peak": human_bytes(stage["disk_peak_bytes"]), "RAM peak": human_bytes(stage["ram_peak_bytes"]),
             "device peak": device(stage["device_peak_bytes"]), "time from": "" if stage["done"] else stage["source"]}
            for sid, stage in sorted(estimate["stages"].items(), key=lambda item: int(item[0]))]
    total = estimate["total"]
    rows.append({"id": None, "stage": "total", "time": human_seconds(total["seconds"]), "disk peak": human_bytes(total["disk_peak_bytes"]),
                 "RAM peak": human_bytes(total["ram_peak_bytes"]), "device peak": device(total["device_peak_bytes"]), "time from": ""})
    return rows


def estimate_verdicts(estimate: dict) -> list[tuple[bool, str]]:
    """``(fits, sentence)`` for the disk, RAM and device memory."""
    return [(verdict["fits"], f"{what}: {'fits' if verdict['fits'] else 'does not fit'} ({verdict['reason']})")
            for what, verdict in estimate.get("fits", {}).items()]


def comparison_rows(table: dict) -> list[dict]:
    """``stage_table`` rows as predicted-vs-measured rows (stages with either), for the page after a render."""
    rows = []
    for r in table["rows"]:
        predicted, measured = r.get("predicted") or {}, r.get("measured") or {}
        if not predicted and not measured:
            continue

        def pair(key, fmt):
            left, right = measured.get(key), predicted.get(key)
            return f"{fmt(left) if left is not None else '-'} / {fmt(right) if right is not None else '-'}"

        rows.append({"id": r["id"], "stage": r["name"], "time (measured / est.)": pair("seconds", human_seconds),
                     "disk peak (measured / est.)": pair("disk_peak_bytes", human_bytes),
                     "RAM peak (measured / est.)": pair("ram_peak_bytes", human_bytes)})
    return rows
