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

A batch (a folder of clips as the input) is ``diffsynth run OUTPUT/batch_config.json --input
FOLDER``: each clip renders into ``OUTPUT/<clip name>/``, a render folder of its own (its
``config.json`` written by the runner), so the batch's own config has another name and
``OUTPUT`` is never mistaken for a broken single render. The page lists the batch (its clips'
states, with ``OUTPUT/batch.json``'s results) and each clip as ``batch/clip``; the processes
of the batch render every clip of it, so they count as the clips' own.
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
from ..data.images import natural_sort_key
from ..data.output import VIDEO_FILE_NAMES, OutputOptions
from ..pipelines.batch import BATCH_FILE, clip_folders, find_clips
from ..utils.atomic import atomic_write_text
from ..utils.sizes import human_bytes, human_seconds

logger = logging.getLogger("diffsynth")

CONFIG_FILE = "config.json"
BATCH_CONFIG_FILE = "batch_config.json"  # a batch's config: each clip's folder gets its own config.json from the runner
WORKER_FILE = "worker.json"
LOG_FILE = "worker.log"
WORKER_MODULE = "diffsynth.webui.worker"
VIDEO_MIME_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".gif": "image/gif"}

# Popen objects of the workers this process started: polling them reaps the finished ones (no zombies).
_children: dict[int, subprocess.Popen] = {}


class RunBusy(ValueError):
    """A render is already running in this output folder."""


def _key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def is_batch_folder(path: str) -> bool:
    """A batch's output folder: it holds the batch's config (written by the page) or its results (``batch.json``)."""
    return os.path.isfile(os.path.join(path, BATCH_CONFIG_FILE)) or os.path.isfile(os.path.join(path, BATCH_FILE))


def write_run_config(config: dict, out: str | None = None, batch: bool = False) -> str:
    """Write ``config`` to ``OUTPUT/config.json`` (where the runner keeps it too), or a batch's to ``OUTPUT/batch_config.json``;
    return that path. A folder holds one kind: a batch is not written over a single render, nor the other way round."""
    out = out or config["data"]["output_folder"]
    if batch and os.path.isfile(os.path.join(out, CONFIG_FILE)):
        raise ValueError(f"{out} holds a render of one video; give the batch another render name")
    if not batch and is_batch_folder(out):
        raise ValueError(f"{out} holds a batch of clips; give this render another name")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, BATCH_CONFIG_FILE if batch else CONFIG_FILE)
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
    """The live processes rendering into ``out`` (a clip's folder: with its batch's); ``scan`` reuses one
    ``rendering_processes()`` for many folders."""
    scan = rendering_processes() if scan is None else scan
    found = list(scan.get(_key(out), []))
    parent = os.path.dirname(os.path.abspath(out))
    if is_batch_folder(parent):
        found += scan.get(_key(parent), [])
    return found


def _processes_below(out: str, scan: dict[str, list[psutil.Process]]) -> list[psutil.Process]:
    """Processes rendering into a folder inside ``out`` (a batch's clip resumed on its own)."""
    inside = _key(out) + os.sep
    return [p for key, procs in scan.items() if key.startswith(inside) for p in procs]


# ---------------------------------------------------------------------- start, resume, cancel


def read_worker_record(out: str) -> dict | None:
    path = os.path.join(out, WORKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_worker_record(out: str, record: dict) -> None:
    atomic_write_text(os.path.join(out, WORKER_FILE), json.dumps(record, indent=2))


def start_render(out: str, python: str = sys.executable, cwd: str | None = None, processes: int = 1,
                 clips: str | None = None) -> subprocess.Popen:
    """Start (or resume: it is the same) the render of ``OUTPUT/config.json`` in a detached worker process.

    Refuses with ``RunBusy`` while another process renders into ``out``: two writers of one
    folder would each redo the other's work. Output goes to ``OUTPUT/worker.log``.
    ``processes`` > 1: the worker runs the render under torch's launcher on that many
    processes (one per GPU; ``diffsynth run --nproc-per-node``).

    A batch (``OUTPUT/batch_config.json``, see :func:`write_run_config`) renders ``clips`` (a folder or a glob;
    None: the one its last start recorded) in one process, each clip into ``OUTPUT/<clip name>/``.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    out = os.path.abspath(out)
    batch = os.path.isfile(os.path.join(out, BATCH_CONFIG_FILE))
    if batch:
        clips = clips or (read_worker_record(out) or {}).get("input")
        if not clips:
            raise ValueError(f"{out} holds a batch, but no record says which clips it renders: start it from the form again")
        if processes > 1:
            raise ValueError("a batch of clips renders in one process (diffsynth run --input); choose 1 GPU process")
    elif clips is not None:
        raise ValueError(f"{out} has no {BATCH_CONFIG_FILE}: write the batch's config with write_run_config(..., batch=True) first")
    elif is_batch_folder(out):
        raise ValueError(f"{out} holds a batch started on the command line (no {BATCH_CONFIG_FILE}): "
                         "resume it there, with the same `diffsynth run CONFIG --input CLIPS`")
    elif not os.path.isfile(os.path.join(out, CONFIG_FILE)):
        raise ValueError(f"{out} has no {CONFIG_FILE}: start a render from the form first")
    scan = rendering_processes()
    busy = render_processes(out, scan) + _processes_below(out, scan)
    if busy:
        raise RunBusy(f"a render is already running in {out} (pid {', '.join(str(p.pid) for p in busy)}); cancel it first or wait for it")
    argv = [python, "-m", WORKER_MODULE, out] + (["--nproc-per-node", str(processes)] if processes > 1 else [])
    record = {"state": "starting", "argv": argv, "processes": processes}
    if batch:
        argv += ["--input", clips]
        record["input"] = clips
    cwd = cwd or os.getcwd()
    write_worker_record(out, {**record, "cwd": cwd, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
    everything finished so far. Resume continues from there. A clip of a running batch is
    stopped by stopping the batch (its process renders every clip).
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
    state: str  # running | done | stopped | cancelled | failed | not started; a clip of a running batch: queued
    message: str
    fraction: float
    stage: str
    table: dict | None
    pids: list[int] = field(default_factory=list)
    last_frames: list[str] = field(default_factory=list)
    video: str | None = None
    log_tail: str = ""
    batch: str | None = None  # a clip's render: the batch folder it belongs to
    clips: list[dict] | None = None  # a batch: one row per clip (clip, state, progress, frames, time, result)

    @property
    def name(self) -> str:
        """The folder's name; a clip's ``batch/clip``."""
        name = os.path.basename(os.path.normpath(self.out))
        return name if self.batch is None else f"{os.path.basename(os.path.normpath(self.batch))}/{name}"

    @property
    def download(self) -> tuple[str, str] | None:
        """``(file name, mime type)`` to offer the finished video under (None: no video)."""
        if self.video is None:
            return None
        ext = os.path.splitext(self.video)[1].lower()
        return self.name.replace("/", "_") + ext, VIDEO_MIME_TYPES.get(ext, "application/octet-stream")


def is_run_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json")) or os.path.isfile(os.path.join(path, CONFIG_FILE))


def _updated(path: str) -> float:
    times = [os.path.getmtime(os.path.join(path, f)) for f in ("manifest.json", CONFIG_FILE, WORKER_FILE, BATCH_CONFIG_FILE, BATCH_FILE)
             if os.path.isfile(os.path.join(path, f))]
    return max(times, default=0.0)


def _subfolders(path: str) -> list[str]:
    return sorted((os.path.join(path, d) for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))),
                  key=lambda p: natural_sort_key(os.path.basename(p)))


def list_runs(root: str) -> list[str]:
    """Render folders in ``root`` (its subfolders, and ``root`` itself, holding a manifest or config), newest first.

    A batch's folder is listed with its clips' render folders right after it, in the clips' order.
    """
    if not os.path.isdir(root):
        return []
    candidates = [c for c in [root] + _subfolders(root) if is_run_folder(c) or is_batch_folder(c)]
    runs = []
    for folder in sorted(candidates, key=_updated, reverse=True):
        runs.append(folder)
        if is_batch_folder(folder):
            runs += [c for c in _subfolders(folder) if is_run_folder(c) and c not in candidates]
    return runs


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


def video_file(out: str, config: dict | None) -> str | None:
    """The name of the video a render in ``out`` writes: its config's ``data.output`` says (None: PNG frames only);
    without a readable config, whichever of ``VIDEO_FILE_NAMES`` is there (``video.mp4`` when none is)."""
    if config is not None:
        try:
            return OutputOptions.from_config((config.get("data") or {}).get("output")).file_name
        except (ValueError, TypeError, AttributeError):
            logger.debug("%s: unreadable data.output; looking for any video file", out)
    return next((n for n in VIDEO_FILE_NAMES if os.path.isfile(os.path.join(out, n))), "video.mp4")


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # missing, or replaced while being read: the next refresh reads it
        return None


def _batch_results(root: str) -> dict[str, dict]:
    """``batch.json``'s entries by the clip's output folder (its real path)."""
    entries = (_read_json(os.path.join(root, BATCH_FILE)) or {}).get("clips") or []
    return {_key(e["out"]): e for e in entries if isinstance(e, dict) and e.get("out")}


def _current_clip(root: str) -> str | None:
    """The clip folder a running batch works on: the one ``batch.json`` marks running (the batch writes that as each clip starts)."""
    return next((key for key, entry in _batch_results(root).items() if entry.get("status") == "running"), None)


def batch_clips(root: str) -> list[tuple[str, str]]:
    """``(clip, output folder)`` of every clip of the batch in ``root``: the clips its input holds now (as recorded by
    the worker), else those ``batch.json`` lists (a command-line batch), else its clip folders."""
    clips = (read_worker_record(root) or {}).get("input")
    if clips:
        try:
            found = find_clips(clips)
        except ValueError:
            logger.debug("%s: its input %s holds no clips now", root, clips)
        else:
            return list(clip_folders(found, root).items())
    entries = (_read_json(os.path.join(root, BATCH_FILE)) or {}).get("clips") or []
    if entries:
        return [(e["clip"], e["out"]) for e in entries if isinstance(e, dict) and e.get("clip") and e.get("out")]
    return [(c, c) for c in _subfolders(root) if is_run_folder(c)]


def _recorded_state(record: dict, finished_all: bool, started: bool) -> tuple[str, str] | None:
    """State and message of a stopped render from its worker's record (None: it says nothing)."""
    recorded = record.get("state")
    if recorded == "cancelled":
        return "cancelled", "cancelled; Resume continues where it stopped"
    if recorded == "failed":
        return "failed", f"the render stopped with an error (exit code {record.get('exit_code')}); see the log. Fix the cause and Resume"
    if recorded in ("running", "starting", "finished") and not finished_all:
        return "stopped", "the render process is gone (killed, crashed or the machine restarted); Resume continues where it stopped"
    if started and not finished_all:
        return "stopped", "not running; Resume continues where it stopped"
    return None


def run_info(out: str, check_keys: bool = False, scan: dict[str, list[psutil.Process]] | None = None) -> RunInfo:
    """Everything a page shows about the render in ``out``, read from the folder and the process table
    (``scan``: a ``rendering_processes()`` to reuse). A batch's folder: see :func:`batch_info`."""
    from ..cli import stage_table

    out = os.path.abspath(out)
    if is_batch_folder(out) and not is_run_folder(out):
        return batch_info(out, scan)
    scan = rendering_processes() if scan is None else scan
    pids = [p.pid for p in render_processes(out, scan)]
    parent = os.path.dirname(out)
    batch = parent if is_batch_folder(parent) else None
    record = read_worker_record(out) or {}
    config = _read_json(os.path.join(out, CONFIG_FILE)) if os.path.isfile(os.path.join(out, CONFIG_FILE)) else None
    table = stage_table(out, config, check_keys=check_keys) if is_run_folder(out) else None
    steps = ((config or {}).get("pipeline", {}).get("pipeline_inputs", {}) or {}).get("num_inference_steps") or 20
    fraction, stage = progress_of(table, steps) if table else (0.0, "not started")
    name = video_file(out, config)
    video = os.path.join(out, name) if name else None
    complete = table is not None and all(r["status"] == "done" for r in table["rows"]) and (video is None or os.path.isfile(video))
    result = _batch_results(batch).get(_key(out)) if batch else None  # this clip's line in its batch's results
    own = [p.pid for p in scan.get(_key(out), [])]
    if pids and (own or not complete):
        if own or _current_clip(batch) == _key(out):
            state, message = "running", f"rendering (pid {', '.join(map(str, pids))}); closing the browser does not stop it"
        else:
            state, message = "queued", f"waits for its turn in the batch {os.path.basename(batch)} (pid {', '.join(map(str, pids))})"
            if result and result.get("status") == "failed":
                state, message = "failed", f"failed in the batch: {result.get('error')}"
    elif complete:
        state, message = "done", f"finished: {video or os.path.join(out, 'frames')}"
    elif record:
        state, message = _recorded_state(record, complete, fraction > 0) or ("not started", "not started")
    elif result and result.get("status") == "failed":
        state, message = "failed", f"failed in the batch: {result.get('error')}. Fix the cause and Resume (this clip) or resume the batch"
    elif table is not None and fraction > 0:
        state, message = "stopped", "not running; Resume continues where it stopped"
    else:
        state, message = "not started", "not started"
    return RunInfo(out=out, state=state, message=message, fraction=fraction, stage=stage, table=table, pids=pids,
                   last_frames=last_frames(out), video=video if video and os.path.isfile(video) else None, log_tail=log_tail(out),
                   batch=batch)


def batch_info(root: str, scan: dict[str, list[psutil.Process]] | None = None) -> RunInfo:
    """A batch of clips: its process, each clip's state and progress (one row per clip), and ``batch.json``'s results."""
    root = os.path.abspath(root)
    scan = rendering_processes() if scan is None else scan
    pids = [p.pid for p in scan.get(_key(root), [])]
    results = _batch_results(root)
    rows, fractions, current = [], [], None
    clips = batch_clips(root)
    for k, (clip, folder) in enumerate(clips):
        info = run_info(folder, scan=scan) if is_run_folder(folder) else None
        result = results.get(_key(folder)) or {}
        if info is not None:
            state = info.state
        else:  # no folder yet; or the runner's checks refused the clip before writing one
            state = "failed" if result.get("status") == "failed" else "queued" if pids else "not started"
        if info is not None and info.state == "running":
            current = (k, os.path.basename(clip))
        fractions.append(info.fraction if info is not None else 0.0)
        seconds = result.get("seconds")
        rows.append({"clip": os.path.basename(clip), "render": os.path.basename(folder), "state": state,
                     "progress": f"{fractions[-1]:.0%}", "frames": result.get("frames"),
                     "time": human_seconds(seconds) if seconds else "-", "result": result.get("error") or result.get("status") or "-"})
    done = sum(r["state"] == "done" for r in rows)
    fraction = sum(fractions) / len(fractions) if fractions else 0.0
    stage = f"clip {current[0] + 1} of {len(rows)}: {current[1]}" if current else f"{done} of {len(rows)} clips done"
    finished_all = bool(rows) and done == len(rows)
    record = read_worker_record(root) or {}
    if pids:
        state, message = "running", f"rendering the clips one by one (pid {', '.join(map(str, pids))}); closing the browser does not stop it"
    elif finished_all:
        state, message = "done", f"all {len(rows)} clips rendered, each into its folder in {root}"
    elif record.get("state") == "failed" and any(r["state"] == "failed" for r in rows):
        failed = [r["clip"] for r in rows if r["state"] == "failed"]
        state, message = "failed", f"{len(failed)} of {len(rows)} clips failed ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}): see the table. Fix the cause and Resume (finished clips are skipped)"
    else:
        state, message = _recorded_state(record, finished_all, fraction > 0) or ("not started", "not started")
    return RunInfo(out=root, state=state, message=message, fraction=fraction, stage=stage, table=None, pids=pids,
                   log_tail=log_tail(root), clips=rows)


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
