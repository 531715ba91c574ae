"""Textual-inversion embeddings: read them from files and add them to a text encoder + prompter.

An embedding is ``n`` learned token vectors ``(n, dim)`` (Gal et al. 2022, "An Image is
Worth One Word", arXiv 2208.01618). Its keyword is the file's stem, as in A1111 and
DiffSynth-Studio. Recognised file contents:

* A1111 ``.pt``: ``{"string_to_param": {"*": tensor(n, dim)}, "string_to_token": ..., "name": ..., "step": ...}``
* A1111 ``.safetensors`` (and newer ``.pt``): ``{"emb_params": tensor(n, dim)}``
* SDXL (A1111/civitai): ``{"clip_l": tensor(n, 768), "clip_g": tensor(n, 1280)}``
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor(dim) or (n, dim)}``
* a bare tensor ``(n, dim)`` or ``(dim,)``.

Differences from DiffSynth-Studio (upstream_spec §2.7, §12.5): the folder is read in
sorted order, notes and unknown file types are skipped instead of crashing, the format is
recognised by its structure (the original took the first 768-wide tensor it found),
vectors of the wrong width are an error naming the file, and pickles are loaded
weights-only (through :mod:`.state_dict`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ModelFileError
from .state_dict import load_raw

__all__ = [
    "EMBEDDING_EXTENSIONS",
    "apply_textual_inversions",
    "load_textual_inversion",
    "folder_holds_sdxl_embeddings",
    "load_textual_inversion_sdxl",
    "load_textual_inversions",
    "load_textual_inversions_sdxl",
]

logger = logging.getLogger("diffsynth")

EMBEDDING_EXTENSIONS = (".pt", ".pth", ".bin", ".safetensors")
_NOTE_EXTENSIONS = (".txt", ".md")  # descriptions that users keep next to their embeddings

SDXL_CLIP_L_DIM = 768
SDXL_CLIP_G_DIM = 1280
_WIDTH_FAMILIES = {
    768: "SD 1.x, or the CLIP-L half of an SDXL embedding",
    1024: "SD 2.x",
    1280: "the CLIP-G half of an SDXL embedding",
}

_NOT_AN_EMBEDDING_REMEDY = (
    "Remove it from the embeddings folder, or replace it with an A1111 (.pt/.safetensors) "
    "or diffusers (learned_embeds.bin) textual-inversion file."
)
_CORRUPT_REMEDY = "The file is damaged; download it again."


# --------------------------------------------------------------------------- single files


def load_textual_inversion(path: str | os.PathLike, expected_dim: int | None = None) -> tuple[str, torch.Tensor]:
    """Read one embedding file; return ``(keyword, vectors)`` with vectors float32 ``(n, dim)``.

    ``keyword`` is the file stem. With ``expected_dim`` the width is checked, and for an
    SDXL file the matching half (768: ``clip_l``, 1280: ``clip_g``) is returned; an SDXL
    file without ``expected_dim`` is an error (use :func:`load_textual_inversion_sdxl`).
    Raises :class:`ModelFileError` naming the file for unreadable or non-embedding
    contents and for vectors of the wrong width.
    """
    path = os.fspath(path)
    parts = _read_parts(path)
    if "vectors" in parts:
        vectors = parts["vectors"]
    elif expected_dim is None:
        raise ModelFileError(
            path,
            "this is an SDXL embedding (clip_l and clip_g vectors); which half to use depends on the text encoder.",
            "Pass expected_dim (768 for CLIP-L, 1280 for CLIP-G) or use load_textual_inversion_sdxl().",
        )
    else:
        vectors = next((v for v in parts.values() if v.shape[1] == expected_dim), parts["clip_l"])
    if expected_dim is not None:
        _check_width(path, vectors, expected_dim)
    return _keyword(path), vectors


def load_textual_inversion_sdxl(
    path: str | os.PathLike, expected_dims: tuple[int | None, int | None] = (SDXL_CLIP_L_DIM, SDXL_CLIP_G_DIM)
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Read an SDXL embedding; return ``(keyword, clip_l (n, 768), clip_g (n, 1280))``, float32.

    ``expected_dims`` are the widths of the two text encoders (``None``: not checked).
    Raises :class:`ModelFileError` for files without both halves, or with halves of
    unexpected width or different vector counts.
    """
    path = os.fspath(path)
    parts = _read_parts(path)
    if "vectors" in parts:
        raise ModelFileError(
            path,
            f"this is a single-encoder embedding ({parts['vectors'].shape[1]} wide), not an SDXL one with clip_l and clip_g.",
            "Use it with the model family it was trained for, through load_textual_inversion().",
        )
    clip_l, clip_g = parts["clip_l"], parts["clip_g"]
    if expected_dims[0] is not None:
        _check_width(path, clip_l, expected_dims[0], what="clip_l")
    if expected_dims[1] is not None:
        _check_width(path, clip_g, expected_dims[1], what="clip_g")
    if clip_l.shape[0] != clip_g.shape[0]:
        raise ModelFileError(
            path, f"clip_l has {clip_l.shape[0]} vectors but clip_g has {clip_g.shape[0]}; they must match.", _CORRUPT_REMEDY
        )
    return _keyword(path), clip_l, clip_g


def _keyword(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _read_parts(path: str) -> dict[str, torch.Tensor]:
    """``{"vectors": t}`` for single-encoder files, ``{"clip_l": t, "clip_g": t}`` for SDXL ones."""
    obj = load_raw(path)
    if isinstance(obj, torch.Tensor):
        return {"vectors": _as_vectors(path, obj, "the stored tensor")}
    if not isinstance(obj, Mapping):
        raise ModelFileError(path, f"the file holds a {type(obj).__name__}, not a textual-inversion embedding.", _NOT_AN_EMBEDDING_REMEDY)
    if "string_to_param" in obj:
        return {"vectors": _a1111_pt_vectors(path, obj["string_to_param"])}
    flattened = {k.partition(".")[2]: v for k, v in obj.items() if k.startswith("string_to_param.")}
    if flattened:  # an A1111 .pt re-saved as flat safetensors: "string_to_param.*"
        return {"vectors": _a1111_pt_vectors(path, flattened)}
    if "emb_params" in obj:
        return {"vectors": _as_vectors(path, obj["emb_params"], "emb_params")}
    if "clip_l" in obj or "clip_g" in obj:
        return {name: _as_vectors(path, obj.get(name), name) for name in ("clip_l", "clip_g")}
    if len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        token, tensor = next(iter(obj.items()))  # diffusers: {placeholder token: vectors}
        return {"vectors": _as_vectors(path, tensor, f"the vectors of token {token!r}")}
    entries = ", ".join(repr(k) for k in list(obj)[:8]) or "nothing"
    raise ModelFileError(
        path,
        f"this is not a textual-inversion embedding: found top-level entries {entries}; expected "
        "'string_to_param' (A1111 .pt), 'emb_params' (A1111 .safetensors), 'clip_l'/'clip_g' (SDXL) "
        "or a single {token: vectors} entry (diffusers).",
        _NOT_AN_EMBEDDING_REMEDY,
    )


def _a1111_pt_vectors(path: str, string_to_param: Any) -> torch.Tensor:
    """A1111 stores one placeholder (usually ``"*"``) in ``string_to_param``."""
    if not isinstance(string_to_param, Mapping) or len(string_to_param) != 1:
        found = list(string_to_param) if isinstance(string_to_param, Mapping) else type(string_to_param).__name__
        raise ModelFileError(path, f"'string_to_param' should hold exactly one entry, found {found}.", _CORRUPT_REMEDY)
    token, tensor = next(iter(string_to_param.items()))
    return _as_vectors(path, tensor, f"string_to_param[{token!r}]")


def _as_vectors(path: str, tensor: Any, what: str) -> torch.Tensor:
    """Validate and normalise to a detached float32 ``(n, dim)`` copy (not a view of a mapped file)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        found = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else repr(type(tensor).__name__)
        raise ModelFileError(path, f"{what} should be a floating-point tensor, found {found}.", _NOT_AN_EMBEDDING_REMEDY)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ModelFileError(
            path, f"{what} has shape {tuple(tensor.shape)}; an embedding is (vectors, width).", _NOT_AN_EMBEDDING_REMEDY
        )
    vectors = tensor.detach().to(torch.float32, copy=True).contiguous()
    if not torch.isfinite(vectors).all():
        raise ModelFileError(path, f"{what} contains NaN or infinite values.", _CORRUPT_REMEDY)
    return vectors


def _check_width(path: str, vectors: torch.Tensor, expected_dim: int, what: str = "the embedding") -> None:
    width = vectors.shape[1]
    if width == expected_dim:
        return
    found = _WIDTH_FAMILIES.get(width, "an unknown model family")
    wanted = _WIDTH_FAMILIES.get(expected_dim, "this text encoder")
    raise ModelFileError(
        path,
        f"{what} has {vectors.shape[0]} vectors of width {width} ({found}), but the text encoder expects width "
        f"{expected_dim} ({wanted}).",
        "The embedding was trained for another model family (e.g. an SDXL or SD 2.x embedding in an SD 1.x "
        "folder); move it to that model's embeddings folder.",
    )


# --------------------------------------------------------------------------- folders


def load_textual_inversions(folder: str | os.PathLike, expected_dim: int = 768) -> dict[str, torch.Tensor]:
    """Read every embedding in ``folder`` (not recursive); return ``{keyword: vectors}`` in sorted file order.

    Files with extensions :data:`EMBEDDING_EXTENSIONS` must be embeddings of width
    ``expected_dim`` (else :class:`ModelFileError` naming the file). Hidden files and
    ``.txt``/``.md`` notes are skipped silently; sub-folders and other file types
    (previews, ``.json``) are skipped with a warning on the ``"diffsynth"`` logger.
    Two files with the same keyword (also differing only in case, which CLIP cannot
    tell apart) are an error. A missing folder raises ``FileNotFoundError``.
    """
    folder = _check_folder(folder)
    embeddings: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}  # lower-cased keyword -> file, for collision messages
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not _is_embedding_candidate(path, name):
            continue
        keyword, vectors = load_textual_inversion(path, expected_dim)
        _check_keyword(path, keyword, sources)
        sources[keyword.lower()] = path
        embeddings[keyword] = vectors
    return embeddings


def load_textual_inversions_sdxl(
    folder: str | os.PathLike, expected_dims: tuple[int | None, int | None] = (SDXL_CLIP_L_DIM, SDXL_CLIP_G_DIM)
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read every SDXL embedding in ``folder``; return ``{keyword: (clip_l, clip_g)}`` in sorted file order.

    The folder rules of :func:`load_textual_inversions` apply (skipped notes and other file
    types, keyword clashes). A single-encoder (SD 1.x/2.x) embedding is an error naming
    the file: its vectors fit neither SDXL text encoder.
    """
    folder = _check_folder(folder)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not _is_embedding_candidate(path, name):
            continue
        keyword, clip_l, clip_g = load_textual_inversion_sdxl(path, expected_dims)
        _check_keyword(path, keyword, sources)
        sources[keyword.lower()] = path
        embeddings[keyword] = (clip_l, clip_g)
    return embeddings


def folder_holds_sdxl_embeddings(folder: str | os.PathLike) -> bool:
    """Whether any embedding file in ``folder`` is an SDXL one (``clip_l``/``clip_g``); files that cannot be read raise."""
    folder = _check_folder(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _is_embedding_candidate(path, name) and "vectors" not in _read_parts(path):
            return True
    return False


def _check_folder(folder: str | os.PathLike) -> str:
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(errno.ENOENT, "Textual inversion folder not found", folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "Expected a folder of textual-inversion embeddings, got a file", folder)
    return folder


def _is_embedding_candidate(path: str, name: str) -> bool:
    extension = os.path.splitext(name)[1].lower()
    if name.startswith(".") or extension in _NOTE_EXTENSIONS:
        return False
    if os.path.isdir(path):
        logger.warning("Skipping sub-folder %s of the embeddings folder (sub-folders are not searched).", path)
        return False
    if extension not in EMBEDDING_EXTENSIONS:
        logger.warning(
            "Skipping %s in the embeddings folder: not an embedding file type (%s).", path, ", ".join(EMBEDDING_EXTENSIONS)
        )
        return False
    return True


def _check_keyword(path: str, keyword: str, sources: dict[str, str]) -> None:
    if not keyword or any(ch.isspace() for ch in keyword):
        raise ModelFileError(
            path, f"the keyword {keyword!r} (taken from the file name) contains spaces.", "Rename the file without spaces, e.g. with '_'."
        )
    if keyword.lower() in sources:
        raise ModelFileError(
            path,
            f"its keyword {keyword!r} is already used by {sources[keyword.lower()]} (keywords are case-insensitive).",
            "Rename or remove one of the two files.",
        )


# --------------------------------------------------------------------------- wiring into a model


def apply_textual_inversions(embeddings: Mapping[str, torch.Tensor], text_encoder, prompter) -> dict[str, list[int]]:
    """Add each embedding to the prompter's tokenizer and the text encoder; return ``{keyword: token ids}``.

    For each keyword (in ``embeddings`` order) ``prompter.add_textual_inversion(keyword, n)``
    assigns n token ids and ``text_encoder.add_token_embeddings(vectors)`` appends n rows;
    the two must be the same numbers, which holds when tokenizer and encoder start with
    the same vocabulary size. Widths, keyword clashes and that starting condition are
    checked before anything is changed; a mismatch found afterwards raises RuntimeError.
    ``embeddings`` is not modified.
    """
    token_embedding = text_encoder.text_model.embeddings.token_embedding
    _check_before_apply(embeddings, token_embedding, prompter)
    assigned: dict[str, list[int]] = {}
    for keyword, vectors in embeddings.items():
        ids = list(prompter.add_textual_inversion(keyword, vectors.shape[0]))
        rows = list(text_encoder.add_token_embeddings(vectors))
        if ids != rows:
            raise RuntimeError(
                f"textual inversion {keyword!r}: the tokenizer assigned ids {ids} but the text encoder appended rows "
                f"{rows}; prompts using it would read the wrong vectors. Load embeddings into a fresh tokenizer and "
                "text encoder, through apply_textual_inversions only."
            )
        assigned[keyword] = ids
    return assigned


def _check_before_apply(embeddings: Mapping[str, torch.Tensor], token_embedding, prompter) -> None:
    width = token_embedding.embedding_dim
    for keyword, vectors in embeddings.items():
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != width:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ValueError(f"textual inversion {keyword!r} has shape {shape}; this text encoder needs (n, {width})")
    taken = {keyword.lower() for keyword in prompter.textual_inversions}
    seen: set[str] = set()
    for keyword in embeddings:
        if keyword.lower() in taken or keyword.lower() in seen:
            raise ValueError(f"textual inversion keyword {keyword!r} is given twice or already loaded (case-insensitively)")
        seen.add(keyword.lower())
    tokens, rows = len(prompter.tokenizer), token_embedding.num_embeddings
    if tokens != rows:
        raise RuntimeError(
            f"the tokenizer has {tokens} tokens but the text encoder has {rows} embedding rows, so new token ids "
            "would not match the new rows; load textual inversions into a fresh tokenizer and text encoder."
        )
