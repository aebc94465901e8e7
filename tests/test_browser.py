"""The page in a real browser: Playwright drives Debian's Chromium (never a downloaded one).

Most tests use a tiny random GPT-2 (fast, gibberish replies); the screenshot test uses the real model.
Screenshots go to test-output/; with UPDATE_SCREENSHOTS=1 the real-model ones are also copied to
assets/screenshots/ for the README.
"""

from __future__ import annotations

import shutil
import time

import pytest
from app_server import CHROMIUM, OUTPUT_DIR, real_bot, serve, tiny_bot, updating_screenshots

from chatbot.bot import DEFAULT_K, MAX_MESSAGE_CHARS
from chatbot.runtime import ASSETS_DIR
from chatbot.web import build_demo

pytestmark = pytest.mark.browser

XSS = "<img src=x onerror=alert(1)> <script>alert(1)</script>"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def tiny_bot_for_browser(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory):
    bot = tiny_bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory.mktemp("browser") / "index")
    # The random 2-layer model can write a whole reply between two looks of the page; a pause per decoding step
    # keeps the reply growing in view on a busy machine too (the streaming test once saw only the final text).
    bot.chat.model.register_forward_hook(lambda *_: time.sleep(0.02))
    return bot


@pytest.fixture(scope="module")
def tiny_url(browser, tiny_bot_for_browser):
    with serve(build_demo(tiny_bot_for_browser)) as url:
        yield url


class Page:
    """A browser tab on the app that records every JavaScript dialog (there must be none)."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.goto(url)
        self.page.wait_for_selector("#message textarea", timeout=60_000)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def bot_messages(self) -> list[str]:
        return [t.strip() for t in self.page.locator('#chatbot [data-testid="bot"]').all_inner_texts()]

    def send(self, text: str, timeout: float = 60, settle: float = 1.5) -> list[str]:
        """Send a chat message; returns the distinct states the new reply went through, the last one final."""
        before = len(self.bot_messages())
        self.page.fill("#message textarea", text)
        self.page.click("#send")
        return self._watch(lambda: self.bot_messages()[before] if len(self.bot_messages()) > before else "",
                           timeout, settle)

    def compare(self, text: str, timeout: float = 60, settle: float = 1.5) -> tuple[str, str]:
        """Ask for a comparison on the Compare tab; returns the final (left, right) replies."""
        self.page.get_by_role("tab", name="Compare").click()
        self.page.fill("#compare-message textarea", text)
        self.page.click("#compare-button")

        def both() -> str:
            left = self.page.locator("#left-reply textarea").input_value().strip()
            right = self.page.locator("#right-reply textarea").input_value().strip()
            return f"{left}\n---\n{right}" if left and right else ""

        final = self._watch(both, timeout, settle)[-1]
        left, right = final.split("\n---\n")
        return left, right

    @staticmethod
    def _watch(read, timeout: float, settle: float) -> list[str]:
        states: list[str] = []
        changed = deadline = time.monotonic()
        deadline += timeout
        while time.monotonic() < deadline:
            text = read()
            if text and (not states or text != states[-1]):
                states.append(text)
                changed = time.monotonic()
            elif states and time.monotonic() - changed > settle:
                return states
            time.sleep(0.05)
        raise AssertionError(f"no settled reply within {timeout}s; saw {states[-3:]}")

    def screenshot(self, name: str) -> None:
        OUTPUT_DIR.mkdir(exist_ok=True)
        self.page.mouse.move(0, 0)  # no hover highlight on the last button clicked
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(OUTPUT_DIR / name), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, tiny_url):
    tab = Page(browser, tiny_url)
    yield tab
    assert tab.dialogs == [], "a JavaScript dialog opened"
    tab.close()


def test_chat_streams_a_reply_and_shows_emotion_and_retrieved_dialogues(page):
    states = page.send("My goldfish died this morning. I had him for six years.")
    assert len(states) >= 2 and all(states), states  # the reply grew in front of us
    assert page.page.locator("#emotion").inner_text().strip() != "Detected emotion (latest message)"
    assert "%" in page.page.locator("#emotion").inner_text()
    cards = page.page.locator("#retrieved .ed-card")
    assert cards.count() == DEFAULT_K and "goldfish" in page.page.locator("#retrieved").inner_text()
    page.screenshot("chat-tiny.png")
    page.page.click("#clear")
    page.page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")


def test_example_fills_the_message_box(page):
    from playwright.sync_api import expect

    page.page.get_by_text("My dog died today. I am so distraught.").first.click()
    expect(page.page.locator("#message textarea")).to_have_value("My dog died today. I am so distraught.")


def test_compare_tab_shows_two_replies_and_a_table(page):
    left, right = page.compare("My trip to the coast got cancelled.")
    assert left and right
    assert page.page.locator("#compare-retrieved .ed-card").count() == DEFAULT_K
    assert "My trip to the coast got cancelled." in page.page.locator("#comparisons").inner_text()
    assert page.page.locator("#download-csv").is_visible()
    page.screenshot("compare-tiny.png")


def test_html_and_script_show_as_text_and_never_run(page):
    page.send(XSS)
    chat = page.page.locator("#chatbot")
    assert XSS in chat.inner_text()
    assert chat.locator("img[src='x'], script").count() == 0
    page.compare(XSS)
    assert XSS in page.page.locator("#comparisons").inner_text()
    assert page.page.locator("#comparisons img[src='x'], #comparisons script").count() == 0
    page.page.wait_for_timeout(500)
    assert page.dialogs == []


def test_long_message_is_shortened_and_the_page_says_so(page):
    states = page.send("so tired " * 11_200)
    assert states[-1]
    assert f"shortened to its first {MAX_MESSAGE_CHARS} characters" in page.page.locator("#notes").inner_text()


def test_crisis_message_is_visibly_marked(page):
    reply = page.send("I want to kill myself")[-1]
    assert "988" in reply and "Safety message" in reply
    assert page.page.locator("#crisis-banner").is_visible()
    assert "crisis resources" in page.page.locator("#crisis-banner").inner_text()
    # The page keeps serving afterwards: the follow-up gets the model's reply (with the concern tier's check-in
    # banner, since the crisis message is among the user's last turns), not the crisis message again.
    assert "Safety message" not in page.send("Thank you, I feel a bit better now.")[-1]
    banner = page.page.locator("#crisis-banner")
    assert not banner.is_visible() or "Check-in" in banner.inner_text()


def test_stop_ends_the_reply_and_the_chat_goes_on(page, tiny_bot_for_browser, monkeypatch):
    generate = tiny_bot_for_browser._generate

    def slow(*args, **kwargs):
        for text in generate(*args, **kwargs):
            time.sleep(0.3)
            yield text

    monkeypatch.setattr(tiny_bot_for_browser, "_generate", slow)
    page.page.fill("#message textarea", "My goldfish died this morning.")
    page.page.click("#send")
    page.page.wait_for_selector('#chatbot [data-testid="bot"]', timeout=30_000)
    page.page.click("#stop")
    page.page.wait_for_timeout(1500)
    stopped = page.bot_messages()[-1]
    page.page.wait_for_timeout(1500)
    assert page.bot_messages()[-1] == stopped  # no longer growing
    monkeypatch.undo()
    assert page.send("Are you still there?", timeout=30)[-1]
    assert len(page.bot_messages()) == 2


@pytest.mark.integration
def test_real_model_screenshots(browser):
    bot = real_bot()
    with serve(build_demo(bot)) as url:
        tab = Page(browser, url)
        try:
            states = tab.send("My dog died today. I am so distraught.", timeout=240, settle=5)
            assert len(states[-1].split()) >= 3
            assert tab.page.locator("#retrieved .ed-card").count() == bot.k
            tab.page.evaluate("window.scrollTo(0, 0)")
            tab.screenshot("chat.png")
            left, right = tab.compare("I had such a hard day at work today. Things keep piling up.",
                                      timeout=300, settle=5)
            assert left and right
            tab.screenshot("compare.png")
            tab.page.get_by_role("tab", name="Results & About").click()
            tab.page.wait_for_selector("text=Models in use")
            assert "not a therapist" in tab.page.inner_text("body")
            tab.screenshot("about.png")
            assert tab.dialogs == []
        finally:
            tab.close()
    if updating_screenshots():
        target = ASSETS_DIR / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("chat.png", "compare.png"):
            shutil.copyfile(OUTPUT_DIR / name, target / name)
