"""The notebooks as a student sees them: JupyterLab in Debian's chromium, driven by Playwright.

The test starts JupyterLab on 127.0.0.1 (a random port and token, settings and workspaces in a
temporary folder) over copies of notebooks 01 and 05, and drives Debian's ``/usr/bin/chromium``
through Playwright's Python package (``executable_path``; no ``playwright install``, no download).
It checks what issue 18 found broken:

- opened from its file, a notebook shows no raw widget ``repr`` (``interactive(children=…``) and no
  progress bar frozen at 0%, and saving it leaves the file byte-identical (so opening a notebook
  leaves git clean: it was committed with the metadata JupyterLab writes);
- after Restart & Run All, moving notebook 01's rank slider twice redraws the picture each time,
  and no picture is blank or torn (a transparent or flat half).

``make test`` installs chromium (``apt-get install -y chromium``) when it runs as root; elsewhere the
test is skipped with that instruction when chromium is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (the [test] extra)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
NOTEBOOKS = ["01_low_rank_math.ipynb", "05_comparison.ipynb"]
RAW_WIDGET_TEXT = ("interactive(children", "(children=(", "IntSlider(value", "IntProgress(", "Error displaying widget")
FROZEN_BAR = "0%|"
TIMEOUT_MS = 180_000  # one wait (JupyterLab's start, a kernel, Run All of 01): generous for a loaded 2-core machine

if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} is missing: apt-get install -y chromium (make test installs it when run as root)",
        allow_module_level=True,
    )

# Pixel statistics of the slider's picture, computed in the page: per half (top, bottom), the share of
# opaque pixels and the standard deviation of the grey level; and the image's source, to tell redraws apart.
IMAGE_STATS = """(img) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const halves = [];
  let digest = 0;
  for (const [top, bottom] of [[0, canvas.height >> 1], [canvas.height >> 1, canvas.height]]) {
    const data = context.getImageData(0, top, canvas.width, bottom - top).data;
    let opaque = 0, sum = 0, sum2 = 0, n = data.length / 4;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i + 3] === 255) opaque++;
      const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
      sum += grey; sum2 += grey * grey;
      digest = (digest + grey * ((top * canvas.width * 4 + i) % 251 + 1)) % 1000000007;
    }
    halves.push({opaque: opaque / n, std: Math.sqrt(Math.max(0, sum2 / n - (sum / n) ** 2))});
  }
  return {src: img.src, width: canvas.width, halves, digest};
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server over copies of the notebooks: (its URL, its token, its folder)."""
    work = tmp_path_factory.mktemp("lab")
    folder = work / "notebooks"
    folder.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, folder)
    settings = work / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Every cell in the page, not only those on screen, so the page's text is the whole notebook's.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"),
        JUPYTER_CONFIG_DIR=str(work / "config"),
        JUPYTER_RUNTIME_DIR=str(work / "runtime"),
    )
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
        *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
    ]  # fmt: skip
    log = open(work / "lab.log", "w")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(work / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", token, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, lab, name: str):
    """A fresh page showing notebook ``name`` with its kernel started and idle."""
    url, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget?.context?.isReady")
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'"
    )
    return page


def _notebook_text(page) -> str:
    return page.evaluate("() => window.jupyterapp.shell.currentWidget.content.node.textContent")


def _save(page) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")


def _assert_nothing_raw(text: str, name: str) -> None:
    shown = [raw for raw in (*RAW_WIDGET_TEXT, FROZEN_BAR) if raw in text]
    assert not shown, f"{name} opened from its file shows {shown}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opened_from_its_file_nothing_looks_broken_and_git_stays_clean(browser, lab, name):
    page = _open(browser, lab, name)
    try:
        _assert_nothing_raw(_notebook_text(page), name)
        if name.startswith("01"):  # the slider's cell shows its still picture instead of the widget
            assert page.locator(".jp-OutputArea-output img").count() > 0
        _save(page)
    finally:
        page.close()
    saved = (lab[2] / name).read_bytes()
    assert saved == (ROOT / "notebooks" / name).read_bytes(), (
        f"opening and saving {name} in JupyterLab changed it: re-execute it with "
        "`python -m lora_lab.notebook_tools execute` (it writes the metadata JupyterLab writes)"
    )


def _picture(page) -> dict:
    return page.locator(".widget-vbox img").first.evaluate(IMAGE_STATS)


def _assert_drawn(picture: dict, when: str) -> None:
    for half, stats in zip(("top", "bottom"), picture["halves"]):
        assert stats["opaque"] > 0.99, f"{when}: the picture's {half} half is transparent ({stats})"
        assert stats["std"] > 10, f"{when}: the picture's {half} half is blank ({stats})"


def _drag(page, handle, pixels: float) -> None:
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=8)
    page.mouse.up()


def test_the_rank_slider_redraws_after_restart_and_run_all(browser, lab):
    page = _open(browser, lab, NOTEBOOKS[0])
    try:
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:restart-run-all'); }")
        page.locator(".jp-Dialog .jp-mod-accept").click()  # "Restart kernel?"
        handle = page.locator(".widget-slider .noUi-handle").first
        handle.wait_for(state="visible")
        page.wait_for_function(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'"
        )
        handle.scroll_into_view_if_needed()
        pictures = [_picture(page)]
        _assert_drawn(pictures[0], "after Run All")
        for move, pixels in enumerate((60, -25), 1):  # right (rank up), then left
            _drag(page, handle, pixels)
            previous = pictures[-1]["src"]
            page.wait_for_function(
                "(before) => document.querySelector('.widget-vbox img').src !== before", arg=previous
            )
            pictures.append(_picture(page))
            _assert_drawn(pictures[-1], f"after move {move} of the slider")
            assert pictures[-1]["digest"] != pictures[-2]["digest"], f"move {move} left the picture as it was"
        readout = page.locator(".widget-slider .widget-readout").first.inner_text()
        assert readout.strip() != "20", "the slider is back at its start value: it did not move"
    finally:
        page.close()
