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
from jobs.report import write_report
from tests.test_across_sizes import _manifest, with_new_columns
from tests.test_figures import make_tables

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
