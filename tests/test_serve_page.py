"""The chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): type a message, watch the reply stream in, and check it is the API's reply. Skips with
the reason where Chromium is not installed (.ci/run installs it)."""

import shutil
import tempfile

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra (selenium) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from babyllama.serve.client import ServerProcess, babyllama_serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(babyllama_serve("--port", "0")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or not shutil.os.path.exists(DRIVER):
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="babyllama-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # an explicit driver path: selenium then never tries to download one
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# Counts the reply's text changes while it streams (one per arriving piece).
OBSERVE = """
window.__updates = 0;
new MutationObserver(() => { window.__updates += 1; })
  .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def test_typed_message_streams_the_apis_reply(server, browser):
    import openai

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert browser.find_element(By.ID, "model").text == "babyllama"
    browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                           "t.dispatchEvent(new Event('input'));")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("48")
    browser.find_element(By.ID, "system").send_keys("You tell stories.")
    browser.execute_script(OBSERVE)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Tell me about a dog")
    box.send_keys("\n")  # Enter sends
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']"))
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant").text
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "Tell me about a dog"
    assert browser.find_element(By.ID, "error").text == ""
    # the same request through the API, greedy: the page showed exactly its reply
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    expected = api.chat.completions.create(
        model="babyllama", temperature=0, max_tokens=48,
        messages=[{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a dog"}],
    ).choices[0].message.content
    assert reply == expected.strip() and reply
    assert browser.execute_script("return window.__updates") > 5  # it arrived in pieces, not at once
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "first token" in stats
    # nothing came from anywhere but the server: the page works offline
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert origins and all(o.startswith(server.url) for o in origins)
