"""The search report in a real browser: report.html (written from the hand-made experiment folder of
test_report.py) opened in headless Chromium (Debian's `chromium`; `.ci/run` installs it) through the
DevTools protocol (aiohttp's websocket client, already a Ray dependency): it loads with no console
error, no uncaught exception and no failed request, every plotly plot renders, and a screenshot of
the first plot is not blank. Skips only when chromium is absent."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import time

import pytest

from pipeline.tuning import report

from test_report import experiment  # noqa: F401  (the module-scoped hand-made experiment folder)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs the "
                                "Debian package in .ci/run: apt-get install -y chromium)")
PLOTS = ("history", "parallel", "importances", "slice", "curves", "per_class", "confusion")
WIDTH, HEIGHT = 1280, 2000


def start_chromium(profile: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(port_file):
            lines = open(port_file).read().split()
            if lines:
                return process, int(lines[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("chromium wrote no DevToolsActivePort within 60 s")


class DevTools:
    """A minimal DevTools-protocol client: commands by id, events collected."""

    def __init__(self, socket) -> None:
        self.socket = socket
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        mine = self.next_id
        await self.socket.send_str(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads((await self.socket.receive(timeout=60)).data)
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


async def load_and_capture(port: int, url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [target for target in await response.json() if target["type"] == "page"]
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            tools = DevTools(socket)
            for domain in ("Runtime", "Log", "Page", "Network"):
                await tools.call(f"{domain}.enable")
            await tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                             deviceScaleFactor=1, mobile=False)
            await tools.call("Page.navigate", url=url)
            deadline = time.monotonic() + 90
            rendered = 0
            while time.monotonic() < deadline:
                state = await tools.evaluate("document.readyState")
                rendered = await tools.evaluate(
                    "document.querySelectorAll('.js-plotly-plot .main-svg').length ? "
                    "Array.from(document.querySelectorAll('.js-plotly-plot'))"
                    ".filter(d => d.querySelector('.main-svg') && d._fullLayout).length : 0")
                if state == "complete" and rendered >= len(PLOTS):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # let the last transitions settle
            ids = await tools.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d.id)")
            box = await tools.evaluate(
                "(() => { const r = document.getElementById('plot-history').getBoundingClientRect();"
                " return {x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height}; })()")
            shot = await tools.call("Page.captureScreenshot", format="png",
                                    clip={"x": 0, "y": 0, "width": WIDTH, "height": HEIGHT, "scale": 1})
            # Drain what is left of the events (late console messages).
            try:
                while True:
                    message = json.loads((await socket.receive(timeout=0.5)).data)
                    if "method" in message:
                        tools.events.append(message)
            except (asyncio.TimeoutError, TypeError, ValueError):
                pass
            return {"events": tools.events, "rendered": rendered, "ids": ids, "box": box,
                    "png": base64.b64decode(shot["data"])}


def problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and failed requests."""
    found = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(f"console.{params['type']}: {[arg.get('value', arg.get('description')) for arg in params.get('args', [])]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            found.append(f"request failed: {params.get('errorText')}")
    return found


def test_report_loads_without_console_errors_and_its_plots_render(experiment, tmp_path):  # noqa: F811
    from PIL import Image

    summary = report.write_report(str(experiment))
    html_path = os.path.abspath(summary["html"])
    process, port = start_chromium(str(tmp_path / "profile"))
    try:
        captured = asyncio.run(load_and_capture(port, "file://" + html_path))
    finally:
        process.kill()
        process.wait(timeout=30)
    (tmp_path / "report.png").write_bytes(captured["png"])
    assert problems(captured["events"]) == []
    assert sorted(captured["ids"]) == sorted(f"plot-{anchor}" for anchor in PLOTS)
    assert captured["rendered"] == len(PLOTS)
    # The screenshot is not blank: the first plot's area holds many colours and much non-white.
    image = Image.open(io.BytesIO(captured["png"])).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    box = captured["box"]
    assert box["w"] > 100 and box["h"] > 100 and box["y"] + box["h"] <= HEIGHT, box
    plot = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["w"]), int(box["y"] + box["h"])))
    colours = plot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) >= 50, f"{len(colours or [])} colours in the plot area"
    pixels = plot.width * plot.height
    white = sum(count for count, colour in colours if min(colour) >= 250)
    assert white < 0.97 * pixels, "the plot area is (almost) all white"
