"""The chat page of `kiln serve` (GET /), driven in a real headless Chromium from Debian's packages.

A real `kiln serve` subprocess (tiny Qwen2 f32 GGUF, an API key, one thread) on a free loopback port, and
Debian's `chromium` through its `chromedriver` (given explicitly, so Selenium Manager downloads nothing).
The page is loaded as a user would: it asks for the key, lists the models, streams an answer into the DOM
(checked against the same request answered whole by the API), shows the SMC posterior of a regex-
constrained answer, and its Stop button aborts a stream. A screenshot goes to the test's tmp_path (and to
$KILN_TEST_ARTIFACTS when set). Skipped, with the reason, without chromium/chromedriver or selenium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from serve_process import http, start, stop  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (make go-toolchain installs them)",
                allow_module_level=True)

KEY = "page-key"
SYSTEM = "You answer briefly."
QUESTION = "Tell me about the river."
REGEX = "[a-z]{3,5}"
STATIC = Path(__file__).resolve().parent.parent / "src" / "kiln" / "serve" / "static"


def _request(base: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict, bytes]:
    return http(base, path, body, key, timeout=60)


@pytest.fixture(scope="module")
def base(tiny_qwen2_f32_gguf: Path, tmp_path_factory):
    """The URL of a `kiln serve` over the tiny Qwen2 GGUF (model id tq2), with an API key."""
    log = tmp_path_factory.mktemp("serve-page") / "server.log"
    proc, url = start([f"tq2={tiny_qwen2_f32_gguf}", "--api-key", KEY, "--threads", "1", "--log-level", "warning"], log)
    yield url
    stop(proc, log)


@pytest.fixture(scope="module")
def browser(base: str, tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--window-size=1280,860", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.get(base + "/")
        yield driver
    finally:
        driver.quit()


def _wait(driver, check, timeout: float = 60.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: check(d))


def _set(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    if value:
        el.send_keys(value)


def _last_answer(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1]


def _send(driver, text: str) -> None:
    count = len(driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")) == count + 1, 10)


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("KILN_TEST_ARTIFACTS"):
        dest = Path(os.environ["KILN_TEST_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / name)
    return path


# --- tests (in order: they share one page) -------------------------------------------------------
def test_the_page_is_static_self_contained_and_needs_no_key(base: str) -> None:
    status, headers, raw = _request(base, "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        status, headers, _ = _request(base, f"/static/{name}", key=None)
        assert status == 200 and headers["content-type"].startswith(kind)
    assert _request(base, "/static/../app.py", key=None)[0] == 404
    assert _request(base, "/static/nothing.js", key=None)[0] == 404
    assert _request(base, "/v1/models", key=None)[0] == 401  # the API stays behind the key
    for f in STATIC.iterdir():  # nothing is loaded from elsewhere
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text()), f


def test_key_is_asked_once_and_a_streamed_answer_equals_the_whole_greedy_answer(browser, base: str) -> None:
    overlay = browser.find_element(By.ID, "key-overlay")
    _wait(browser, lambda d: overlay.is_displayed(), 20)
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    _wait(browser, lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded") == "true", 20)
    assert not overlay.is_displayed()
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options] == ["tq2"]
    assert browser.execute_script("return sessionStorage.getItem('kiln-api-key')") == KEY
    assert browser.execute_script("return localStorage.length") == 0

    _set(browser, "system", SYSTEM)
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", "12")
    # count the DOM updates of the answer: a streamed answer grows in several steps
    browser.execute_script("""
        window.__updates = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.classList && r.target.classList.contains('text')) window.__updates++;
        }).observe(document.getElementById('log'), {childList: true, subtree: true});""")
    _send(browser, QUESTION)
    answer = _last_answer(browser)
    _wait(browser, lambda d: answer.get_attribute("data-state") == "done")
    shown = answer.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")

    status, _, raw = _request(base, "/v1/chat/completions", {
        "model": "tq2", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]})
    assert status == 200, raw
    whole = json.loads(raw)
    assert shown == whole["choices"][0]["message"]["content"] and shown
    tokens = whole["usage"]["completion_tokens"]
    assert browser.execute_script("return window.__updates") >= min(tokens, 2)
    assert re.search(rf"\b{tokens} tokens?\b", answer.find_element(By.CSS_SELECTOR, ".meta").text)


def test_a_regex_constrained_answer_shows_its_smc_posterior(browser, tmp_path: Path) -> None:
    _set(browser, "temperature", "1")
    _set(browser, "max-tokens", "8")
    Select(browser.find_element(By.ID, "constraint-kind")).select_by_value("regex")
    _set(browser, "constraint", REGEX)
    _set(browser, "particles", "8")
    _send(browser, "Name the river in one word.")
    answer = _last_answer(browser)
    _wait(browser, lambda d: answer.get_attribute("data-state") == "done")
    text = answer.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")
    assert re.fullmatch(REGEX, text), text
    head = answer.find_element(By.CSS_SELECTOR, ".posterior-head").text
    m = re.fullmatch(r"SMC posterior · 8 particles · ESS ([0-9.]+) · log Ẑ (-?[0-9.]+) · .*", head)
    assert m and 1.0 <= float(m.group(1)) <= 8.0 and float(m.group(2)) < 0, head
    rows = answer.find_elements(By.CSS_SELECTOR, ".posterior tr")
    answers = [r.find_element(By.CSS_SELECTOR, "td.answer").text for r in rows]
    probs = [float(r.find_element(By.CSS_SELECTOR, "td.p").text.rstrip("%")) for r in rows]
    assert answers and all(re.fullmatch(REGEX, a) for a in answers) and text in answers
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100 + 0.05 * len(probs)
    assert len(probs) == 5 or abs(sum(probs) - 100) <= 0.05 * len(probs)  # the top 5 of the posterior, or all of it
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 4  # the conversation is kept
    _screenshot(browser, tmp_path, "kiln-serve-chat-page.png")


def test_new_chat_then_stop_aborts_the_stream(browser, base: str) -> None:
    browser.find_element(By.ID, "new-chat").click()  # a fresh conversation: 440 tokens fit the context again
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .msg")
    Select(browser.find_element(By.ID, "constraint-kind")).select_by_value("")
    _set(browser, "temperature", "1.5")
    _set(browser, "max-tokens", "440")
    # click Stop from inside the page as soon as the first text arrives (a Selenium round trip could be late)
    browser.execute_script("""
        const log = document.getElementById('log');
        const obs = new MutationObserver(() => {
          const last = [...log.querySelectorAll('.msg.assistant.streaming .text')].pop();
          if (last && last.textContent) { obs.disconnect(); document.getElementById('stop').click(); }
        });
        obs.observe(log, {childList: true, subtree: true});""")
    _send(browser, "Tell me a long story about the river.")
    answer = _last_answer(browser)
    _wait(browser, lambda d: answer.get_attribute("data-state") in ("stopped", "done", "error"))
    assert answer.get_attribute("data-state") == "stopped", answer.text
    assert "stopped" in answer.find_element(By.CSS_SELECTOR, ".meta").text
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    # the server noticed the closed stream and freed the engine
    deadline = time.monotonic() + 30
    while json.loads(_request(base, "/health", key=None)[2])["models"]["tq2"]["busy"]:
        assert time.monotonic() < deadline, "the engine is still busy after Stop"
        time.sleep(0.05)
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and " 401 " not in e["message"]]
    assert not logs, logs  # no script error, no blocked resource
