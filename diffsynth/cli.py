"""Command line: ``diffsynth info | txt2img | run | status | clean | download | demo``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter

import torch

from .cache.previous import PREVIOUS_FOLDER
from .data.output import VIDEO_FILE_NAMES
from .utils.sizes import count_frame_files, human_bytes, human_seconds, path_bytes


def _parse_dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise SystemExit(f"--dtype must be one of fp32, fp16, bf16; got {name!r}")
    return table[name]


_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".pkl", ".onnx", ".json")


def cmd_info(args: argparse.Namespace) -> int:
    """A model file's family, dtype(s) and parameter count (from its header); a video's frames, exact rate and audio."""
    from .models.detect import detect
    from .models.state_dict import read_header

    if os.path.isfile(args.file) and not args.file.lower().endswith(_MODEL_SUFFIXES):
        return _video_info(args.file)
    if os.path.isdir(args.file):
        from .models.model_manager import ModelManager

        ModelManager(device="cpu").identify(args.file)
        print(f"{args.file}: diffusers model folder")
        return 0
    from .controlnets.annotators.files import identify_annotator_file

    header = read_header(args.file)
    annotator = identify_annotator_file(header)
    if annotator is not None:
        count = sum(_numel(shape) for shape, _ in header.values())
        print(f"file:       {args.file}")
        print(f"family:     annotator weights: {annotator.description}, read by the {annotator.processor!r} ControlNet processor "
              f"from models.annotator_folder as {annotator.filename}")
        print(f"parameters: {count:,} in {len(header)} tensors")
        return 0
    kind = detect(header, source=args.file)
    count = sum(_numel(shape) for shape, _ in header.values())
    dtypes = Counter(str(dtype).removeprefix("torch.") for _, dtype in header.values())
    print(f"file:       {args.file}")
    print(f"family:     {kind.family} ({kind.description}){'' if kind.supported else ' - NOT SUPPORTED: ' + kind.note}")
    print(f"dtype:      {', '.join(f'{d} ({n} tensors)' for d, n in dtypes.most_common())}")
    print(f"parameters: {count:,} in {len(header)} tensors")
    return 0


def _video_info(path: str) -> int:
    """``diffsynth info VIDEO``: what the runner will read (frames that decode, exact rate) and the audio it will carry."""
    from .data.media import probe_media, rate_text

    from .data import UnreadableVideoError

    try:
        media = probe_media(path)  # decodes once to count the frames that decode: headers can claim more
    except UnreadableVideoError as exc:
        raise ValueError(f"{path} is neither a model file (by its extension) nor a video ffmpeg can read: {exc.detail}") from None
    claimed = media.header_frames
    frames = f"{media.decoded_frames} (decoded)"
    if media.header_lies:
        frames += f"; the header claims {claimed}: the file is truncated or damaged, and a render reads only the {media.decoded_frames}"
    elif claimed is not None and claimed != media.decoded_frames:
        frames += f"; the header says about {claimed}"
    rate = rate_text(media.rate)
    if media.variable:
        low, high = media.rate_range
        rate += f" average; VARIABLE frame rate ({low:.3f}-{high:.3f} fps): read as presented, written at the average rate"
    print(f"file:       {path}")
    print(f"video:      {media.codec}, {media.width}x{media.height}")
    print(f"frames:     {frames}")
    print(f"frame rate: {rate}")
    duration = media.duration
    print(f"duration:   {duration:.3f} s" if duration is not None else "duration:   unknown")
    if media.container_duration is not None and duration is not None and abs(media.container_duration - duration) > 1.5 / float(media.rate or 30):
        print(f"            (the container says {media.container_duration:.3f} s)")
    if not media.audio:
        print("audio:      none (a render of it is silent)")
    for stream in media.audio:
        print(f"audio #{stream.index}:   {stream.describe()}")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cmd_txt2img(args: argparse.Namespace) -> int:
    from .models.model_manager import ModelManager
    from .pipelines.sd_image import SDImagePipeline
    from .utils.atomic import atomic_save_image

    mm = ModelManager(torch_dtype=_parse_dtype(args.dtype), device=args.device)
    mm.load_models(args.model, lora_alphas=args.lora_alpha)
    if args.textual_inversion_folder:
        mm.load_textual_inversions(args.textual_inversion_folder)
    if mm.has("text_encoder_2"):  # an SDXL base/Turbo checkpoint
        from .pipelines.sdxl_image import SDXLImagePipeline

        pipe = SDXLImagePipeline.from_model_manager(mm)
    else:
        pipe = SDImagePipeline.from_model_manager(mm)
    if args.sampler == "lcm":
        from .models.detect import lcm_warning

        warning = lcm_warning(args.model, "sdxl" if mm.has("text_encoder_2") else "sd1")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    torch.manual_seed(args.seed)
    image = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        cfg_scale=args.cfg,
        clip_skip=args.clip_skip,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        sampler=args.sampler,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save_image(image, args.out)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------- video runner: run, status, clean, demo


def load_config(path: str) -> dict:
    """A runner config from a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML)."""
    import json

    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path} is YAML, and reading YAML needs PyYAML: `pip install pyyaml`, or give the config as JSON") from None
        config = yaml.safe_load(text)
    elif ext == ".json":
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"{path}: give the config as .json or .yaml (got {ext or 'no extension'!r})")
    if not isinstance(config, dict) or not {"models", "data", "pipeline"} <= set(config):
        raise ValueError(f"{path} is not a runner config: it needs the keys models, data and pipeline (as DiffSynth-Studio's Diffutoon examples)")
    return config


def _render(config: dict, rerun_hint: str, config_dir: str | None = None, cluster=None, force: bool = False) -> int:
    """Run the video runner with a progress bar; on Ctrl-C or a stopped run, say how to continue.

    ``cluster``: this process's place in a run on several processes; a failure here is told to
    the other ranks (they stop at once, naming this rank) and every message names the rank.
    """
    from .pipelines.config_paths import resolve_path
    from .pipelines.runner import RunError, SDVideoPipelineRunner
    from .distributed import ClusterError

    out = resolve_path(config["data"]["output_folder"], config_dir)[0]
    who = "" if cluster is None else f"[{cluster.me}] "
    try:
        runner = SDVideoPipelineRunner(cluster=cluster, estimate=True, force=force, on_estimate=lambda e: print(e.format() + "\n", flush=True))
        frames = runner.run(config, config_dir=config_dir)
    except KeyboardInterrupt:
        if cluster is not None:
            cluster.report_error("interrupted (Ctrl-C)")
        print(f"\n{who}interrupted. Finished work is kept in {out}; {rerun_hint} to continue where it stopped "
              f"(`diffsynth status {out}` shows what is done).", file=sys.stderr)
        return 130
    except (RunError, ClusterError) as exc:
        if cluster is not None and not isinstance(exc, ClusterError):
            cluster.report_error(str(exc))
        print(f"{who}error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        if cluster is not None:
            cluster.report_error(f"{type(exc).__name__}: {exc}")
        raise
    if cluster is None or cluster.rank == 0:
        video = (runner.last_plan or {}).get("output")
        video = os.path.join(out, video.file_name) if video is not None and video.file_name else "no video (data.output.codec png)"
        print(f"done: {len(frames)} frames in {os.path.join(out, 'frames')}, {video}")
    return 0


def _render_batch(config: dict, pattern: str, config_dir: str, force: bool, hint: str) -> int:
    """``run CONFIG --input GLOB|FOLDER``: each clip into OUTPUT/<clip name>/, models loaded once, then a summary table."""
    from .pipelines.batch import BATCH_FILE, find_clips, format_summary, run_batch
    from .pipelines.config_paths import resolve_path
    from .pipelines.runner import SDVideoPipelineRunner

    clips = find_clips(pattern)
    root = resolve_path(config["data"]["output_folder"], config_dir)[0]
    print(f"{len(clips)} clip{'s' if len(clips) != 1 else ''} into {root}/<clip name>/", flush=True)
    runner = SDVideoPipelineRunner(estimate=True, force=force, keep_models=True, on_estimate=lambda e: print(e.format() + "\n", flush=True))
    results = run_batch(config, clips, root, runner, config_dir=config_dir)
    if any(r.status == "interrupted" for r in results):
        print(f"\ninterrupted. Finished work is kept; run `{hint}` again to continue (finished clips are skipped).", file=sys.stderr)
        print(format_summary(results))
        return 130
    print()
    print(format_summary(results))
    print(f"(also in {os.path.join(root, BATCH_FILE)})")
    return 0 if all(r.status == "done" for r in results) else 1


def cmd_run(args: argparse.Namespace) -> int:
    """Render a video from a runner config; rerunning the same config resumes (on any number of processes)."""
    from .distributed import Cluster, env_world_size

    config = load_config(args.config)
    hint = f"diffsynth run {args.config}"
    worker_args = []
    if args.output_folder:  # a command-line path: relative to the working directory
        config["data"]["output_folder"] = os.path.abspath(args.output_folder)
        hint += f" --output-folder {args.output_folder}"
        worker_args += ["--output-folder", config["data"]["output_folder"]]
    if args.dist_timeout is not None:
        worker_args += ["--dist-timeout", str(args.dist_timeout)]
    if args.force:
        worker_args += ["--force"]
    if args.nproc_per_node is not None:
        if args.input is not None:
            raise ValueError("--input and --nproc-per-node do not go together yet: a batch of clips renders in one process")
        if env_world_size() > 1:
            raise ValueError("--nproc-per-node starts the processes itself: under torchrun, leave it out")
        from .distributed.launch import launch

        return launch(args.config, args.nproc_per_node, args.max_restarts or 0, worker_args, (config.get("models") or {}).get("device"))
    if args.max_restarts is not None:
        raise ValueError("--max-restarts goes with --nproc-per-node (under torchrun, give torchrun --max-restarts)")
    config_dir = os.path.dirname(os.path.abspath(args.config))
    if args.input is not None:
        if env_world_size() > 1:
            raise ValueError("--input renders its clips in one process: run it without torchrun (or render each clip's config with --nproc-per-node)")
        return _render_batch(config, args.input, config_dir, force=args.force, hint=f"{hint} --input {args.input!r}")
    if env_world_size() == 1:
        return _render(config, f"run `{hint}` again", config_dir=config_dir, force=args.force)
    cluster = Cluster.from_env(device=(config.get("models") or {}).get("device"), timeout=args.dist_timeout)
    try:
        return _render(config, "run the same command again", config_dir=config_dir, cluster=cluster, force=args.force)
    finally:
        cluster.close()


def cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate a runner config: the same pre-flight checks as ``run``, then the estimate; nothing is written."""
    import json

    from .cache.manifest import Manifest
    from .estimate import estimate_plan
    from .pipelines.runner import SDVideoPipelineRunner

    config = load_config(args.config)
    if args.output_folder:
        config["data"]["output_folder"] = os.path.abspath(args.output_folder)
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    plan = runner.prepare(config, os.path.dirname(os.path.abspath(args.config)))
    out = plan["config"]["data"]["output_folder"]
    keys = runner.stage_keys(plan)
    estimate = estimate_plan(plan, device=args.device, world=args.nproc_per_node, calibrate=args.calibrate,
                             manifest=Manifest(out, writable=False), keys=keys)
    print(json.dumps(estimate.as_json(), indent=1) if args.json else estimate.format())
    return 0


_INTERMEDIATES = ("source_images", "controlnet_caches", "prompt", "latents", "smoothed", "smoother")
_FINAL = ("frames", *VIDEO_FILE_NAMES)
_RUN_FILES = ("manifest.json", "last_process_id.txt")



def stage_table(out: str, config: dict | None = None, check_keys: bool = True, config_dir: str | None = None) -> dict:
    """What ``diffsynth status`` shows: per stage its status, frames done, bytes on disk and whether its key is valid.

    ``config`` defaults to ``out/config.json``, the config of the last run; the keys are
    recomputed from it (inputs are opened, no model is loaded) and compared with those the
    manifest recorded: ``stale`` means a rerun of that config recomputes the stage.
    ``check_keys=False`` skips that (the key column shows ``-``): opening a long input video
    counts its frames by decoding, too slow for a page that refreshes every few seconds.
    Relative paths in ``config`` resolve against ``config_dir`` first (default: ``out`` when
    the config is ``out/config.json``), then the working directory, as ``diffsynth run`` does.
    """
    import json

    from .cache.manifest import STAGES, Manifest
    from .pipelines.runner import SDVideoPipelineRunner
    from .pipelines.stages import STAGE_TABLE, StageView

    if not os.path.isfile(os.path.join(out, "manifest.json")) and not os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(f"{out} is not a runner output folder (it has no manifest.json or config.json)")
    manifest = Manifest(out)
    if config is None and os.path.isfile(os.path.join(out, "config.json")):
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config_dir = out
    keys, key_problem, n = None, None, manifest.data["stages"].get("0", {}).get("frames")
    if config is not None and not check_keys and n is None:
        spec = config.get("data", {}).get("input_frames") or {}
        if isinstance(spec.get("end_frame_id"), int):
            n = spec["end_frame_id"] - (spec.get("start_frame_id") or 0)
    if config is not None and check_keys:
        try:
            plan = SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config, config_dir)
            keys, n = SDVideoPipelineRunner.stage_keys(plan), plan["num_frames"]
        except (ValueError, OSError) as exc:
            key_problem = str(exc)
    inputs = (config or {}).get("pipeline", {}).get("pipeline_inputs", {})
    record4 = manifest.data["stages"].get("4", {})
    steps = record4.get("steps", inputs.get("num_inference_steps", 20))
    view = StageView(config or {}, n, out)
    final_smoothing = view.final_smoothing
    latents = os.path.join(out, "latents")
    folders = {stage.id: stage.files(view) for stage in STAGE_TABLE}  # the table says where each stage's files are

    def frames_done(sid: int, record: dict) -> str:
        if n is None:
            return "-"
        if sid == 1:
            units = len((config or {}).get("models", {}).get("controlnet_units", []))
            if not units:
                return "-"
            return f"{sum(count_frame_files(os.path.join(out, 'controlnet_caches', str(k))) for k in range(units))}/{n * units}"
        if sid == 4:
            done = record.get("steps_done", 0)
            if record.get("status") == "done":
                return f"{done}/{steps} steps"
            partial = count_frame_files(os.path.join(latents, f"step_{done + 1:03d}"))
            return f"{done}/{steps} steps" + (f", {partial}/{n} of step {done + 1}" if partial else "")
        if sid in (2, 9) or (sid == 8 and not final_smoothing):
            return "-"
        folder = folders[sid][0] if folders[sid] else None
        if folder is None or not os.path.isdir(os.path.join(out, folder)):
            return "-"
        return f"{count_frame_files(os.path.join(out, folder))}/{n}"

    rows = []
    for sid, name in STAGES:
        record = manifest.data["stages"].get(str(sid), {})
        size = sum(path_bytes(os.path.join(out, f)) for f in folders[sid] if os.path.exists(os.path.join(out, f)))
        status = {"done": "done", "running": "partial"}.get(record.get("status"), "pending")
        if status == "pending" and size:
            status = "partial"
        recorded = record.get("key")
        key = "-" if recorded is None or keys is None else ("valid" if recorded == keys[sid] else "stale")
        note = record.get("skipped") or record.get("note") or ""
        if status == "done" and not size and not note and folders[sid]:
            note = "consumed by denoising" if sid == 3 else "files deleted once used"
        predicted = ((manifest.data.get("estimate") or {}).get("stages") or {}).get(str(sid))
        rows.append({"id": sid, "name": name, "status": status, "frames": frames_done(sid, record), "bytes": size, "key": key, "note": note,
                     "seconds": record.get("seconds"), "measured": record.get("measured"), "predicted": predicted})
    previous = os.path.join(out, PREVIOUS_FOLDER)
    kept = [os.path.join(previous, d) for d in sorted(os.listdir(previous)) if not d.startswith(".")] if os.path.isdir(previous) else []
    return {"out": out, "frames": n, "rows": rows, "last_done": manifest.last_done(), "key_problem": key_problem, "total_bytes": path_bytes(out),
            "previous": [{"path": p, "bytes": path_bytes(p)} for p in kept], "distributed": manifest.data.get("distributed"),
            "source": manifest.data.get("source")}


def format_stage_table(table: dict) -> str:
    lines = [f"{table['out']}: {table['frames'] if table['frames'] is not None else '?'} frames, "
             f"last finished stage {table['last_done']} (last_process_id.txt), {human_bytes(table['total_bytes'])} on disk"]
    header = f"{'id':>2}  {'stage':<24} {'status':<8} {'frames':<26} {'disk':>10}  {'time':>12}  {'key':<6} note"
    lines += [header, "-" * len(header)]
    for r in table["rows"]:
        spent = human_seconds(r["seconds"]) if r.get("seconds") is not None else "-"
        lines.append(f"{r['id']:>2}  {r['name']:<24} {r['status']:<8} {r['frames']:<26} {human_bytes(r['bytes']):>10}  {spent:>12}  {r['key']:<6} "
                     f"{r['note']}".rstrip())
    if table["key_problem"]:
        lines.append(f"keys not checked: {table['key_problem']}")
    lines += _source_lines(table.get("source"))
    shares = table.get("distributed")
    if shares:
        where = "" if shares.get("shared_folder", True) else "; output folders local to each machine, the final frames gathered in rank 0's"
        lines.append(f"last run on {shares['world_size']} processes ({shares['windows']} denoising windows per step{where}):")
        for r in shares["ranks"]:
            first, stop = r["frames"]
            windows = f"windows {r['windows'][0]}-{r['windows'][1] - 1}" if r["windows"][1] > r["windows"][0] else "no windows"
            lines.append(f"  rank {r['rank']} on {r['host']}: frames {first}-{stop - 1} ({stop - first}), {windows}")
    if any(r.get("predicted") for r in table["rows"]):
        lines += ["", "predicted (estimate before the run) vs measured:", *_comparison_lines(table["rows"])]
    for kept in table.get("previous", []):
        lines.append(f"previous render kept: {kept['path']} ({human_bytes(kept['bytes'])}; `diffsynth clean {table['out']} --previous` removes it)")
    return "\n".join(lines)


def _source_lines(source: dict | None) -> list[str]:
    """The input as decoded and the video as written (the manifest's ``source`` record), and the warnings the run gave."""
    if not source:
        return []
    lines = []
    given = source.get("input")
    if given:
        decoded = given.get("decoded_frames")
        claimed = given.get("header_frames")
        counted = f"{decoded} decode" if decoded is not None else "not all counted (a frame range)"
        lines.append(f"input: {given['file']}: {given.get('rate') or '?'} fps{' (variable, average)' if given.get('variable') else ''}, "
                     f"header claims {claimed if claimed is not None else '?'} frames, {counted}; audio: {'; '.join(given.get('audio_streams') or []) or 'none'}")
    audio = source.get("audio")
    sound = f"audio from {audio['file']} {audio['start']:.3f}-{audio['start'] + audio['duration']:.3f} s" if audio else "no audio"
    video = source.get("video") or "no video (PNG frames only)"
    lines.append(f"output: {video}, {source.get('codec')}, {source.get('fps_text') or source.get('fps')}, {source.get('frames')} frames, {sound}")
    lines += [f"warning: {note}" for note in source.get("notes") or []]
    return lines


def _comparison_lines(rows: list[dict]) -> list[str]:
    """Per stage, measured / est. of time, the output folder's peak and the resident memory's peak (``-``: not measured)."""
    def pair(measured, predicted, fmt) -> str:
        left = fmt(measured) if measured is not None else "-"
        right = fmt(predicted) if predicted is not None else "-"
        return f"{left} / est. {right}"

    # Rows by stage name only: the stage table above keeps the one row per stage id that scripts read.
    header = f"{'stage':<24} {'time':>24}  {'disk peak':>26}  {'RAM peak':>26}"
    lines = [header, "-" * len(header)]
    for r in rows:
        predicted, measured = r.get("predicted") or {}, r.get("measured") or {}
        if not predicted and not measured:
            continue
        lines.append(f"{r['name']:<24} {pair(measured.get('seconds'), predicted.get('seconds'), human_seconds):>24}  "
                     f"{pair(measured.get('disk_peak_bytes'), predicted.get('disk_peak_bytes'), human_bytes):>26}  "
                     f"{pair(measured.get('ram_peak_bytes'), predicted.get('ram_peak_bytes'), human_bytes):>26}")
        if predicted.get("device_peak_bytes") is not None or measured.get("device_peak_bytes") is not None:
            lines.append(f"{'  device memory':<24} {pair(measured.get('device_peak_bytes'), predicted.get('device_peak_bytes'), human_bytes):>24}")
    measured = [r["measured"] for r in rows if r.get("measured")]
    predicted = [r["predicted"] for r in rows if r.get("predicted")]
    if measured and predicted:
        lines.append(f"{'total':<24} {pair(sum(m.get('seconds', 0.0) for m in measured), sum(p.get('seconds', 0.0) for p in predicted), human_seconds):>24}  "
                     f"{pair(max(m.get('disk_peak_bytes', 0) for m in measured), max(p.get('disk_peak_bytes', 0) for p in predicted), human_bytes):>26}  "
                     f"{pair(max(m.get('ram_peak_bytes', 0) for m in measured), max(p.get('ram_peak_bytes', 0) for p in predicted), human_bytes):>26}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else None
    table = stage_table(args.output_dir, config, config_dir=os.path.dirname(os.path.abspath(args.config)) if args.config else None)
    print(format_stage_table(table))
    if any(r["status"] != "done" or r["key"] == "stale" for r in table["rows"]):
        print(f"\nto continue (or update) this render: diffsynth run {args.config or os.path.join(args.output_dir, 'config.json')}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Delete the intermediates (``--keep-final``: keep frames/, video.mp4, previous/, config and manifest), only the render a
    changed config moved to ``previous/`` (``--previous``), or everything but config.json."""
    import shutil

    from .utils.atomic import is_temp_name

    out = args.output_dir
    if not os.path.isfile(os.path.join(out, "manifest.json")) and not os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(f"{out} is not a runner output folder (it has no manifest.json or config.json); nothing removed")
    if args.previous:
        names = [PREVIOUS_FOLDER]
    else:
        names = list(_INTERMEDIATES) + ([] if args.keep_final else list(_FINAL) + [PREVIOUS_FOLDER] + list(_RUN_FILES))
        names += [n for n in os.listdir(out) if is_temp_name(n)]  # left by a killed run
    freed = 0
    for name in names:
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        freed += path_bytes(path)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"removed {path}")
    kept = ("everything else" if args.previous else
            "frames/, video.mp4, previous/, config.json and manifest.json" if args.keep_final else "config.json")
    print(f"freed {human_bytes(freed)}; kept {kept}")
    return 0


def _demo_project(folder: str, args: argparse.Namespace) -> dict:
    """The demo's tiny project, written once and reused, so that a rerun resumes instead of starting over

    (new model files would be new inputs: their cache keys, which include file times, would change)."""
    import json

    from .testing.runner_files import write_tiny_project
    from .utils.atomic import atomic_write_text

    path = os.path.join(folder, "demo_project.json")
    shape = {"frames": args.frames, "size": args.size}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("shape") == shape and all(os.path.exists(p) for p in saved["config"]["models"]["model_list"]):
            config = saved["config"]
        else:
            saved = None
    else:
        saved = None
    if saved is None:
        config = write_tiny_project(folder, frames=args.frames, size=args.size, smoother=True, steps=args.steps)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(path, json.dumps({"shape": shape, "config": config}, indent=2))
    config["models"]["device"] = args.device
    config["pipeline"]["seed"] = args.seed
    config["pipeline"]["pipeline_inputs"]["num_inference_steps"] = args.steps
    return config


def cmd_demo(args: argparse.Namespace) -> int:
    """Self-check of the install: the full 10-stage video runner on tiny seeded random-weight models and a generated clip."""
    from PIL import Image

    from .utils.atomic import atomic_save_image

    folder = args.folder or os.path.dirname(os.path.abspath(args.out))
    print("diffsynth demo: SELF-CHECK OF THE INSTALL, NOT ART.")
    print("It writes tiny random-weight models in real formats (SD checkpoint, AnimateDiff motion module,")
    print("2 ControlNets, a textual inversion; no download) and a short generated clip, then renders the")
    print("clip through all 10 stages of the Diffutoon runner, FastBlend smoother included. Expect coloured noise.")
    config = _demo_project(folder, args)
    out = config["data"]["output_folder"]
    print(f"Output: {out}. Press Ctrl-C at any time and run `diffsynth demo` again: it continues where it stopped.")
    code = _render(config, "run `diffsynth demo` again")
    print()
    print(format_stage_table(stage_table(out)))
    if code:
        return code
    first = sorted(n for n in os.listdir(os.path.join(out, "frames")) if n.endswith(".png"))[0]
    with Image.open(os.path.join(out, "frames", first)) as image:
        image.load()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_save_image(image, args.out)
    print(f"\nwrote {args.out} (the first frame, {image.size[0]}x{image.size[1]}) and {os.path.join(out, 'video.mp4')}. The install works.")
    print(f"Run `diffsynth demo` again: nothing is recomputed. `diffsynth status {out}` shows the stages; "
          f"`diffsynth clean {out}` removes the render.")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download catalogue files, all files of an example, or a URL; resumable, verified (diffsynth/download.py)."""
    from tqdm import tqdm

    from .download import DownloadError, download, files_for, format_catalogue

    if args.list:
        print(format_catalogue())
        return 0
    if not args.items:
        raise ValueError("name a model file, an example or a URL (`diffsynth download --list` shows the names)")
    if args.sha256 and len(args.items) != 1:
        raise ValueError("--sha256 checks one file; give one NAME or URL with it")
    jobs = []  # (url, destination path, catalogue sha256, catalogue size, manual note)
    for item in args.items:
        if item.startswith(("http://", "https://")):
            if args.to is None:
                raise ValueError(f"give --to FOLDER for a URL download ({item})")
            name = args.name or os.path.basename(item.split("?")[0].rstrip("/"))
            if not name:
                raise ValueError(f"cannot tell a file name from {item}; give --name FILE")
            jobs.append((item, os.path.join(args.to, name), None, None, None))
        else:
            try:
                entries = files_for([item])
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
            jobs += [(e.url, e.path(args.to or "models"), e.sha256, e.size, e.manual) for e in entries]
    failed = 0
    for url, dest, sha256, size, manual in jobs:
        if manual and not os.path.exists(dest):
            print(f"error: {os.path.basename(dest)}: {manual}.\n  link: {url}\n  path: {dest}", file=sys.stderr)
            failed += 1
            continue
        try:
            result = download(url, dest, sha256=args.sha256 or sha256, size=size, overwrite=args.overwrite,
                              retries=args.retries, progress_bar_cmd=tqdm, offline=bool(manual))
        except DownloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{result.status}: {result.path} ({result.size:,} bytes; verified: {result.verified})"
              + (f"\n  sha256 {result.sha256}" if result.sha256 else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .schedulers.base import SAMPLER_HELP, sampler_names

    parser = argparse.ArgumentParser(prog="diffsynth", description="DiffSynth Studio, disk-cache edition")
    parser.add_argument("--version", action="version", version=f"diffsynth {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what a model file is (family, dtype, parameters), or a video (frames, exact frame rate, audio)")
    p.add_argument("file", help="a model file or folder, or a video file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("txt2img", help="render one image from a prompt")
    p.add_argument("--model", action="append", required=True, help="checkpoint, VAE or LoRA file / diffusers folder; repeat for several")
    p.add_argument("--lora-alpha", type=float, action="append", default=[], help="strength of each LoRA file, in order")
    p.add_argument("--textual-inversion-folder", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, help="output PNG path (written atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim", choices=sampler_names(), help=SAMPLER_HELP)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--device", default=None, help="cuda, cpu, mps, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 otherwise)")
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("run", help="render a video from a runner config (.json or .yaml); rerun the same command to resume")
    p.add_argument("config", help="DiffSynth-Studio runner config: models, data, pipeline, smoother_configs")
    p.add_argument("--output-folder", default=None, metavar="DIR", help="render into DIR instead of the config's data.output_folder")
    p.add_argument("--input", default=None, metavar="GLOB|FOLDER",
                   help="render each clip (a glob in quotes, e.g. 'clips/*.mp4', or a folder of videos) with this config into OUTPUT/<clip name>/; "
                        "models load once, each clip resumes on its own, a summary table follows")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="render on N processes of this machine (one per GPU), started by torchrun's launcher; see README 'Several GPUs or machines'")
    p.add_argument("--max-restarts", type=int, default=None, metavar="K", help="with --nproc-per-node: restart the processes up to K times when one dies")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="several processes: how long a silent process is waited for before all stop (default 600, or $DIFFSYNTH_DIST_TIMEOUT)")
    p.set_defaults(func=cmd_run)

    p.add_argument("--force", action="store_true", help="run even when the estimate says the output folder's disk cannot hold the render")

    p = sub.add_parser("estimate", help="disk, RAM, device memory and time of a runner config, per stage, before anything runs")
    p.add_argument("config", help="runner config (.json or .yaml)")
    p.add_argument("--output-folder", default=None, metavar="DIR", help="estimate for DIR instead of the config's data.output_folder")
    p.add_argument("--device", default=None, help="estimate for this device (default: the config's models.device)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="estimate a run on N processes (per process: the largest share)")
    p.add_argument("--calibrate", action="store_true", help="load the models and time a few real units at the run's size first (seconds)")
    p.add_argument("--json", action="store_true", help="print one JSON object (stages, total, fits, sources)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("status", help="stage table of a runner output folder: done/partial/pending, frames, disk, cache keys")
    p.add_argument("output_dir")
    p.add_argument("--config", default=None, help="check the cache keys against this config instead of OUTPUT_DIR/config.json")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("clean", help="delete a runner output folder's generated files (all but config.json), previous/ included")
    p.add_argument("output_dir")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--keep-final", action="store_true", help="delete only the intermediates; keep frames/, video.mp4, previous/, config.json and manifest.json")
    mode.add_argument("--previous", action="store_true", help="delete only previous/: the finished render that a changed config moved aside")
    p.set_defaults(func=cmd_clean)

    from .extensions.FastBlend.cli import add_fastblend_arguments

    add_fastblend_arguments(sub.add_parser("fastblend", help="deflicker a folder of stylized frames against the guide video (FastBlend)"))

    p = sub.add_parser("download", help="download model files the examples need (or any URL): resumable, size/sha256-verified")
    p.add_argument("items", nargs="*", metavar="NAME|EXAMPLE|URL", help="a catalogue file name (see --list), an example name (all its files) or a URL")
    p.add_argument("--to", default=None, metavar="DIR", help="for names: the models folder (default: models; files go to DIR/<folder>/); for a URL: the folder to put the file in (required)")
    p.add_argument("--sha256", default=None, metavar="HEX", help="expected SHA-256 of the file; on a mismatch nothing is kept")
    p.add_argument("--name", default=None, help="file name for a URL download (default: the last part of the URL path)")
    p.add_argument("--overwrite", action="store_true", help="download again even if the file is present (it is replaced only once the new one is verified)")
    p.add_argument("--retries", type=int, default=3, help="resume a broken transfer this many times before giving up (default 3)")
    p.add_argument("--list", action="store_true", help="list the known model files and examples")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("demo", help="self-check: the full video runner on tiny random models and a generated clip (no downloads)")
    p.add_argument("--out", default="demo_output/demo.png", help="where to save the first output frame (PNG)")
    p.add_argument("--folder", default=None, help="project folder: models, input clip, output/ (default: the folder of --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # includes ModelFileError: messages are written for users
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
