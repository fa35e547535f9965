"""The chat page in a real headless browser (Debian's chromium driven by playwright): a typed message gets a
streamed reply, Stop ends it mid-stream (and the server drops the request), and markup in the model's
output is shown as text. The server is gptlab's app; the model is a scripted stand-in whose reply is
known, so the page is tested, not the model. The screenshot is kept under tests/artifacts/."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt install chromium)")

from gptlab.generate import TokenEvent  # noqa: E402
from gptlab.serve.app import ServeConfig, create_app  # noqa: E402
from gptlab.serve.scheduler import SchedulerStats  # noqa: E402
from conftest import LoopbackServer  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
REPLY = ["Here ", "is ", "<script>", "window.pwned=1", "</script>", " <b>bold</b>", " done."]


class Scripted:
    """What create_app needs of a Scheduler; each request streams REPLY (then filler words) one piece
    every `delay` seconds on its own thread, and stops early when cancelled."""

    def __init__(self, tokenizer, delay: float, filler: int) -> None:
        from types import SimpleNamespace

        self.tokenizer, self.block, self.delay, self.filler = tokenizer, 256, delay, filler
        self.engine = SimpleNamespace(V=tokenizer.vocab_size)
        self.stats = SchedulerStats()
        self.requests = []

    def submit(self, req) -> None:
        self.requests.append(req)

        def play() -> None:
            pieces = REPLY + [" more"] * self.filler
            for i, piece in enumerate(pieces):
                if req.cancelled.is_set():
                    return
                time.sleep(self.delay)
                req.emit(TokenEvent(0, 1, piece, finish_reason="stop" if i == len(pieces) - 1 else None))

        threading.Thread(target=play, daemon=True).start()

    def close(self) -> None:
        pass


@pytest.fixture()
def page_server(tok):
    from gptlab.chat import add_chat_tokens

    chat_tok, _ = add_chat_tokens(tok)
    sched = Scripted(chat_tok, delay=0.02, filler=0)
    server = LoopbackServer(create_app(sched, ServeConfig(model_name="scripted")))
    yield sched, server
    server.close()


def test_the_page_streams_stops_and_shows_markup_as_text(page_server) -> None:
    sched, server = page_server
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#system", "Be brief.")
            page.fill("#input", "Say something with markup")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            page.wait_for_function("() => document.querySelector('#stop').disabled === true && document.querySelectorAll('.msg.assistant').length === 1"
                                   " && document.querySelector('.msg.assistant').textContent.endsWith('done.')", timeout=15000)  # fmt: skip
            assert reply.text_content() == "".join(REPLY)  # the markup is text in the page...
            assert page.locator(".msg.assistant script, .msg.assistant b").count() == 0  # ...not elements
            assert page.evaluate("() => window.pwned === undefined")
            assert "tokens" in page.locator("#status").text_content()
            sent = sched.requests[-1]
            asked = sched.tokenizer.decode(sent.prompt)  # the page's settings reached the server in the chat template
            assert asked.startswith("<|im_start|>system\nBe brief.<|im_end|>") and asked.endswith("Say something with markup<|im_end|>\n<|im_start|>assistant\n")
            # a long reply: Stop mid-stream ends it in the page and on the server
            sched.delay, sched.filler = 0.05, 400
            page.fill("#input", "Go on")
            page.click("#send")
            second = page.locator(".msg.assistant").nth(1)
            page.wait_for_function("() => (document.querySelectorAll('.msg.assistant')[1] || {}).textContent?.includes('more more')", timeout=15000)
            page.click("#stop")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant')[1].classList.contains('stopped')", timeout=5000)
            shown = second.text_content()
            time.sleep(0.5)
            assert second.text_content() == shown and shown.count("more") < 400  # nothing arrives after Stop
            deadline = time.time() + 5
            while not sched.requests[-1].cancelled.is_set() and time.time() < deadline:
                time.sleep(0.05)
            assert sched.requests[-1].cancelled.is_set()  # the server noticed the client leave
            assert len(sched.requests[-1].prompt) > len(sent.prompt)  # the second turn carried the first
            page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
