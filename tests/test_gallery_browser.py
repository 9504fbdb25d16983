"""The gallery in a real browser: headless Chromium loads the pages from file:// and decodes every
picture (skipped, with the reason, where Chromium is not installed; .ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchmine.gallery import render

if __package__:  # tests/ is a package
    from .test_render import make_result
else:  # tests/ is a plain folder on sys.path
    from test_render import make_result

# Appended to a copy of a page (beside it, so relative links resolve): once everything has loaded,
# write what the browser decoded for every <img> and every CSS background picture into the DOM.
CHECK = """
<script>
window.addEventListener('load', async () => {
  const out = [];
  for (const img of document.images) {
    const src = img.getAttribute('src');
    out.push({kind: 'img', src: src, w: img.naturalWidth, h: img.naturalHeight});
  }
  const bgs = new Set();
  for (const el of document.querySelectorAll('*')) {
    const m = /url\\("?([^")]+)"?\\)/.exec(getComputedStyle(el).backgroundImage);
    if (m) bgs.add(m[1]);
  }
  for (const u of bgs) {
    const im = new Image();
    im.src = u;
    try { await im.decode(); } catch (e) {}
    out.push({kind: 'bg', src: u, w: im.naturalWidth, h: im.naturalHeight});
  }
  const links = Array.from(document.links, a => a.getAttribute('href'));
  const pre = document.createElement('pre');
  pre.id = 'pm-check';
  pre.textContent = JSON.stringify({title: document.title, pics: out, links: links});
  document.body.appendChild(pre);
});
</script>
"""


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _find_chromium()
    if exe is None:
        pytest.skip("headless Chromium not on PATH (.ci/run installs it: apt-get install chromium)")
    try:
        v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{exe} does not run: {e}")
    if v.returncode != 0:
        pytest.skip(f"{exe} does not run: {v.stderr.strip()[:200]}")
    return exe


def _browse(exe: str, tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--mute-audio",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=10000",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _decoded(exe: str, tmp: Path, page: Path) -> dict:
    """Load a copy of ``page`` with the check script; what the browser decoded."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8"
    )
    try:
        p = _browse(exe, tmp, probe, "--dump-dom")
    finally:
        probe.unlink()
    m = re.search(r'<pre id="pm-check">(.*?)</pre>', p.stdout, re.S)
    assert m, f"page did not finish loading in Chromium:\n{p.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    out = tmp / "gallery"
    render(make_result(tmp), out, progress=False)
    return out


def test_index_page_loads(chromium, gallery, tmp_path):
    got = _decoded(chromium, tmp_path, gallery / "index.html")
    assert got["title"] == "patchmine gallery"
    assert "conv/index.html" in got["links"] and "fc/index.html" in got["links"]


def test_layer_page_shows_the_overview(chromium, gallery, tmp_path):
    got = _decoded(chromium, tmp_path, gallery / "conv" / "index.html")
    bgs = [p for p in got["pics"] if p["kind"] == "bg"]
    assert len(bgs) == 1 and bgs[0]["src"].endswith("overview.png")
    w, h = Image.open(gallery / "conv" / "overview.png").size
    assert (bgs[0]["w"], bgs[0]["h"]) == (w, h)
    assert "c0000.html" in got["links"] and "../index.html" in got["links"]


def test_channel_page_decodes_every_picture(chromium, gallery, tmp_path):
    page = gallery / "conv" / "c0001.html"
    got = _decoded(chromium, tmp_path, page)
    imgs = [p for p in got["pics"] if p["kind"] == "img"]
    assert {p["src"] for p in imgs} == {"c0001.png", "c0001_context.jpg"}
    for p in imgs:
        w, h = Image.open(page.parent / p["src"]).size
        assert (p["w"], p["h"]) == (w, h), p  # decoded by the browser at full size
    assert {"c0000.html", "c0002.html", "index.html"} <= set(got["links"])


def test_channel_page_screenshot_is_not_blank(chromium, gallery, tmp_path):
    shot = tmp_path / "shot.png"
    p = _browse(
        chromium,
        tmp_path,
        gallery / "conv" / "c0000.html",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        "--hide-scrollbars",
    )
    assert shot.is_file(), p.stderr[-2000:]
    a = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert a.shape[:2] == (900, 1200)
    bg = np.array([0x18, 0x18, 0x1B])
    assert (np.abs(a - bg).sum(-1) > 30).mean() > 0.1  # pictures and text, not an empty page
    assert a.reshape(-1, 3).std(0).mean() > 20
