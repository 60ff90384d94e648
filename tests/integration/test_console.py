"""`vllm-worker console` in a real headless Chromium (Debian chromium + chromium-driver, Selenium): the
fleet page lists a fake-engine worker on a real Mosquitto and its charts move; the playground streams an
answer equal to the final reply, keeps the session, resets and cancels; a hostile worker id is shown as
text and runs nothing. Screenshots of both pages go to a temporary directory, or to
$VLLM_WORKER_SCREENSHOTS_DIR: `make screenshots` points it at docs/ to refresh the README's on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, Mosquitto, free_port, peer, wait_port, wait_ready, worker_subprocess

from worker.fleet.reports import StatusReport

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def browser() -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        msg = (
            "chromium + chromium-driver are not installed (apt-get install chromium chromium-driver; make test does it)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@contextlib.contextmanager
def console_process(broker_url: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "worker", "console", "--broker", broker_url, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout_s=30)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    broker = Mosquitto().start()
    port = free_port()
    env = {"VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": "1", "VLLM_WORKER_FAKE_TOKEN_DELAY_S": "0.05"}
    with (
        worker_subprocess(broker.url, "lab-gpu-0", ["maze", "driving"], **env),
        console_process(broker.url, port),
    ):
        asyncio.run(wait_ready(broker.port, "lab-gpu-0"))
        driver = browser()
        try:
            yield {"broker": broker, "url": f"http://127.0.0.1:{port}", "driver": driver}
        finally:
            driver.quit()
    broker.stop()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: never docs/ unless asked (a test run must not dirty tracked files)."""
    chosen = os.environ.get("VLLM_WORKER_SCREENSHOTS_DIR")
    folder = Path(chosen) if chosen else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(what: Callable[[], object], timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if value := what():
                return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_fleet_page_lists_the_worker_and_its_charts_move(lab, screenshots):
    driver, by = lab["driver"], _by()
    driver.get(lab["url"] + "/")

    def row_cells() -> list[str]:  # one lookup per try: the table re-renders its rows on every report
        row = driver.find_element(by.CSS_SELECTOR, 'tr[data-worker="lab-gpu-0"]')
        return [td.text for td in row.find_elements(by.TAG_NAME, "td")]

    cells = wait(row_cells)  # a stale row (CI once read one mid-render) is read again
    assert cells[:5] == ["lab-gpu-0", "ready", "fake-model", "none", "maze, driving"]
    chart = driver.find_element(by.ID, "chart-run")
    first = wait(lambda: chart.get_attribute("data-last-x"))
    wait(lambda: chart.get_attribute("data-last-x") != first, timeout_s=10)  # a new point within 10 s
    assert int(chart.get_attribute("data-points")) >= 2
    assert chart.find_elements(by.TAG_NAME, "canvas")  # uPlot drew it
    time.sleep(3)  # a few more points for the picture
    assert driver.save_screenshot(str(screenshots / "console-fleet.png"))


def test_the_playground_streams_keeps_the_session_resets_and_cancels(lab, screenshots):
    driver, by = lab["driver"], _by()
    driver.get(lab["url"] + "/playground")
    wait(lambda: driver.find_elements(by.CSS_SELECTOR, '#project option[value="maze"]'))
    driver.find_element(by.CSS_SELECTOR, '#project option[value="maze"]').click()

    def send(text: str) -> Any:
        before = len(driver.find_elements(by.CSS_SELECTOR, ".turn.assistant"))
        driver.find_element(by.ID, "message").send_keys(text)
        driver.find_element(by.ID, "send").click()
        return wait(lambda: driver.find_elements(by.CSS_SELECTOR, ".turn.assistant")[before])

    first = send("which way to the exit")
    wait(lambda: first.get_attribute("data-state") == "done")
    assert first.text == first.get_attribute("data-final") == "echo 1: which way to the exit"  # streamed == final
    second = send("and then")
    wait(lambda: second.get_attribute("data-state") == "done")
    assert second.text == "echo 2: and then"  # the session kept the first turn
    assert "TTFT" in driver.find_element(by.ID, "meta").text
    assert driver.save_screenshot(str(screenshots / "console-playground.png"))
    driver.find_element(by.ID, "reset").click()
    wait(lambda: "(session reset)" in driver.find_element(by.ID, "chat").text)
    third = send("start over")
    wait(lambda: third.get_attribute("data-state") == "done")
    assert third.text == "echo 1: start over"
    long = send(" ".join(["word"] * 200))  # 10 s of tokens at 0.05 s each
    wait(lambda: long.text)  # streaming has begun
    driver.find_element(by.ID, "cancel").click()
    wait(lambda: long.get_attribute("data-state") == "cancelled", timeout_s=10)


def test_a_hostile_worker_id_is_shown_as_text_and_runs_nothing(lab):
    driver, by = lab["driver"], _by()
    report = StatusReport(
        state="ready",
        worker=HOSTILE,
        projects=["<b>x</b>"],
        model="<script>window.__pwned=2</script>",
        quantization="none",
        version="0",
        since="now",
    )

    async def publish() -> None:
        async with peer(lab["broker"].port, [], client_id="evil") as p:
            await p.bus.publish(f"vllm-worker/{HOSTILE}/status", report.to_json(), retain=True)

    asyncio.run(publish())
    driver.get(lab["url"] + "/")
    row = wait(lambda: [r for r in driver.find_elements(by.CSS_SELECTOR, "#workers tbody tr") if HOSTILE in r.text])
    assert row[0].find_elements(by.TAG_NAME, "td")[0].text == HOSTILE  # the markup, as text
    assert not row[0].find_elements(by.TAG_NAME, "img")
    assert not driver.find_elements(by.CSS_SELECTOR, "#workers b")
    assert driver.execute_script("return window.__pwned") is None


def test_outside_loopback_the_console_needs_its_token(lab):
    port = free_port()
    cmd = [sys.executable, "-m", "worker", "console", "--broker", lab["broker"].url, "--port", str(port)]
    cmd += ["--host", "0.0.0.0", "--token", "t0ken-for-test"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout_s=30)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/projects", timeout=5)
        assert refused.value.code == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/projects?token=t0ken-for-test", timeout=5) as ok:
            assert ok.status == 200
            assert "HttpOnly" in ok.headers["Set-Cookie"]
            assert "password" not in ok.read().decode().lower()
    finally:
        proc.terminate()
        proc.wait(10)


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def test_the_playground_shows_device_tool_calls_as_they_happen(lab, screenshots):
    """The simulated robot (examples/micropython/robot.py) announces look; the fake model calls it."""
    micropython = ROOT / "examples" / "micropython"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(micropython / "shim"), str(micropython)])}
    port = str(lab["broker"].port)
    cmd = [sys.executable, str(micropython / "robot.py"), "127.0.0.1", port, "pg-robot", "60"]
    robot = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver, by = lab["driver"], _by()
    try:
        driver.get(lab["url"] + "/playground")
        wait(lambda: driver.find_elements(by.CSS_SELECTOR, '#project option[value="maze"]'))
        driver.find_element(by.CSS_SELECTOR, '#project option[value="maze"]').click()
        time.sleep(1.5)  # the robot's retained announcement reaches the worker
        driver.find_element(by.ID, "message").send_keys('call:look:{"direction":"east"}')
        driver.find_element(by.ID, "send").click()
        answer = wait(lambda: driver.find_elements(by.CSS_SELECTOR, ".turn.assistant")[-1])
        wait(lambda: answer.get_attribute("data-state") == "done")
        tools = [t.text for t in driver.find_elements(by.CSS_SELECTOR, ".turn.tool")]
        assert tools[-2:] == [
            '→ look({"direction":"east"})',
            '← look: {"direction": "east", "sees": "open"} (' + tools[-1].rsplit("(", 1)[-1],
        ]
        assert answer.text == 'results: {"direction": "east", "sees": "open"}'
        assert driver.save_screenshot(str(screenshots / "console-playground-tools.png"))
    finally:
        robot.terminate()
        robot.wait(10)


def test_the_usage_page_shows_tokens_per_project_and_the_top_clients(lab, screenshots):
    """Without Redis the page reads the workers' telemetry: today's tokens per project, top clients."""

    async def spend() -> None:
        async with peer(lab["broker"].port, ["maze/response/usage-bot"], client_id="usage-peer", protocol="5") as p:
            for n in range(5):
                body = {
                    "v": 2,
                    "clientId": "usage-bot",
                    "requestId": f"u{n}",
                    "messages": [{"role": "user", "content": "hi"}],
                }
                await p.publish("maze/user_input", body)
            await p.wait_for(lambda got: len(got) >= 5, timeout_s=30)

    asyncio.run(spend())
    driver, by = lab["driver"], _by()
    driver.get(lab["url"] + "/usage")

    def maze_tokens() -> int:
        row = driver.find_element(by.CSS_SELECTOR, '#today tr[data-project="maze"]')
        return int(row.find_elements(by.TAG_NAME, "td")[1].text.replace(",", ""))

    assert wait(maze_tokens, timeout_s=20) > 0  # telemetry every second, the page every 5 s
    client = wait(lambda: driver.find_element(by.CSS_SELECTOR, '#clients tr[data-client="usage-bot"]'), timeout_s=20)
    cells = [td.text for td in client.find_elements(by.TAG_NAME, "td")]
    assert cells[:2] == ["maze", "usage-bot"]
    assert int(cells[2].replace(",", "")) > 0
    assert driver.find_element(by.ID, "source").text == "from telemetry"
    assert driver.find_element(by.ID, "chart-days").get_attribute("data-days") == "14"
    assert driver.save_screenshot(str(screenshots / "console-usage.png"))


def test_with_redis_the_usage_api_reads_the_fleet_counters(redis_server, tmp_path):
    """`--state-url`: the page's data comes from the fleet's counters (14 days, today's clients)."""
    broker = Mosquitto().start()
    port = free_port()
    env = {"VLLM_WORKER_STATE__URL": redis_server.url}
    cmd = [sys.executable, "-m", "worker", "console", "--broker", broker.url, "--port", str(port)]
    cmd += ["--state-url", redis_server.url]
    try:
        with worker_subprocess(broker.url, "usage-redis-0", ["maze"], **env):
            asyncio.run(wait_ready(broker.port, "usage-redis-0"))

            async def spend() -> None:
                async with peer(broker.port, ["maze/response/lab-bot"], client_id="usage-peer", protocol="5") as p:
                    body = {
                        "v": 2,
                        "clientId": "lab-bot",
                        "requestId": "r1",
                        "messages": [{"role": "user", "content": "hi"}],
                    }
                    await p.publish("maze/user_input", body)
                    await p.wait_for(lambda got: len(got) >= 1, timeout_s=30)

            asyncio.run(spend())
            console = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(port, console, timeout_s=30)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/usage", timeout=10) as response:
                    usage = json.loads(response.read())
            finally:
                console.terminate()
                console.wait(10)
    finally:
        broker.stop()
    assert usage["source"] == "redis"
    assert len(usage["days"]) == 14
    (maze,) = usage["projects"]
    assert maze["project"] == "maze"
    assert maze["today"] > 0
    assert maze["series"][-1] == maze["today"]
    assert maze["top"] == [{"client": "lab-bot", "tokens": maze["today"]}]
