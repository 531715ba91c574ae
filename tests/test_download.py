"""The model download helper against a local HTTP server on 127.0.0.1 (Range support written here).

The server can cut a response after N bytes, ignore ``Range``, redirect, and announce
any size, so resume, restart, verification and the error paths run for real.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.server
import logging
import os
import re
import threading
from pathlib import Path

import pytest

from diffsynth import download as dl
from diffsynth.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAST_MODIFIED = 1_700_000_000  # 2023-11-14, a whole second as HTTP dates carry


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean; requests are recorded in server.log
        return

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/files/" + self.path.removeprefix("/redirect/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = server.files.get(self.path.removeprefix("/files/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(body)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            part = body[start:end]
        else:
            part = body
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(part) - 1}/{len(body)}")
        self.send_header("Content-Length", str(server.announce if server.announce is not None else len(part)))
        self.send_header("Last-Modified", email.utils.formatdate(LAST_MODIFIED, usegmt=True))
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
        self.end_headers()
        if server.cuts > 0 and len(part) > server.cut_after:
            server.cuts -= 1
            self.wfile.write(part[: server.cut_after])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        try:
            self.wfile.write(part)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up on purpose (size probe, size check)
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []
        self.ranges = True
        self.cuts = 0
        self.cut_after = 0
        self.announce: int | None = None

    def url(self, name: str, redirect: bool = False) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{'redirect' if redirect else 'files'}/{name}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def payload():
    return os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB read chunks and a ragged end


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_full_download_verifies_reports_progress_and_keeps_server_time(server, payload, tmp_path):
    server.files["model.bin"] = payload
    events = []
    result = dl.download(server.url("model.bin", redirect=True), str(tmp_path / "sub" / "model.bin"),
                         sha256=_sha(payload), callback=events.append)
    target = tmp_path / "sub" / "model.bin"
    assert target.read_bytes() == payload
    assert (result.status, result.verified, result.size, result.sha256) == ("downloaded", "sha256", len(payload), _sha(payload))
    assert _leftovers(tmp_path / "sub") == []
    assert events[-1].done == events[-1].total == len(payload)
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert os.path.getmtime(target) == LAST_MODIFIED  # a re-download keeps the runner's cache keys valid


def test_size_is_checked_against_content_length_when_no_hash_is_known(server, payload, tmp_path):
    server.files["model.bin"] = payload
    result = dl.download(server.url("model.bin"), str(tmp_path / "model.bin"))
    assert result.verified == "size (server Content-Length)"
    assert (tmp_path / "model.bin").read_bytes() == payload


def test_present_file_is_verified_and_skipped(server, payload, tmp_path):
    server.files["model.bin"] = payload
    dest = str(tmp_path / "model.bin")
    dl.download(server.url("model.bin"), dest)
    server.log.clear()
    again = dl.download(server.url("model.bin"), dest, sha256=_sha(payload))
    assert (again.status, again.verified) == ("present", "sha256")
    assert server.log == []  # a known hash needs no request
    again = dl.download(server.url("model.bin"), dest)
    assert (again.status, again.verified) == ("present", "size (server Content-Length)")
    assert server.log == [("/files/model.bin", "bytes=0-0")]  # one probe for the size, no transfer


def test_present_file_that_fails_its_check_is_reported_and_overwrite_replaces_it(server, payload, tmp_path):
    server.files["model.bin"] = payload
    dest = tmp_path / "model.bin"
    dest.write_bytes(payload[:1000])
    with pytest.raises(dl.DownloadError, match="exists but it has 1000 bytes, the server announces"):
        dl.download(server.url("model.bin"), str(dest))
    assert dest.read_bytes() == payload[:1000]
    dl.download(server.url("model.bin"), str(dest), overwrite=True, sha256=_sha(payload))
    assert dest.read_bytes() == payload


def test_interrupted_transfer_is_resumed_with_a_range_request(server, payload, tmp_path):
    server.files["model.bin"] = payload
    server.cuts, server.cut_after = 1, 1_500_000
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match="network failure.*1500000 bytes are kept.*run the same command again to resume"):
        dl.download(server.url("model.bin"), str(dest), sha256=_sha(payload), retries=0)
    assert not dest.exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial.tmp")]
    assert partial.stat().st_size == 1_500_000
    result = dl.download(server.url("model.bin"), str(dest), sha256=_sha(payload), retries=0)
    assert server.log[-1] == ("/files/model.bin", "bytes=1500000-")
    assert (result.status, result.verified) == ("downloaded", "sha256")
    assert dest.read_bytes() == payload
    assert _leftovers(tmp_path) == []


def test_broken_connection_is_resumed_within_one_call(server, payload, tmp_path, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)  # no back-off wait in the test
    server.files["model.bin"] = payload
    server.cuts, server.cut_after = 2, 700_000
    result = dl.download(server.url("model.bin"), str(tmp_path / "model.bin"), retries=2)
    assert [r for _, r in server.log] == [None, "bytes=700000-", "bytes=1400000-"]
    assert result.size == len(payload) and (tmp_path / "model.bin").read_bytes() == payload


def test_server_without_range_support_restarts_from_zero(server, payload, tmp_path, caplog):
    server.files["model.bin"] = payload
    server.ranges = False
    server.cuts, server.cut_after = 1, 1_000_000
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match="network failure"):
        dl.download(server.url("model.bin"), str(dest), retries=0)
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        dl.download(server.url("model.bin"), str(dest), sha256=_sha(payload), retries=0)
    assert server.log[-1] == ("/files/model.bin", "bytes=1000000-")  # asked to resume, was sent everything
    assert "does not resume downloads" in caplog.text
    assert dest.read_bytes() == payload


def test_hash_mismatch_leaves_nothing_under_the_final_name(server, payload, tmp_path):
    server.files["model.bin"] = payload
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match="SHA-256 mismatch.*nothing was saved"):
        dl.download(server.url("model.bin"), str(dest), sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_leaves_nothing_under_the_final_name(server, payload, tmp_path):
    server.files["model.bin"] = payload
    with pytest.raises(dl.DownloadError, match="announces .* should have 10 bytes"):
        dl.download(server.url("model.bin"), str(tmp_path / "model.bin"), size=10)
    assert list(tmp_path.iterdir()) == []


def test_http_404_is_a_clear_error_and_leaves_no_files(server, tmp_path):
    with pytest.raises(dl.DownloadError, match=r"HTTP 404 Not Found from http://127\.0\.0\.1:\d+/files/missing\.bin\. The file is not"):
        dl.download(server.url("missing.bin"), str(tmp_path / "missing.bin"))
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_is_a_network_error(tmp_path):
    srv = _Server()  # bound, then closed: nothing listens on its port any more
    url = srv.url("model.bin")
    srv.server_close()
    with pytest.raises(dl.DownloadError, match="network failure downloading .*cannot connect"):
        dl.download(url, str(tmp_path / "model.bin"), retries=0)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_said_before_downloading(server, tmp_path):
    server.files["huge.bin"] = b"x"
    server.announce = 1 << 60  # an exbibyte: no test machine has it free
    with pytest.raises(dl.DownloadError, match="not enough disk space in .* more needed"):
        dl.download(server.url("huge.bin"), str(tmp_path / "huge.bin"))
    assert not (tmp_path / "huge.bin").exists()


def test_offline_mode_never_touches_the_network(tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match="missing and downloads are disabled"):
        dl.download("http://127.0.0.1:9/never", str(dest), offline=True)
    dest.write_bytes(b"abc")
    assert dl.download("http://127.0.0.1:9/never", str(dest), offline=True).status == "present"


# --------------------------------------------------------------------------- command line


def test_cli_downloads_a_url_with_sha256(server, payload, tmp_path, capsys):
    server.files["model.bin"] = payload
    assert main(["download", server.url("model.bin"), "--to", str(tmp_path), "--sha256", _sha(payload)]) == 0
    assert (tmp_path / "model.bin").read_bytes() == payload
    assert "downloaded:" in capsys.readouterr().out
    assert main(["download", server.url("model.bin"), "--to", str(tmp_path), "--sha256", "1" * 64]) == 1
    assert "exists but its SHA-256 is" in capsys.readouterr().err


def test_cli_names_resolve_to_the_models_layout(tmp_path, capsys):
    # flownet.pkl is a by-hand file (Google Drive): resolving it needs no network.
    assert main(["download", "flownet", "--to", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "open the link in a browser" in err and str(tmp_path / "RIFE" / "flownet.pkl") in err
    (tmp_path / "RIFE").mkdir()
    (tmp_path / "RIFE" / "flownet.pkl").write_bytes(b"weights")
    assert main(["download", "flownet.pkl", "--to", str(tmp_path)]) == 0
    assert "present:" in capsys.readouterr().out
    assert main(["download", "no_such_model"]) == 2
    assert main(["download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(entry.filename in listing for entry in dl.CATALOGUE.values())


def test_ensure_models_without_downloads_lists_what_is_missing(tmp_path):
    with pytest.raises(dl.DownloadError, match=r"10 model file\(s\) missing and downloads are disabled") as info:
        dl.ensure_models(["Diffutoon"], str(tmp_path), download_missing=False)
    assert "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth" in str(info.value)


# --------------------------------------------------------------------------- catalogue, docs and examples agree


def test_catalogue_entries_are_well_formed():
    for entry in dl.CATALOGUE.values():
        assert entry.url.startswith("https://")
        assert (ROOT / "models" / entry.folder / "README.md").is_file(), entry.folder
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    for example, files in dl.EXAMPLES.items():
        assert set(files) <= set(dl.CATALOGUE), example


def test_every_model_file_the_examples_name_is_in_the_catalogue():
    # Scans the examples present in the tree (other scripts are being written): a new file
    # an example loads must be added to the catalogue, so `diffsynth download` and the docs know it.
    pattern = re.compile(r"models/(\w+)/([\w.\-]+\.(?:safetensors|ckpt|pth|pt|pkl|bin))")
    for path in sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "examples").glob("*.ipynb")):
        for folder, name in pattern.findall(path.read_text(encoding="utf-8")):
            assert name in dl.CATALOGUE, f"{path.name} uses models/{folder}/{name}, which is not in diffsynth/download.py's catalogue"
            assert dl.CATALOGUE[name].folder == folder, f"{path.name}: {name} belongs in models/{dl.CATALOGUE[name].folder}/"


def test_docs_models_md_lists_every_catalogue_file_with_its_link():
    text = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    for entry in dl.CATALOGUE.values():
        row = next((line for line in text.splitlines() if f"`{entry.folder}/{entry.filename}`" in line), None)
        assert row is not None, f"docs/models.md has no row for {entry.folder}/{entry.filename}"
        assert entry.url in row, f"docs/models.md: the row of {entry.filename} lacks its link {entry.url}"
    for example, files in dl.EXAMPLES.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{example}` |")), None)
        assert row is not None, f"docs/models.md does not list the files of {example}"
        assert set(re.findall(r"`([\w.\-]+\.\w+)`", row.split("|")[3])) == set(files), f"docs/models.md: the files of {example} differ from the catalogue's"
