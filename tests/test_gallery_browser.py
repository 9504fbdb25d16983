"""The gallery in a real browser: headless Chromium loads the pages from file:// and decodes every
picture (skipped, with the reason, where Chromium is not installed; .ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchmine.gallery import render
from patchmine.store import open_result

if __package__:  # tests/ is a package
    from .test_render import add_v2, make_result
else:  # tests/ is a plain folder on sys.path
    from test_render import add_v2, make_result

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
  const found = {};
  const box = document.getElementById('filter');
  if (box) {
    for (const q of ['espresso', 'dog', '2']) {
      box.value = q;
      box.dispatchEvent(new Event('input'));
      found[q] = Array.from(document.querySelectorAll('#hits a'), a => a.getAttribute('href'));
    }
  }
  const pre = document.createElement('pre');
  pre.id = 'pm-check';
  pre.textContent = JSON.stringify({title: document.title, pics: out, links: links,
                                    errors: window.__pmErrors, found: found});
  document.body.appendChild(pre);
});
</script>
"""


# First in <head>: collect script errors and console.error calls of the page.
ERRORS = """<script>
window.__pmErrors = [];
window.addEventListener('error', e => window.__pmErrors.push(String(e.message || e.type)), true);
const pmConsoleError = console.error;
console.error = function () { window.__pmErrors.push(Array.from(arguments).join(' '));
  pmConsoleError.apply(console, arguments); };
</script>"""


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


def _browse(
    exe: str, tmp: Path, page: Path, *extra: str, budget: int = 10000
) -> subprocess.CompletedProcess:
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
        f"--virtual-time-budget={budget}",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _decoded(exe: str, tmp: Path, page: Path) -> dict:
    """Load a copy of ``page`` with the check script; what the browser decoded."""
    probe = page.with_name(f"_probe_{page.name}")
    text = page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>")
    probe.write_text(text.replace("<head>", "<head>" + ERRORS, 1), encoding="utf-8")
    try:
        # On a busy machine the virtual time budget can run out before every picture has
        # decoded (the DOM is then dumped without the check's result): again, with more time.
        # (Seen twice in a row on 2026-12-07 with the load average near 2, then not in 8 runs.)
        for budget in (10000, 60000, 60000):
            p = _browse(exe, tmp, probe, "--dump-dom", budget=budget)
            m = re.search(r'<pre id="pm-check">(.*?)</pre>', p.stdout, re.S)
            if m:
                break
    finally:
        probe.unlink()
    assert m, f"page did not finish loading in Chromium:\n{p.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    out = tmp / "gallery"
    render(add_v2(make_result(tmp)), out, progress=False)
    return out


def test_index_page_loads(chromium, gallery, tmp_path):
    got = _decoded(chromium, tmp_path, gallery / "index.html")
    assert got["title"] == "patchmine gallery"
    assert got["errors"] == []  # no script error, no console error
    assert "conv/index.html" in got["links"] and "fc/c0000.html" in got["links"]
    sheets = [p for p in got["pics"] if p["kind"] == "img"]
    assert {p["src"] for p in sheets} == {"conv/overview.webp", "fc/overview.webp"}
    assert all(p["w"] > 0 and p["h"] > 0 for p in sheets)


def test_index_filter_finds_channels(chromium, gallery, tmp_path):
    found = _decoded(chromium, tmp_path, gallery / "index.html")["found"]
    assert found["espresso"] == ["fc/c0002.html"]  # by class name
    with open_result(gallery.parent / "result.h5") as r:  # by top label (cat, dog, fish)
        dogs = []
        for name in ("conv", "fc"):
            for c, imgs in enumerate(r.layer(name).image):
                got = Counter(int(r.image_label[i]) for i in imgs if i >= 0)
                if got and got.most_common(1)[0][0] == 1:
                    dogs.append(f"{name}/c{c:04d}.html")
    assert found["dog"] == dogs and dogs
    assert set(found["2"]) == {"conv/c0002.html", "fc/c0002.html"}  # by number


def test_layer_page_shows_the_overview(chromium, gallery, tmp_path):
    got = _decoded(chromium, tmp_path, gallery / "conv" / "index.html")
    assert got["errors"] == []
    imgs = [p for p in got["pics"] if p["kind"] == "img"]
    assert [p["src"] for p in imgs] == ["overview.webp"]
    w, h = Image.open(gallery / "conv" / "overview.webp").size
    assert (imgs[0]["w"], imgs[0]["h"]) == (w, h)
    assert "c0000.html" in got["links"] and "../index.html" in got["links"]


def test_channel_page_decodes_every_picture(chromium, gallery, tmp_path):
    page = gallery / "conv" / "c0001.html"
    got = _decoded(chromium, tmp_path, page)
    assert got["errors"] == []
    pics = got["pics"]
    for p in pics:  # computed style gives absolute URLs
        p["src"] = p["src"].rsplit("/conv/", 1)[-1] if p["kind"] == "bg" else p["src"]
    assert {p["src"] for p in pics if p["kind"] == "bg"} == {
        "c0001.webp", "c0001_proj.webp", "c0001_bottom.webp", "c0001_bottom_proj.webp"
    }  # fmt: skip
    assert sum(p["kind"] == "img" for p in pics) == 9  # the originals of the context view
    for p in pics:  # decoded by the browser at full size: no broken picture
        w, h = Image.open(page.parent / p["src"]).size
        assert (p["w"], p["h"]) == (w, h), p
    assert {"c0000.html", "c0002.html", "index.html"} <= set(got["links"])


def test_keyboard_moves_to_the_next_channel(chromium, gallery, tmp_path):
    page = gallery / "conv" / "c0001.html"
    probe = page.with_name("_probe_keys.html")
    key = (
        "<script>window.addEventListener('load', () => document.dispatchEvent("
        "new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true})));</script>"
    )
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", key + "</body>"))
    try:
        p = _browse(chromium, tmp_path, probe, "--dump-dom")
    finally:
        probe.unlink()
    assert "<title>conv · channel 2</title>" in p.stdout, p.stdout[:500]


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
