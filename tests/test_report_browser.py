"""The report opens in a real headless Chromium: the screenshot is non-blank and every <img> decodes."""
import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from jobs import figures
from jobs.query import make_report
from jobs.report import write_report
from jobs.store import Store
from tests.test_across_sizes import _manifest, with_new_columns
from tests.test_figures import make_tables
from tests.test_neuron_page_view import write_run

pytestmark = pytest.mark.slow  # headless Chromium

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _images(html: str, run_dir: str) -> list[Image.Image]:
    """Every <img src>: data URIs decoded, relative paths opened from ``run_dir``; fails on a missing file."""
    out = []
    for src in re.findall(r'<img[^>]*\ssrc="([^"]+)"', html):
        if src.startswith("data:image/png;base64,"):
            out.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))))
        else:
            path = os.path.join(run_dir, src)
            assert os.path.isfile(path), f"missing image {src}"
            out.append(Image.open(path))
    for im in out:
        im.load()  # raises on a truncated or corrupt image
    return out


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(tmp_path):
    t = {k: v.lazy() for k, v in with_new_columns(make_tables()).items()}
    run_dir = tmp_path / "run"
    entries = figures.render_all(t, str(run_dir / "figures"))
    report = write_report(str(run_dir), _manifest(), t, entries)
    html = open(report, encoding="utf-8").read()
    imgs = _images(html, str(run_dir))
    assert len(imgs) == len(entries) and all(min(im.size) > 100 for im in imgs)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1280,4000", "--hide-scrollbars", f"file://{report}"],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.std() > 10 and (px < 128).mean() > 0.01  # text and figures drawn, not a blank page


def _chromium(tmp_path, url: str, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", *flags, url],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH (apt-get install chromium; .ci/run does)")
def test_neuron_pages_render_in_headless_chromium(tmp_path):
    """The report links each model's neuron index; the index, a layer page and a neuron page render with content,
    every image decodes and every relative link resolves; the layer page's table sorts on a header click."""
    out, _ = write_run(tmp_path / "run")
    report = make_report(Store(out))
    pages = [os.path.join(out, h) for h in re.findall(r'href="(neuron_pages/[^"#]+)"', open(report, encoding="utf-8").read())]
    assert pages
    index = pages[0]
    first = re.search(r'href="(L\d+-N\d+\.html)"', open(index, encoding="utf-8").read()).group(1)
    layer = os.path.join(os.path.dirname(index), re.search(r'href="(layer-\d+\.html)"', open(index, encoding="utf-8").read()).group(1))
    for path in (report, index, layer, os.path.join(os.path.dirname(index), first)):
        html = open(path, encoding="utf-8").read()
        _images(html, os.path.dirname(path))
        for href in re.findall(r'href="([^"#:]+)(?:#[^"]*)?"', html):
            assert os.path.isfile(os.path.join(os.path.dirname(path), href)), f"{path}: broken link {href}"
        dom = _chromium(tmp_path, f"file://{path}", "--dump-dom").stdout
        assert "<h1>" in dom and len(re.sub(r"<[^>]+>", "", dom).strip()) > 200, path
        shot = tmp_path / "page.png"
        _chromium(tmp_path, f"file://{path}", f"--screenshot={shot}", "--window-size=1100,1400")
        with Image.open(shot) as im:
            px = np.asarray(im.convert("L"), dtype=float)
        assert px.std() > 10 and (px < 128).mean() > 0.005, path
    dom = _chromium(tmp_path, f"file://{os.path.join(os.path.dirname(index), first)}", "--dump-dom").stdout
    assert dom.count('class="t a"') >= 1 and "<svg" in dom  # outlined tokens and the histogram drawn
    text = open(layer, encoding="utf-8").read()
    dom = _chromium(tmp_path, f"file://{layer}", "--dump-dom").stdout
    assert len(_rows(dom)) == len(_rows(text)) > 3 and 'href="L' in dom  # every neuron of the layer, pages linked
    _sorts_on_a_header_click(tmp_path, text, "max")


def _rows(html: str) -> list[str]:
    return re.findall(r"<tr>(.*?)</tr>", html.split("<tbody>")[1])


def _sorts_on_a_header_click(tmp_path, html: str, heading: str) -> None:
    """The page's sortable table, clicked twice on ``heading`` in Chromium, is in descending order of that column."""
    column = re.findall(r"<th>([^<]+)</th>", html).index(heading)
    clicked = tmp_path / "clicked.html"  # the page with two clicks on the heading appended: ascending, then descending
    click = f'<script>const th=document.querySelectorAll("table.sort th")[{column}];th.click();th.click();</script>'
    clicked.write_text(html.replace("</body>", click + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, f"file://{clicked}", "--dump-dom").stdout
    values = [float(re.findall(r'data-v="([^"]*)"', r)[column]) for r in _rows(dom)]
    assert len(values) > 3 and values == sorted(values, reverse=True) and values != [
        float(re.findall(r'data-v="([^"]*)"', r)[column]) for r in _rows(html)]


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH (apt-get install chromium; .ci/run does)")
def test_neuron_index_sorts_on_a_header_click(tmp_path):
    out, _ = write_run(tmp_path / "run")
    make_report(Store(out))
    index = open(os.path.join(out, "neuron_pages", "gpt2", "index.html"), encoding="utf-8").read()
    _sorts_on_a_header_click(tmp_path, index, "max")
