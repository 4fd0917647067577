"""The chat page in a real browser (Debian's chromium, headless, driven by Playwright): a Korean message goes
out, the reply streams into the page, and the page shows exactly what the API returns for the same
conversation; the stop button ends a reply and frees the server's slot. CI installs chromium (.ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import time

import openai
import pytest

from kanana_quant.loader import open_model
from kanana_quant.serve import Service, Settings
from kanana_quant.synth import TINY, synth_model
from test_serve import running

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    if shutil.which(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium before the tests")
    pytest.skip(f"{CHROMIUM} not installed on this developer machine (`apt-get install chromium`; CI installs it)")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    model = synth_model(tmp_path_factory.mktemp("page") / "tiny", {**TINY["dense"], "max_position_embeddings": 4096},
                        seed=11)
    service = Service(open_model(str(model)), Settings(engine="numpy", name="tiny"))
    with running(service) as url:
        yield url, service
    service.close()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        # The page forbids eval (its CSP); Playwright's polling predicates need it, so the test context
        # bypasses the CSP (test_serve.py checks the header itself).
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                       headless=True, args=FLAGS, bypass_csp=True)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_korean_message_gets_a_streamed_reply(page_server, page, tmp_path):
    url, _ = page_server
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.click("#settings summary")
    page.fill("#system", "너는 카카오가 만든 카나나야.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    # Count the changes to the conversation while the reply arrives: a streamed reply grows in many steps.
    page.evaluate("""() => { window.updates = 0; new MutationObserver((r) => window.updates += r.length).observe(
        document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#input", "안녕하세요! 오늘 서울 날씨는 어때요?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
    assert page.inner_text(".msg.user") == "안녕하세요! 오늘 서울 날씨는 어때요?"
    reply = page.eval_on_selector(".msg.assistant span", "e => e.textContent")
    meta = page.inner_text(".msg.assistant .meta")
    assert page.evaluate("window.updates") >= 6, "the reply did not arrive in pieces"
    page.screenshot(path=str(tmp_path / "chat.png"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    expected = client.chat.completions.create(model="tiny", temperature=0, max_tokens=24, messages=[
        {"role": "system", "content": "너는 카카오가 만든 카나나야."},
        {"role": "user", "content": "안녕하세요! 오늘 서울 날씨는 어때요?"}])
    assert reply == expected.choices[0].message.content and reply
    assert f"finish: {expected.choices[0].finish_reason}" in meta
    assert f"{expected.usage.completion_tokens} tokens" in meta


def test_stop_button_ends_the_reply_and_frees_the_slot(page_server, page):
    url, service = page_server
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.click("#settings summary")
    page.fill("#max-tokens", "3500")  # seconds of tokens unless stopped
    page.fill("#temperature", "0")  # greedy: this reply is known not to end early (sampled, it could)
    page.fill("#input", "길게 말해 줘")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant span') && "
                           "document.querySelector('.msg.assistant span').textContent.length > 0")
    assert page.is_enabled("#stop"), page.inner_text("#log")
    page.click("#stop")  # while the tiny model streams hundreds of tokens a second
    page.wait_for_selector(".msg.assistant .meta")
    assert "finish: stopped" in page.inner_text(".msg.assistant .meta")
    deadline = time.monotonic() + 5
    while service.health()["busy"]:
        assert time.monotonic() < deadline, "the server kept generating after the page stopped"
        time.sleep(0.05)
    assert json.loads(json.dumps(service.health()))["queued"] == 0


def test_tool_calls_show_as_they_stream(page_server, page):
    url, _ = page_server
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.click("#settings summary")
    page.fill("#tools", json.dumps([tool]))
    page.select_option("#tool-choice", "required")
    page.fill("#max-tokens", "200")  # room for the first call even written byte by byte
    page.fill("#input", "서울 날씨 알려줘")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
    shown = page.inner_text(".msg.assistant .call")
    assert shown.startswith("🔧 get_weather(") and shown.endswith(")")
    arguments = json.loads(shown[len("🔧 get_weather("):-1])
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 8
