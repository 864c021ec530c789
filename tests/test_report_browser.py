"""report.html in a real browser: headless Chromium driven by selenium over the report of a small run.

Checked as a reader meets the page at 1280 px: every image loads (lazy images
scrolled to first), every in-page link (#anchor or relative file) resolves,
nothing scrolls sideways, the console logs no error. The same checker is run
on a page broken on purpose, so it is known to find each fault.

Needs Debian's chromium and chromium-driver (`make browser` installs them) and
selenium (the `test` extra); skips with the reason when one is absent.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import config_from_recipe
from pipeline.report.build import write_report
from pipeline.train.stage import train

WIDTH = 1280
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# root in a container, the network closed: no sandbox, no GPU, nothing that phones home
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", f"--window-size={WIDTH},900")


def open_browser(profile: Path):
    """A headless Chromium (selenium WebDriver) with a fresh profile in ``profile``; skips without one."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (make browser: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


# every <img>, scrolled into view so a lazy image loads, and whether it decoded
IMAGES_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
for (const img of images) { img.loading = 'eager'; img.scrollIntoView(); }
const settled = () => images.every(img => img.complete);
const t0 = Date.now();
(function wait() {
  if (settled() || Date.now() - t0 > 20000) {
    window.scrollTo(0, 0);
    done(images.map(img => [img.getAttribute('src'), img.naturalWidth]));
  } else { setTimeout(wait, 50); }
})();
"""
LINKS_JS = "return Array.from(document.links).map(a => [a.getAttribute('href'), a.href]);"
WIDTHS_JS = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth];"


def page_problems(driver, page: Path) -> list[str]:
    """What a reader of ``page`` at WIDTH px meets that is broken: images that do not load, links
    that lead nowhere, a sideways scroll, console errors. [] when none."""
    driver.get(page.resolve().as_uri())
    driver.set_script_timeout(30)
    problems = [f"image {src!r} does not load" for src, width in driver.execute_async_script(IMAGES_JS)
                if not width]
    for href, resolved in driver.execute_script(LINKS_JS):
        if href.startswith("#"):
            if not driver.execute_script("return document.getElementById(arguments[0]) !== null;", href[1:]):
                problems.append(f"link {href!r} has no element with that id")
        elif urlparse(resolved).scheme == "file" and not Path(unquote(urlparse(resolved).path)).is_file():
            problems.append(f"link {href!r} leads to a missing file")
        elif urlparse(resolved).scheme != "file":
            problems.append(f"link {href!r} leaves the report folder")
    scroll, client = driver.execute_script(WIDTHS_JS)
    if scroll > client:
        problems.append(f"the page scrolls sideways: {scroll} px wide in a {client} px window")
    problems += [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return problems


def screenshot(driver, page: Path, out: Path) -> Path:
    """The whole of ``page`` at WIDTH px as a PNG (the window stretched to the page's height)."""
    driver.get(page.resolve().as_uri())
    driver.execute_async_script(IMAGES_JS)
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(WIDTH, height + 140)  # the window's frame takes some of it in headless mode too
    driver.save_screenshot(str(out))
    return out


@pytest.fixture(scope="module")
def browser():
    profile = Path(tempfile.mkdtemp(prefix="report-browser-"))
    driver = open_browser(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_report_of_a_small_run_reads_whole_in_chromium(browser, toy_work, tmp_path):
    # a 3-fold run: a logistic-regression head, then one epoch of fine-tuning: every section of the page
    comp, work = toy_work
    run = tmp_path / "run"
    train(config_from_recipe(comp, work, run, folds=3, head="logreg", unfreeze_after=1, epochs=2, batch_size=8,
                             device="cpu", num_workers=0))
    written = write_report(run, work, tmp_path / "report", device="cpu")
    page = written[-1]
    assert {"learning_curves.png", "head_fit.png", "confusion_matrix.png", "most_wrong.png"} <= {
        p.name for p in written}
    assert page_problems(browser, page) == []
    headings = [h.text for h in browser.find_elements("css selector", "h2")]
    assert headings[:5] == ["Summary", "What every member ran", "Members", "Cross-validation", "Figures"]
    assert len(browser.find_elements("css selector", "img")) == len(written) - 1
    shot = screenshot(browser, page, tmp_path / "report.png")
    assert shot.stat().st_size > 10_000


def test_the_checker_finds_each_kind_of_fault(browser, tmp_path):
    """A page with a missing image, a dangling anchor, a missing file, a too-wide table and a script error."""
    (tmp_path / "there.html").write_text("<p>here</p>")
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><a href="#nowhere">x</a> <a href="#top" id="top">top</a>'
                    '<a href="there.html">ok</a> <a href="gone.html">gone</a><img src="missing.png">'
                    f'<div style="width: {WIDTH + 300}px">wide</div><script>undefinedFunction();</script>'
                    "</body></html>")
    problems = page_problems(browser, page)
    assert len(problems) == 6, problems
    assert problems[0] == "image 'missing.png' does not load"
    assert problems[1:3] == ["link '#nowhere' has no element with that id", "link 'gone.html' leads to a missing file"]
    assert problems[3].startswith(f"the page scrolls sideways: {WIDTH + 300 + 8} px wide")  # + the body's margin
    console = problems[4:]  # the failed image load and the script's error, as the console logs them
    assert all(p.startswith("console: ") for p in console)
    assert sum("missing.png" in p for p in console) == 1
    assert sum("Uncaught ReferenceError: undefinedFunction is not defined" in p for p in console) == 1
