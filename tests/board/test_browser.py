"""The Board in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by Selenium against ``mark board`` running as a subprocess on the tiny models.

It starts a tiny training run and sees its curve update, stops it, asks a Chat question and
sees the answer with its evidence, rates two sampled answers and finds the pair in the
preference file, searches the Knowledge tab, exports a model, and takes a screenshot of every
tab into ``docs/board/`` (shown in the README). ``make test-ui`` runs it.

``MARK_BOARD_CHECKPOINTS=/path/to/checkpoints`` (e.g. a ``make demo`` output) serves those
models instead of the tiny ones, for screenshots of real answers (read only: runs, ratings
and exports still go to the test's folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.api.fixtures import REPO, free_port, tiny_checkpoints  # noqa: F401
from tests.board.conftest import write_tiny_mamba_config

pytestmark = [pytest.mark.ui, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "docs" / "board"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoints: Path, sample_data_dir: Path) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("board_ui")
    demo = os.environ.get("MARK_BOARD_CHECKPOINTS")
    if demo:
        checkpoints = Path(demo).resolve()
    else:
        checkpoints = root / "checkpoints"
        checkpoints.mkdir()
        (checkpoints / "mamba").symlink_to(tiny_checkpoints / "mamba", target_is_directory=True)
        shutil.copytree(tiny_checkpoints / "rag", checkpoints / "rag")
    logs = checkpoints.parent / "logs" if demo else root / "logs"  # the demo's runs (read only) in the Runs tab
    return {"root": root, "checkpoints": checkpoints, "config": write_tiny_mamba_config(root, sample_data_dir, max_steps=200_000, num_epochs=1000),
            "preferences": root / "prefs" / "preferences.jsonl", "model": "rlhf" if demo else "mamba", "logs": logs,
            "demo_run": "logs/transfer" if demo else None}


@pytest.fixture(scope="module")
def board_url(project: dict):
    port = free_port()
    root = project["root"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("MARK_API_KEY", None)
    log = open(root / "board.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "src.training.orchestrator", "board", "--port", str(port), "--data-root", str(root),
         "--data-root", str(project["checkpoints"]), "--checkpoints-dir", str(project["checkpoints"]),
         "--logs-dir", str(project["logs"]), "--runs-dir", str(root / "runs"), "--preferences-file", str(project["preferences"]),
         "--device", "cpu"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mark board exited: {(root / 'board.log').read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"mark board did not start: {(root / 'board.log').read_text()}")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    # A run left going by a failed test is stopped (runs are detached from the Board on purpose).
    for record in (root / "runs").glob("*/run.json"):
        pid = json.loads(record.read_text())["pid"]
        try:
            os.killpg(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="board-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers
def _wait(browser, condition, timeout: float = 90.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.3).until(lambda d: condition(d), message=what)


def _by_id(browser, elem_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, elem_id)


def _text(browser, elem_id: str) -> str:
    return _by_id(browser, elem_id).text


def _type(browser, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = _by_id(browser, elem_id).find_element(By.CSS_SELECTOR, "textarea, input")
    box.clear()
    box.send_keys(text)


def _click(browser, elem_id: str) -> None:
    element = _by_id(browser, elem_id)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def _tab(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    button = browser.find_element(By.XPATH, f"//button[@role='tab' and normalize-space(.)='{name}']")
    button.click()
    time.sleep(0.5)


def _shot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0);")
    height = browser.execute_script("return Math.min(2400, document.body.scrollHeight);")
    browser.set_window_size(1400, max(900, height))
    time.sleep(0.5)
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    browser.set_window_size(1400, 1100)


def _points(status: str) -> int:
    for part in status.split("·"):
        if "curve points" in part:
            return int(part.split()[0])
    return -1


# ---------------------------------------------------------------------------- the test
def test_every_tab_in_chromium(browser, board_url: str, project: dict) -> None:
    browser.get(board_url)
    _wait(browser, lambda d: "MARK Board" in d.page_source and d.find_elements("css selector", "#train-form table"), what="the page")
    # The page's own load event fills the form from the default config (or, in a clean clone without the sample data,
    # shows why it cannot): wait for it, or its late answer would overwrite the form loaded below.
    _wait(browser, lambda d: "model." in _text(d, "train-form") or "error" in _text(d, "train-message"), what="the default form")

    # Train: the tiny config's form, Start, the curve grows, Stop.
    _type(browser, "train-config", str(project["config"]))
    _click(browser, "train-load")
    _wait(browser, lambda d: "model.d_model" in _text(d, "train-form"), what="the config form")
    _click(browser, "train-start")
    _wait(browser, lambda d: "started" in _text(d, "train-message"), what="the run to start")
    first = _wait(browser, lambda d: _points(_text(d, "train-status")) >= 2 and _text(d, "train-status"), timeout=150, what="curve points")
    _wait(browser, lambda d: _points(_text(d, "train-status")) > _points(first), timeout=90, what="the curve to update")
    assert "running" in first and "src.training.orchestrator train --target=mamba" in first
    _wait(browser, lambda d: d.find_elements("css selector", "#train-plot img, #train-plot canvas, #train-plot svg"), what="the plot")
    _shot(browser, "train")
    _click(browser, "train-stop")
    _wait(browser, lambda d: "SIGTERM sent" in _text(d, "train-message") or "error" in _text(d, "train-message"), what="the stop")
    assert "SIGTERM sent" in _text(browser, "train-message"), _text(browser, "train-message")  # not "already ended"
    _wait(browser, lambda d: "**stopped**" in d.page_source or "stopped" in _text(d, "train-status").split("·")[0], timeout=90,
          what="the run to stop")

    # Runs: the stopped run's metrics and curves.
    _tab(browser, "Runs")
    _click(browser, "runs-refresh")
    _wait(browser, lambda d: "final" in _text(d, "runs-metrics"), what="a run's metrics")
    if project["demo_run"]:  # a demo run: its metrics next to the baseline its component measured
        run = _by_id(browser, "runs-run").find_element("css selector", "input")
        run.clear()
        run.send_keys(project["demo_run"] + "\n")
        _wait(browser, lambda d: "tfidf" in _text(d, "runs-metrics") + _text(d, "runs-evaluation"), what="the demo run's baseline")
    _shot(browser, "runs")

    # Knowledge: search with highlighted matches.
    _tab(browser, "Knowledge")
    _wait(browser, lambda d: "documents" in _text(d, "kb-info"), what="the index info")
    _type(browser, "kb-query", "thread pool executor")
    _click(browser, "kb-search")
    _wait(browser, lambda d: "#1 " in _text(d, "kb-results"), what="search results")
    assert _by_id(browser, "kb-results").find_elements("css selector", "mark")
    _shot(browser, "knowledge")

    # Chat: an answer with evidence, then two sampled answers and a pick.
    _tab(browser, "Chat")
    model = _by_id(browser, "chat-model").find_element("css selector", "input")
    model.clear()
    model.send_keys(project["model"] + "\n")
    _type(browser, "chat-input", "What does a thread pool executor do?")
    _click(browser, "chat-send")
    _wait(browser, lambda d: "answer by" in _text(d, "chat-status"), timeout=120, what="the answer")
    assert "Evidence" in _text(browser, "chat-evidence") and "Sources" in _text(browser, "chat-evidence")
    _click(browser, "chat-sample")
    _wait(browser, lambda d: "pick the better" in _text(d, "chat-status"), timeout=120, what="two answers")
    _click(browser, "chat-pick-a")
    _wait(browser, lambda d: "pair written" in _text(d, "chat-status"), what="the pair")
    pairs = [json.loads(line) for line in project["preferences"].read_text().splitlines()]
    assert len(pairs) == 1 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert pairs[0]["prompt"].endswith("Question: What does a thread pool executor do?\nAnswer:")
    _shot(browser, "chat")

    # Export: the mamba model as a transformers folder, with the command it ran.
    _tab(browser, "Export")
    _by_id(browser, "export-model").find_element("css selector", "input").send_keys("\n")
    _type(browser, "export-output", str(project["root"] / "exports" / "mamba-hf"))
    model = _by_id(browser, "export-model").find_element("css selector", "input")
    model.clear()
    model.send_keys("mamba\n")
    _click(browser, "export-run")
    _wait(browser, lambda d: "command:" in _text(d, "export-result") or "error" in _text(d, "export-result"), timeout=120, what="the export")
    assert "exported" in _text(browser, "export-result"), _text(browser, "export-result")
    assert (project["root"] / "exports" / "mamba-hf" / "config.json").is_file()
    _shot(browser, "export")
