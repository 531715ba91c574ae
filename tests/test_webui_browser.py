"""The WebUI in a real browser: ``streamlit run`` on 127.0.0.1, headless Chromium driven by Playwright.

Each page must render (its title and controls appear after the websocket round trip) with no
exception box. Needs Debian's ``chromium`` (``.ci/run`` installs it when apt works); skipped
with the reason otherwise. Playwright drives that browser: it downloads none of its own.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from diffsynth.testing.factory import write_sd_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: `apt-get install chromium`; .ci/run installs it when apt is available)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run DiffSynth_Studio.py`` in a folder with a tiny model, bound to 127.0.0.1 only."""
    folder = tmp_path_factory.mktemp("webui_browser")
    write_sd_checkpoint(str(folder / "models" / "stable_diffusion" / "tiny_sd15.safetensors"))
    port = _free_port()
    log = open(folder / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "DiffSynth_Studio.py"), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"streamlit exited with {proc.returncode}: {(folder / 'streamlit.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening yet
                if time.monotonic() > deadline:
                    raise AssertionError(f"streamlit did not answer on {url} in 90 s: {(folder / 'streamlit.log').read_text()}") from None
            time.sleep(0.3)
        yield url, folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_pages_render_in_chromium_without_an_exception(server):
    url, folder = server
    shots = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tempfile.mkdtemp(dir=folder), executable_path=CHROMIUM, headless=True,
                                                       args=BROWSER_ARGS, viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            # `last`: the page's last element, drawn when its script has run to the end
            for path, title, last in (("", "DiffSynth Studio", "Pick a page in the sidebar"),
                                      ("Image_Creator", "Image Creator", "Columns"),
                                      ("Video_Creator", "Video Creator", "No renders in")):
                page.goto(f"{url}/{path}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=title).first.wait_for(timeout=60000)
                page.get_by_text(last).first.wait_for(timeout=60000)
                page.wait_for_timeout(500)
                shot = folder / f"page_{path or 'home'}.png"
                page.screenshot(path=str(shot), full_page=True)
                shots.append(shot)
                exceptions = page.locator('[data-testid="stException"]')
                assert exceptions.count() == 0, f"{path or 'home'}: {exceptions.all_inner_texts()}"
            assert page.locator('[data-testid="stSidebarNav"] a').count() == 3
        finally:
            context.close()
    for shot in shots:
        assert shot.stat().st_size > 10_000, f"{shot} is nearly empty: the page did not paint"
