"""The chat page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium; nothing is downloaded) loads ``/``, sends a message, sees the streamed reply
appear, reloads and still sees the conversation, then starts a new chat.

Skips when no Chromium is installed: ``sudo apt-get install chromium chromium-driver``."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from helpers_serve import live_server, tiny_run  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from gpt.infer.config import ServeConfig  # noqa: E402
from gpt.serve.server import load_for_serving  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="no Chromium: sudo apt-get install chromium "
        "chromium-driver (Debian/Ubuntu) to run the browser test",
    ),
]


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply_and_keeps_the_conversation(tmp_path, browser):
    served = load_for_serving(ServeConfig(ckpt=str(tiny_run(tmp_path / "tiny")), device="cpu"))
    with live_server(served.model, served.tokenizer, ServeConfig(), name="tiny") as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: "model: tiny" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "system").send_keys("Be brief.")
        temperature = browser.find_element(By.ID, "temperature")
        browser.execute_script(
            "arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'))", temperature
        )
        browser.find_element(By.ID, "input").send_keys("Who is Romeo?")
        browser.find_element(By.ID, "send").click()
        reply = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
        wait.until(lambda d: reply(d) and reply(d)[0].text.strip())
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream has ended
        text = reply(browser)[0].text
        raw = reply(browser)[0].get_attribute("textContent")  # .text trims; the reply is shown as written
        assert raw.strip() and not raw.startswith(" "), repr(raw)
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text == "Who is Romeo?"
        assert server.service.counters.requests["chat"] == 1, text
        browser.refresh()
        wait.until(lambda d: reply(d))
        assert reply(browser)[0].text == text, "the conversation survives a reload"
        assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
