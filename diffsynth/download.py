"""Model downloads: a catalogue of the files the examples need, and a resumable, verified downloader.

``download(url, dest)`` streams into a hidden partial file next to ``dest``
(``.<name>.partial.tmp``), resumes it with an HTTP ``Range`` request when a
transfer was cut, checks the size (and the SHA-256 when one is known) and only
then renames it to ``dest``. A file that fails a check is deleted, so nothing
unverified ever sits under the final name. Only the standard library is used
(``urllib``); progress goes to a tqdm bar and/or a :mod:`diffsynth.progress` callback.

About the expected sizes and hashes: this project has no network access to the
model hosts, so the catalogue records no size or SHA-256 it could not check
itself; every entry currently has neither. A download is then verified against
the size the server announces (``Content-Length``, or the total in
``Content-Range`` when resuming), which catches truncation but not a wrong file.
Pass ``sha256=`` (``--sha256`` on the command line) to check the content too, and
add a verified hash to the catalogue whenever one is known.

When the server sends ``Last-Modified``, the downloaded file gets that time as its
modification time (as ``curl -R`` does). The video runner identifies model files
by path, size and modification time, so downloading the same file again to the
same path (after a Colab runtime was recycled, say) keeps a render's cache valid.
"""
from __future__ import annotations

import dataclasses
import email.utils
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable

from .progress import ProgressCallback, ProgressEvent
from .utils.sizes import human_bytes

logger = logging.getLogger("diffsynth")

__all__ = [
    "CATALOGUE",
    "EXAMPLES",
    "DownloadError",
    "DownloadResult",
    "ModelFile",
    "download",
    "download_model",
    "ensure_models",
    "files_for",
    "lookup",
]

_HF_CONTROLNET = "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/"
_HF_ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"
_CHUNK = 1 << 20
_USER_AGENT = "diffsynth-download/1"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """One model file an example needs: where it goes under ``models/`` and where it comes from.

    ``size``/``sha256`` are set only when verified (see the module notes); ``manual``
    is set for hosts this helper cannot download from, and says how to get the file.
    """

    filename: str
    folder: str
    url: str
    source: str
    size: int | None = None
    sha256: str | None = None
    manual: str | None = None

    def path(self, models_dir: str = "models") -> str:
        return os.path.join(models_dir, self.folder, self.filename)


_FILES = (
    ModelFile("aingdiffusion_v12.safetensors", "stable_diffusion",
              "https://civitai.com/api/download/models/229575?type=Model&format=SafeTensor&size=full&fp=fp16",
              "civitai, AingDiffusion v12 (fp16); the Diffutoon base model"),
    ModelFile("dreamshaper_8.safetensors", "stable_diffusion",
              "https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16",
              "civitai, DreamShaper 8 (pruned fp16)"),
    ModelFile("flat2DAnimerge_v45Sharp.safetensors", "stable_diffusion",
              "https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16",
              "civitai, Flat-2D Animerge v4.5 sharp (pruned fp16)"),
    ModelFile("sd_xl_base_1.0.safetensors", "stable_diffusion_xl",
              "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
              "Hugging Face, stabilityai/stable-diffusion-xl-base-1.0"),
    ModelFile("bluePencilXL_v200.safetensors", "stable_diffusion_xl",
              "https://civitai.com/api/download/models/245614?type=Model&format=SafeTensor&size=pruned&fp=fp16",
              "civitai, blue_pencil-XL v2.0.0 (pruned fp16)"),
    ModelFile("sd_xl_turbo_1.0_fp16.safetensors", "stable_diffusion_xl_turbo",
              "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
              "Hugging Face, stabilityai/sdxl-turbo"),
    ModelFile("mm_sd_v15_v2.ckpt", "AnimateDiff",
              "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
              "Hugging Face, guoyww/animatediff (motion module v2)"),
    # LCM models for the "lcm" sampler. Both LCM-LoRAs are called pytorch_lora_weights.safetensors on
    # Hugging Face; the catalogue names are how diffsynth.models.detect.lcm_file_kind recognises them.
    ModelFile("AnimateLCM_sd15_t2v.ckpt", "AnimateDiff",
              "https://huggingface.co/wangfuyun/AnimateLCM/resolve/main/AnimateLCM_sd15_t2v.ckpt",
              "Hugging Face, wangfuyun/AnimateLCM (AnimateLCM motion module, for the LCM sampler)"),
    ModelFile("lcm-lora-sdv1-5.safetensors", "lora",
              "https://huggingface.co/latent-consistency/lcm-lora-sdv1-5/resolve/main/pytorch_lora_weights.safetensors",
              "Hugging Face, latent-consistency/lcm-lora-sdv1-5 (LCM-LoRA for SD 1.5; pytorch_lora_weights.safetensors there)"),
    ModelFile("lcm-lora-sdxl.safetensors", "lora",
              "https://huggingface.co/latent-consistency/lcm-lora-sdxl/resolve/main/pytorch_lora_weights.safetensors",
              "Hugging Face, latent-consistency/lcm-lora-sdxl (LCM-LoRA for SDXL; pytorch_lora_weights.safetensors there)"),
    ModelFile("AnimateLCM_sd15_t2v_lora.safetensors", "lora",
              "https://huggingface.co/wangfuyun/AnimateLCM/resolve/main/AnimateLCM_sd15_t2v_lora.safetensors",
              "Hugging Face, wangfuyun/AnimateLCM (AnimateLCM's LoRA, used with its motion module)"),
    ModelFile("control_v11f1e_sd15_tile.pth", "ControlNet", _HF_CONTROLNET + "control_v11f1e_sd15_tile.pth",
              "Hugging Face, lllyasviel/ControlNet-v1-1"),
    ModelFile("control_v11p_sd15_lineart.pth", "ControlNet", _HF_CONTROLNET + "control_v11p_sd15_lineart.pth",
              "Hugging Face, lllyasviel/ControlNet-v1-1"),
    ModelFile("control_v11p_sd15_softedge.pth", "ControlNet", _HF_CONTROLNET + "control_v11p_sd15_softedge.pth",
              "Hugging Face, lllyasviel/ControlNet-v1-1"),
    ModelFile("control_v11f1p_sd15_depth.pth", "ControlNet", _HF_CONTROLNET + "control_v11f1p_sd15_depth.pth",
              "Hugging Face, lllyasviel/ControlNet-v1-1"),
    ModelFile("sk_model.pth", "Annotators", _HF_ANNOTATORS + "sk_model.pth",
              "Hugging Face, lllyasviel/Annotators (lineart annotator)"),
    ModelFile("sk_model2.pth", "Annotators", _HF_ANNOTATORS + "sk_model2.pth",
              "Hugging Face, lllyasviel/Annotators (coarse lineart; the original's examples list it, this edition does not read it)"),
    ModelFile("ControlNetHED.pth", "Annotators", _HF_ANNOTATORS + "ControlNetHED.pth",
              "Hugging Face, lllyasviel/Annotators (softedge annotator)"),
    ModelFile("dpt_hybrid-midas-501f0c75.pt", "Annotators", _HF_ANNOTATORS + "dpt_hybrid-midas-501f0c75.pt",
              "Hugging Face, lllyasviel/Annotators (depth annotator, MiDaS DPT-hybrid)"),
    ModelFile("verybadimagenegative_v1.3.pt", "textual_inversion",
              "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
              "civitai, verybadimagenegative v1.3 (negative embedding)"),
    ModelFile("flownet.pkl", "RIFE",
              "https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing",
              "Google Drive, Practical-RIFE v4 IFNet weights (link from DiffSynth-Studio)",
              manual="Google Drive serves a web page, not the file, to scripts: open the link in a browser, "
                     "download the file and put it at the path shown"),
)
CATALOGUE: dict[str, ModelFile] = {f.filename: f for f in _FILES}

# Which catalogue files each example needs (the notebook: the original's 11 files minus
# sk_model2.pth, the coarse-lineart weights, which this edition never reads).
_DIFFUTOON = ("aingdiffusion_v12.safetensors", "mm_sd_v15_v2.ckpt", "control_v11f1e_sd15_tile.pth",
              "control_v11p_sd15_lineart.pth", "sk_model.pth", "verybadimagenegative_v1.3.pt")
_EDITING = ("control_v11p_sd15_softedge.pth", "control_v11f1p_sd15_depth.pth", "ControlNetHED.pth", "dpt_hybrid-midas-501f0c75.pt")
EXAMPLES: dict[str, tuple[str, ...]] = {
    "examples/Diffutoon.ipynb": _DIFFUTOON + _EDITING,
    "examples/diffutoon_toon_shading.py": _DIFFUTOON,
    "examples/diffutoon_toon_shading_with_editing_signals.py": _DIFFUTOON + _EDITING,
    "examples/sd_text_to_image.py": ("aingdiffusion_v12.safetensors", "control_v11f1e_sd15_tile.pth",
                                     "control_v11p_sd15_lineart.pth", "sk_model.pth"),
    "examples/sd_toon_shading_image.py": ("flat2DAnimerge_v45Sharp.safetensors", "control_v11f1e_sd15_tile.pth",
                                          "control_v11p_sd15_lineart.pth", "sk_model.pth", "verybadimagenegative_v1.3.pt"),
    "examples/sd_toon_shading.py": ("flat2DAnimerge_v45Sharp.safetensors", "mm_sd_v15_v2.ckpt", "control_v11f1e_sd15_tile.pth",
                                    "control_v11p_sd15_lineart.pth", "sk_model.pth", "verybadimagenegative_v1.3.pt", "flownet.pkl"),
    "examples/sd_text_to_video.py": ("dreamshaper_8.safetensors", "mm_sd_v15_v2.ckpt", "flownet.pkl"),
    "examples/sd_video_rerender.py": ("dreamshaper_8.safetensors", "control_v11f1p_sd15_depth.pth",
                                      "control_v11p_sd15_softedge.pth", "dpt_hybrid-midas-501f0c75.pt", "ControlNetHED.pth"),
    "examples/sdxl_text_to_image.py": ("bluePencilXL_v200.safetensors",),
    "examples/sdxl_turbo.py": ("sd_xl_turbo_1.0_fp16.safetensors",),
    "examples/sd_prompt_refining.py": ("sd_xl_base_1.0.safetensors",),
}


def _example_key(name: str) -> str | None:
    for path in EXAMPLES:
        if name in (path, os.path.basename(path), os.path.splitext(os.path.basename(path))[0]):
            return path
    return None


def lookup(name: str) -> ModelFile:
    """The catalogue entry for a file name (``control_v11p_sd15_lineart.pth``), its stem (``control_v11p_sd15_lineart``)
    or the ``folder/file`` form that ``--list`` prints (``ControlNet/control_v11p_sd15_lineart.pth``, ``models/`` allowed in front)."""
    parts = name.replace("\\", "/").strip("/").split("/")
    if len(parts) > 1:
        entry = CATALOGUE.get(parts[-1])
        folder = parts[-2]
        if entry is not None and entry.folder == folder:
            return entry
        if entry is not None:
            raise KeyError(f"{name!r}: {parts[-1]} belongs in {entry.folder}/, not {folder}/ (`diffsynth download --list` shows the names)")
    if name in CATALOGUE:
        return CATALOGUE[name]
    stems = [f for f in CATALOGUE.values() if os.path.splitext(f.filename)[0] == name]
    if len(stems) == 1:
        return stems[0]
    raise KeyError(f"{name!r} is neither a model file in the catalogue nor an example; `diffsynth download --list` shows them")


def files_for(names: Iterable[str]) -> list[ModelFile]:
    """Catalogue entries for file names, stems or example names (``Diffutoon``, ``examples/sd_video_rerender.py``), without repeats."""
    out: dict[str, ModelFile] = {}
    for name in names:
        example = _example_key(name)
        entries = [CATALOGUE[f] for f in EXAMPLES[example]] if example else [lookup(name)]
        for entry in entries:
            out.setdefault(entry.filename, entry)
    return list(out.values())


# --------------------------------------------------------------------------- downloading


class DownloadError(RuntimeError):
    """A download failed; the message names the URL or file, what went wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    path: str
    size: int
    status: str  # "downloaded" or "present"
    verified: str  # what the file was checked against, in words
    sha256: str | None = None  # of the file, when it was computed


def _partial_paths(dest: str) -> tuple[str, str]:
    folder, name = os.path.split(os.path.abspath(dest))
    # Names recognised by utils.atomic.is_temp_name ("." prefix, ".tmp" suffix) as leftovers of a writer.
    return os.path.join(folder, f".{name}.partial.tmp"), os.path.join(folder, f".{name}.partial.json.tmp")


def _human(n: int | None) -> str:
    return "unknown size" if n is None else human_bytes(n)


def _sha256_of(path: str, upto: int | None = None) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = upto
        while remaining is None or remaining > 0:
            block = f.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest


def _with_token(url: str) -> str:
    """civitai refuses many anonymous downloads; ``CIVITAI_API_TOKEN`` is added as the ``token`` query parameter.

    A query parameter, not an Authorization header: urllib would forward the header through
    civitai's redirect to the storage host, whose signed URLs reject requests carrying one.
    """
    token = os.environ.get("CIVITAI_API_TOKEN")
    parts = urllib.parse.urlsplit(url)
    if not token or not parts.hostname or not parts.hostname.endswith("civitai.com"):
        return url
    query = urllib.parse.urlencode(urllib.parse.parse_qsl(parts.query) + [("token", token)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _http_error(url: str, exc: urllib.error.HTTPError) -> DownloadError:
    hints = {
        401: " civitai needs an API key for this file: create one in your civitai account settings and set CIVITAI_API_TOKEN.",
        403: " The host refused access (a login, an API key such as CIVITAI_API_TOKEN, or accepting a licence on the model page may be needed).",
        404: " The file is not (or no longer) at this address; look for it on the model's page.",
        429: " The host is rate-limiting; wait a few minutes and run the same command again (the partial file is kept).",
    }
    hint = hints.get(exc.code, " Run the same command again later; a partial file is kept and resumed." if exc.code >= 500 else "")
    return DownloadError(f"HTTP {exc.code} {exc.reason} from {url}.{hint}")


def _open(url: str, start: int, validator: str | None, timeout: float):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator  # a changed remote file comes back whole (200), not spliced
    return urllib.request.urlopen(urllib.request.Request(_with_token(url), headers=headers), timeout=timeout)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000); unknown total -> None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _remote_size(url: str, timeout: float) -> int | None:
    """The size the server announces for ``url`` (asked with a one-byte range request), or None if it announces none."""
    request = urllib.request.Request(_with_token(url), headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # headers only; the body is not read
            if response.status == 206:
                return _parse_content_range(response.headers.get("Content-Range"))[1]
            length = response.headers.get("Content-Length")
            return int(length) if length is not None else None
    except urllib.error.HTTPError as exc:
        raise _http_error(url, exc) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"network failure while checking the size of {url}: {exc}") from exc


def _read_state(state_path: str) -> dict:
    if not os.path.isfile(state_path):
        return {}
    with open(state_path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            logger.warning("ignoring the unreadable download state %s", state_path)
            return {}


def _write_state(state_path: str, state: dict) -> None:
    from .utils.atomic import atomic_write_text

    atomic_write_text(state_path, json.dumps(state), fsync=False)


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _lock(f) -> None:
    """Refuse a second concurrent download into the same partial file (POSIX; Windows has no flock)."""
    try:
        import fcntl
    except ImportError:  # Windows: two simultaneous downloads of one file are not detected there
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(f"another download into {f.name} is running; wait for it to finish") from None


def _check_present(dest: str, url: str, size: int | None, sha256: str | None, offline: bool, timeout: float) -> DownloadResult | str:
    """A DownloadResult if ``dest`` passes its check, else the reason it does not."""
    have = os.path.getsize(dest)
    if sha256:
        got = _sha256_of(dest).hexdigest()
        if got == sha256:
            return DownloadResult(dest, have, "present", "sha256", got)
        return f"its SHA-256 is {got}, expected {sha256}"
    if size is not None:
        if have == size:
            return DownloadResult(dest, have, "present", "size (catalogue)")
        return f"it has {have} bytes, expected {size}"
    if offline:
        return DownloadResult(dest, have, "present", "not verified (no known size or hash; offline)")
    remote = _remote_size(url, timeout)
    if remote is None:
        return DownloadResult(dest, have, "present", "not verified (the server announces no size)")
    if have == remote:
        return DownloadResult(dest, have, "present", "size (server Content-Length)")
    return f"it has {have} bytes, the server announces {remote}"


def download(
    url: str,
    dest: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    overwrite: bool = False,
    retries: int = 3,
    timeout: float = 60.0,
    progress_bar_cmd: Callable | None = None,
    callback: ProgressCallback | None = None,
    offline: bool = False,
) -> DownloadResult:
    """Download ``url`` to ``dest`` (a file path), resumably and verified.

    * ``dest`` already there: checked (SHA-256 if given, else ``size``, else the server's
      size) and kept; a file that fails the check raises, unless ``overwrite``, which
      downloads anew and replaces it only once the new file is verified.
    * A transfer that breaks resumes from the partial file with a ``Range`` request, up to
      ``retries`` times in this call, and again in a later call; a server that ignores
      ``Range`` makes it start over (said in the log).
    * At the end the size must equal ``size`` or the server's announced size, and the
      SHA-256 ``sha256``; on a mismatch the partial file is deleted and nothing is put
      under ``dest``.
    * ``progress_bar_cmd`` is a tqdm-like class (called with ``total=, unit="B", ...``);
      ``callback`` receives :class:`ProgressEvent` s in bytes (``total`` 0 = unknown).
    * ``offline``: never touch the network; a missing file raises.
    """
    dest = os.fspath(dest)
    sha256 = sha256.lower() if sha256 else None
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if os.path.isdir(dest):
        raise ValueError(f"{dest} is a folder; give the file path to download to")
    if os.path.exists(dest) and not overwrite:
        checked = _check_present(dest, url, size, sha256, offline, timeout)
        if isinstance(checked, DownloadResult):
            return checked
        raise DownloadError(f"{dest} exists but {checked}: it is not the expected file. Delete it (or pass "
                            f"overwrite=True / --overwrite) to download it again from {url}")
    if offline:
        raise DownloadError(f"{dest} is missing and downloads are disabled; download it from {url}")
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the folder {folder}: {exc}") from exc
    partial, state_path = _partial_paths(dest)
    with open(partial, "ab") as lock_handle:
        _lock(lock_handle)
        try:
            return _download_loop(url, dest, partial, state_path, sha256, size, retries, timeout, progress_bar_cmd, callback)
        except DownloadError:
            if os.path.exists(partial) and os.path.getsize(partial) == 0:  # nothing to resume: leave no empty file
                _remove(partial, state_path)
            raise


def _download_loop(url, dest, partial, state_path, sha256, size, retries, timeout, progress_bar_cmd, callback) -> DownloadResult:
    name = os.path.basename(dest)
    attempt = restarts = 0
    while True:
        try:
            return _transfer(url, dest, partial, state_path, name, sha256, size, timeout, progress_bar_cmd, callback)
        except _StartOver as exc:
            restarts += 1
            if restarts > 1:
                raise DownloadError(f"{url}: {exc} twice in a row; the remote file keeps changing. Try again later") from None
            logger.info("%s: %s; starting over", name, exc)
            os.truncate(partial, 0)
            _remove(state_path)
        except _Interrupted as exc:
            attempt += 1
            if attempt > retries:
                kept = f"{exc.kept} bytes are kept in {partial}; run the same command again to resume" if exc.kept else "run the same command again"
                raise DownloadError(f"network failure downloading {url}: {exc.reason}. {kept}") from exc.cause
            wait = min(30.0, 2.0 ** (attempt - 1))
            logger.warning("download of %s interrupted (%s); resuming from byte %d in %.0f s (retry %d of %d)",
                           name, exc.reason, exc.kept, wait, attempt, retries)
            time.sleep(wait)


class _StartOver(Exception):
    """The partial file does not belong to the remote file (it changed, or the partial is too long)."""


class _Interrupted(Exception):
    """The connection failed or closed early; the partial file holds ``kept`` good bytes."""

    def __init__(self, reason: str, kept: int, cause: BaseException | None = None):
        super().__init__(reason)
        self.reason, self.kept, self.cause = reason, kept, cause


def _transfer(url, dest, partial, state_path, name, sha256, size, timeout, progress_bar_cmd, callback) -> DownloadResult:
    have = os.path.getsize(partial)
    state = _read_state(state_path)
    if have and state.get("url") not in (None, url):
        raise _StartOver(f"the partial file came from {state.get('url')}, not this URL")
    validator = state.get("etag") or state.get("last_modified")
    try:
        response = _open(url, have, validator, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at or after the end: complete already, or longer than the file
            _, total = _parse_content_range(exc.headers.get("Content-Range"))
            if total == have:
                return _finish(dest, partial, state_path, name, have, total, size, sha256, None, state)
            raise _StartOver(f"the partial file ({have} bytes) is longer than the remote file ({total})") from exc
        raise _http_error(url, exc) from exc
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Interrupted(f"cannot connect ({reason})", have, exc) from exc
    with response:
        headers = response.headers
        status = response.status
        if status == 206:
            start, total = _parse_content_range(headers.get("Content-Range"))
            if start != have:
                raise DownloadError(f"{url} answered a request for bytes {have}- with {headers.get('Content-Range')!r}; "
                                    f"delete {partial} and try again")
            if state.get("total") not in (None, total):
                raise _StartOver(f"the remote file changed size ({state.get('total')} -> {total} bytes)")
        elif status == 200:
            if have:
                logger.warning("%s: the server sent the whole file instead of the rest (it does not resume downloads, "
                               "or the file changed since the partial download); starting over from byte 0", name)
            have = 0
            length = headers.get("Content-Length")
            total = int(length) if length is not None else None
        else:
            raise DownloadError(f"unexpected HTTP {status} {response.reason} from {url}")
        state = {"url": url, "total": total, "etag": _strong_etag(headers.get("ETag")),
                 "last_modified": headers.get("Last-Modified")}
        expected = size if size is not None else total
        if size is not None and total is not None and size != total:
            raise DownloadError(f"{url} announces {total} bytes but {name} should have {size} bytes; nothing was downloaded")
        _check_space(partial, expected, have)
        _write_state(state_path, state)
        digest = _sha256_of(partial, have) if have else hashlib.sha256()
        done = have
        bar = progress_bar_cmd(total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=name) if progress_bar_cmd else None
        try:
            with open(partial, "r+b") as out:
                out.seek(have)
                out.truncate()
                if callback is not None:
                    callback(ProgressEvent(f"download {name}", done, expected or 0))
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (socket.timeout, ConnectionError, http.client.HTTPException, OSError) as exc:
                        out.flush()
                        raise _Interrupted(f"the connection broke ({exc!r})", done, exc) from exc
                    if not block:
                        break
                    try:
                        out.write(block)
                    except OSError as exc:
                        out.flush()
                        raise _disk_error(exc, partial, expected, done) from exc
                    digest.update(block)
                    done += len(block)
                    if bar is not None:
                        bar.update(len(block))
                    if callback is not None:
                        callback(ProgressEvent(f"download {name}", done, expected or 0))
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _disk_error(exc, partial, expected, done) from exc
        finally:
            if bar is not None:
                bar.close()
    if total is not None and done < total:  # urllib returns b"" when a Content-Length body ends early
        raise _Interrupted(f"the server closed the connection after {done} of {total} bytes", done)
    return _finish(dest, partial, state_path, name, done, total, size, sha256, digest, state)


def _strong_etag(etag: str | None) -> str | None:
    return etag if etag and not etag.startswith("W/") else None  # If-Range accepts strong validators only


def _check_space(partial: str, expected: int | None, have: int) -> None:
    if expected is None:
        return
    folder = os.path.dirname(partial)
    free = shutil.disk_usage(folder).free
    if free < expected - have:
        raise DownloadError(f"not enough disk space in {folder}: {_human(expected - have)} more needed, "
                            f"{_human(free)} free. Free some space and run the same command again")


def _disk_error(exc: OSError, partial: str, expected: int | None, done: int) -> DownloadError:
    folder = os.path.dirname(partial)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        need = f"{_human(expected - done)} more needed; " if expected is not None else ""
        return DownloadError(f"the disk is full in {folder} ({need}{done} bytes kept in {partial}); "
                             "free some space and run the same command again to resume")
    return DownloadError(f"cannot write {partial}: {exc}")


def _finish(dest, partial, state_path, name, done, total, size, sha256, digest, state) -> DownloadResult:
    expected = size if size is not None else total
    if expected is not None and done != expected:
        _remove(partial, state_path)
        raise DownloadError(f"{name}: received {done} bytes, expected {expected}; the partial file was deleted and "
                            f"nothing was saved as {dest}. Run the same command again to download it anew")
    got = (digest if digest is not None else _sha256_of(partial)).hexdigest()
    if sha256 is not None and got != sha256:
        _remove(partial, state_path)
        raise DownloadError(f"{name}: SHA-256 mismatch (got {got}, expected {sha256}); the download was deleted and "
                            f"nothing was saved as {dest}. The file on the server differs from the one expected")
    modified = state.get("last_modified")
    if modified:
        try:
            stamp = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            logger.warning("%s: unreadable Last-Modified %r; the file keeps the download time", name, modified)
        else:
            os.utime(partial, (stamp, stamp))
    os.replace(partial, dest)
    if os.name == "posix":
        fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _remove(state_path)
    if sha256 is not None:
        verified = "sha256"
    elif size is not None:
        verified = "size (catalogue)"
    elif total is not None:
        verified = "size (server Content-Length)"
    else:
        verified = "not verified (the server announced no size)"
    return DownloadResult(dest, done, "downloaded", verified, got)


def download_model(name: str, models_dir: str = "models", **kwargs) -> DownloadResult:
    """Download catalogue file ``name`` to ``models_dir/<folder>/<file>`` (see :func:`download` for the keywords)."""
    entry = lookup(name)
    dest = entry.path(models_dir)
    if entry.manual and not os.path.exists(dest):
        raise DownloadError(f"{entry.filename} cannot be downloaded by this helper: {entry.manual}.\n"
                            f"  link: {entry.url}\n  path: {dest}")
    kwargs.setdefault("sha256", entry.sha256)
    kwargs.setdefault("size", entry.size)
    if entry.manual:
        kwargs["offline"] = True  # present: checked as far as possible without the (unusable) link
    return download(entry.url, dest, **kwargs)


def ensure_models(names: Iterable[str], models_dir: str = "models", *, download_missing: bool = True,
                  report: Callable[[str], None] | None = print, **kwargs) -> list[DownloadResult]:
    """Make sure the catalogue files (or examples' files) ``names`` are in ``models_dir``; returns one result per file.

    ``download_missing=False`` never touches the network: present files are kept (checked
    against a known size or hash), and missing ones are listed in one error with their links.
    ``report`` receives one line per file (default: printed).
    """
    entries = files_for(names)
    if not download_missing:
        missing = [e for e in entries if not os.path.exists(e.path(models_dir))]
        if missing:
            lines = "\n".join(f"  {e.path(models_dir)}\n      {e.url}" for e in missing)
            raise DownloadError(f"{len(missing)} model file(s) missing and downloads are disabled:\n{lines}")
    results = []
    for entry in entries:
        result = download_model(entry.filename, models_dir, offline=not download_missing, **kwargs)
        if report is not None:
            report(f"{result.status:>10}  {result.path}  ({_human(result.size)}; {result.verified})")
        results.append(result)
    return results


def format_catalogue() -> str:
    """The text of ``diffsynth download --list``."""
    lines = ["Model files (diffsynth download NAME --to MODELS_DIR puts NAME in MODELS_DIR/<folder>/):", ""]
    for entry in CATALOGUE.values():
        note = " [download by hand: " + entry.manual + "]" if entry.manual else ""
        lines.append(f"  {entry.folder + '/' + entry.filename:<60} {entry.source}{note}")
    lines += ["", "Examples (diffsynth download EXAMPLE fetches all the files it needs):", ""]
    for path, files in EXAMPLES.items():
        lines.append(f"  {os.path.splitext(os.path.basename(path))[0]:<60} {len(files)} file{'' if len(files) == 1 else 's'}")
    return "\n".join(lines)
