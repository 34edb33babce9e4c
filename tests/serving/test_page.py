"""The page in a real headless browser: Debian's Chromium driven by Selenium through the system chromedriver
(nothing is downloaded). Without them the test fails and says how to install them: a page nobody checked is
not skipped.

A person uploads an image, clicks "exclude" on the top neighbour, sees the decision change beside the old
one, applies the change with the write token and sees the new version decide as the re-vote said.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time

import httpx
import pytest
import uvicorn

from serving.app import create_app
from serving.settings import ServeSettings
from tests.serving.helpers import TOKEN, flipping_query

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _driver(profile: str):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium or chromedriver is not installed; the page test drives Chromium through chromedriver: "
                    "run `make install` (it installs Debian's chromium and chromium-driver packages) or "
                    "`apt-get install chromium chromium-driver`", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager downloads nothing.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(served_memory):
    """The app on uvicorn on 127.0.0.1, in a thread: (base url, memory)."""
    port = _free_port()
    settings = ServeSettings(memory=served_memory, port=port, write_token=TOKEN, refresh_interval_s=0.1)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", served_memory
    instance.should_exit = True
    thread.join(timeout=30)


def test_exclude_a_neighbour_see_the_decision_change_and_apply_it(server, fmnist_small):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    base, memory = server
    with httpx.Client(base_url=base, timeout=60) as api:
        path, _, expected = flipping_query(api, fmnist_small, k=3)
        revote = api.post("/v1/revote?k=3", json={"embedding": expected["embedding"], "changes": [
            {"id": expected["neighbors"][0]["id"], "weight": 0}]}).json()
    before, after = revote["before"]["label_name"], revote["after"]["label_name"]
    with tempfile.TemporaryDirectory(prefix="vmem-chromium-") as profile:
        driver = _driver(profile)
        try:
            wait = WebDriverWait(driver, 60)

            def state_is(name: str) -> None:
                wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in (name, "error"))
                error = driver.find_element(By.ID, "error").text
                assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == name, error

            driver.get(base + "/")
            state_is("ready")
            assert driver.find_element(By.ID, "version").text == "1"
            k = driver.find_element(By.ID, "k")
            k.clear()
            k.send_keys("3\t")  # Tab: the change event fires now, not when a later click takes the focus.
            driver.find_element(By.ID, "file").send_keys(path)
            state_is("classified")
            assert driver.find_element(By.CSS_SELECTOR, "#before .label").text == before
            figures = driver.find_elements(By.CSS_SELECTOR, "#neighbours figure")
            assert len(figures) == 3 and figures[0].get_attribute("data-id") == expected["neighbors"][0]["id"]
            wait.until(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#neighbours img')).every(i => i.complete && i.naturalWidth > 0)"))
            assert driver.find_element(By.ID, "apply").get_attribute("disabled") is not None  # Nothing to apply yet.

            figures[0].find_element(By.CSS_SELECTOR, "button.exclude").click()
            state_is("revoted")
            assert driver.find_element(By.CSS_SELECTOR, "#after .label").text == after != before
            assert driver.find_element(By.CSS_SELECTOR, "#before .label").text == before  # Beside the old one.
            assert "excluded" in driver.find_element(By.CSS_SELECTOR, "#neighbours figure").get_attribute("class")

            note = "<b>not a</b> " + before
            driver.find_element(By.ID, "note").send_keys(note)
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "apply").click()
            state_is("applied")
            applied = driver.find_element(By.ID, "applied")
            assert applied.text.startswith("published version 2 (parent 1)") and note in applied.text
            assert not applied.find_elements(By.TAG_NAME, "b")  # The note is text, never markup.
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-version") == "2"
            assert driver.find_element(By.ID, "version").text == "2"
            # The new version decides as the re-vote said.
            assert driver.find_element(By.CSS_SELECTOR, "#before .label").text == after
        finally:
            driver.quit()
