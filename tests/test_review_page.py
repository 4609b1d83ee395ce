"""The review page at the daemon's `/`, in a real headless browser (Debian's chromium, driven by Selenium;
scripts/setup_browser.sh installs both): the log with filters, one edit's answers and checks, the daemon's
status, and a revert from the page that is audited. A screenshot is saved under the test's temp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbsync.audit import Edit
from kbsync.daemon import Daemon, api_token
from kbsync.daemon_client import DaemonClient
from tests.daemon_helpers import QUESTION, daemon, daemons, kb  # noqa: F401 (fixtures)

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not CHROMEDRIVER and not os.environ.get("CI"),
                                reason="chromium and chromedriver are not installed (bash scripts/setup_browser.sh)")


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def test_review_filter_inspect_and_revert_in_a_browser(browser, daemon: Daemon, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert daemon.tick() is not None  # one poll: the status panel has something to show
    client = DaemonClient(daemon.api.url, api_token(daemon.settings))
    applied = client.edit("capital of Nigeria", "Lagos")
    assert applied["status"] == "applied", applied
    assert client.edit("capital of Kenya", "Nairobi")["status"] == "noop"
    # Audit text is data, never markup: a row whose target is a script must show as text.
    daemon.audit.record(Edit(source="cli", actor="mallory", subject_label="Peru", property="P36",
                             object_label="<script>document.title='owned'</script>", status="rejected",
                             reasons=["<b>not bold</b>"]))

    url = daemon.api.url
    browser.get(f"{url}/")
    assert browser.title == "kbsync review"
    rows = browser.find_elements(By.CSS_SELECTOR, "#edits tr[data-edit]")
    assert len(rows) == 3
    assert "<script>document.title='owned'</script>" in rows[0].text
    status = browser.find_element(By.ID, "daemon-status").text
    assert "last poll" in status and "cursor" in status
    assert browser.find_element(By.CSS_SELECTOR, "[data-field='polls']").text == "1"

    Select(browser.find_element(By.NAME, "status")).select_by_visible_text("noop")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    WebDriverWait(browser, 30).until(lambda b: "status=noop" in b.current_url)
    only = browser.find_elements(By.CSS_SELECTOR, "#edits tr[data-edit]")
    assert [r.text.split()[0] for r in only] == [str(daemon.audit.history(status="noop")[0].id)]
    browser.get(f"{url}/?subject=nigeria&since=1h")
    [nigeria] = browser.find_elements(By.CSS_SELECTOR, "#edits tr[data-edit]")
    nigeria.find_element(By.TAG_NAME, "a").click()

    WebDriverWait(browser, 30).until(lambda b: b.current_url.endswith(f"/review/{applied['edit_id']}"))
    field = lambda name: browser.find_element(By.CSS_SELECTOR, f"[data-field='{name}']").text  # noqa: E731
    assert (field("answer before"), field("answer after"), field("status")) == ("Abuja", "Lagos", "applied")
    assert "answer the target" in browser.page_source and browser.find_elements(By.CSS_SELECTOR, "#paraphrases tr")
    browser.save_screenshot(str(tmp_path / "review-edit.png"))

    form = browser.find_element(By.ID, "revert")
    form.find_element(By.NAME, "token").send_keys("wrong")
    form.find_element(By.TAG_NAME, "button").click()
    result = browser.find_element(By.ID, "revert-result")
    WebDriverWait(browser, 30).until(lambda b: result.text)
    assert result.text.startswith("Not reverted:") and "Bearer" in result.text
    assert client.ask(QUESTION) == "Lagos"  # nothing changed

    form.find_element(By.NAME, "token").clear()
    form.find_element(By.NAME, "token").send_keys(api_token(daemon.settings))
    form.find_element(By.NAME, "actor").send_keys("carol")
    form.find_element(By.NAME, "reason").send_keys("wrong capital")
    form.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "[data-field='status']").text == "reverted")
    revert = daemon.audit.history(status="revert")[0]
    assert (revert.reverts_edit_id, revert.actor, revert.source, revert.reasons) == (
        applied["edit_id"], "carol", "api", ["wrong capital"])
    assert client.ask(QUESTION) == "Abuja"

    browser.get(f"{url}/")
    browser.save_screenshot(str(tmp_path / "review.png"))
    for shot in ("review.png", "review-edit.png"):
        assert (tmp_path / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser.title == "kbsync review"  # the stored script never ran
