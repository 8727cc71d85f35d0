"""The chat page in a real headless Chromium (Debian's package), driven by Playwright.

`.ci/run` installs Chromium with apt when it is missing; if no browser can be found this
test FAILS and says so: it is never skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import vlmkit

from .conftest import PHOTOS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for candidate in (os.environ.get("VLMKIT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("no Chromium found for the web page test: install Debian's `chromium` package "
                "(apt-get install chromium) or set VLMKIT_CHROMIUM; `.ci/run` does this itself")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_ask_about_a_photo_and_see_the_streamed_answer(browser, server, models, tmp_path):
    expected = vlmkit.load(models["v15-hf"]).chat(
        [{"role": "user", "content": "What is in this photo?", "images": [PHOTOS / "chelsea.png"]}],
        temperature=0, max_new_tokens=24).text
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-llava'")
    page.set_input_files("#file", str(PHOTOS / "chelsea.png"))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What is in this photo?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 1 && "
                           "!document.getElementById('send').disabled")
    answer = page.text_content(".turn.assistant")
    assert answer == expected and answer
    assert page.is_visible(".turn.user img")  # the photo is shown in the conversation
    # VLMKIT_SCREENSHOT=docs/chat-page.png refreshes the README's picture
    page.screenshot(path=os.environ.get("VLMKIT_SCREENSHOT") or str(tmp_path / "chat-page.png"))

    # follow-up turn, then regenerate: the same greedy answer again
    page.fill("#prompt", "And the colours?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 2 && "
                           "!document.getElementById('send').disabled")
    second = page.text_content(".turn.assistant >> nth=1")
    page.click("#regenerate")
    page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 2 && "
                           "!document.getElementById('send').disabled")
    assert page.text_content(".turn.assistant >> nth=1") == second
    page.click("#clear")
    assert page.locator(".turn").count() == 0
    page.close()


def test_a_broken_image_shows_the_apis_message(browser, server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes((PHOTOS / "chelsea.png").read_bytes()[:3000])
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-llava'")
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#prompt", "What is this?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error")
    assert "truncated" in message.lower() and "network error" not in message.lower()
    assert page.locator(".turn.assistant").count() == 0
    page.close()
