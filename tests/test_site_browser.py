"""The results site (``python -m repro report``) rendered in a real browser: headless Chromium driven by Selenium.

The site is built once from the committed results (``repro/results``) with ``repro.site.build_site``, then
``index.html`` and one target page are opened through ``file://`` URLs and checked the way a reader would see
them: the page is not blank, the claims table is visible, every image loaded, and nothing makes the whole page
scroll sideways at 1366 px.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and
``selenium>=4.20`` (``pip install .[browser]``). Without them the tests skip with the reason, except under
``REQUIRE_BROWSER=1`` (``tox -e browser`` sets it), where they fail: CI cannot pass by skipping.
Screenshots go to the folder named by ``SITE_SCREENSHOTS_DIR`` when it is set (``index.png``,
``cycle-consistency.png``), otherwise only to pytest's tmp dir.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

RESULTS = Path(__file__).resolve().parents[1] / "repro" / "results"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1366, 900
MAX_SHOT_HEIGHT = 4000  # a full-page screenshot taller than this is cut here
TARGET = "cycle-consistency"
PAGES = ["index", TARGET]


def _unavailable(reason: str):
    """Skip, or fail when the environment demands a browser (``REQUIRE_BROWSER=1``, set by ``tox -e browser``)."""
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built from the committed results; the folder holding ``index.html``."""
    from repro.site import build_site  # imported here: collecting this module must not need it

    out = tmp_path_factory.mktemp("site")
    index = build_site([RESULTS], out)
    assert Path(index) == out / "index.html"
    assert (out / "index.html").is_file()
    assert (out / f"{TARGET}.html").is_file()
    return out


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module (``/usr/bin/chromium`` through ``/usr/bin/chromedriver``)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        _unavailable(f"selenium is not installed ({e}); pip install '.[browser]'")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            _unavailable(f"{path} is missing; apt-get install {package} (tox -e browser installs it)")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    try:
        # an explicit driver path: Selenium Manager (which would go to the network) is never asked
        drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    except WebDriverException as e:
        _unavailable(f"Chromium did not start through {CHROMEDRIVER}: {e.msg or e}")
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _open(driver, site: Path, page: str):
    """Load ``page``.html at the standard window size and wait until the document and its images have loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(WIDTH, HEIGHT)
    driver.get((site / f"{page}.html").as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    return driver


def _screenshot_dirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    if os.environ.get("SITE_SCREENSHOTS_DIR"):
        dirs.append(Path(os.environ["SITE_SCREENSHOTS_DIR"]))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _decode_png(png: bytes) -> np.ndarray:
    """The screenshot as an ``(h, w, channels)`` array in 0..255."""
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image as mpimg

        return np.asarray(mpimg.imread(io.BytesIO(png), format="png"), dtype=float) * 255.0
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=float)


@pytest.mark.parametrize("page", PAGES)
def test_page_not_blank_and_screenshot(driver, site, page, tmp_path):
    _open(driver, site, page)
    text = driver.find_element("tag name", "body").text
    assert text.strip(), f"{page}.html renders no text"

    # full page: the viewport as tall as the document (capped), then back to the standard size; the window's
    # height includes the browser's chrome (143 px in headless Chromium 156), hence outer - inner
    full, chrome = driver.execute_script(
        "return [Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),"
        " window.outerHeight - window.innerHeight]")
    driver.set_window_size(WIDTH, max(HEIGHT, min(int(full), MAX_SHOT_HEIGHT) + int(chrome)))
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.set_window_size(WIDTH, HEIGHT)
    for d in _screenshot_dirs(tmp_path):
        (d / f"{page}.png").write_bytes(png)

    pixels = _decode_png(png)[..., :3]
    assert pixels.shape[0] >= HEIGHT // 2 and pixels.shape[1] >= WIDTH // 2, pixels.shape
    grey = pixels.mean(axis=-1)
    assert grey.std() > 2.0, f"{page}.html looks blank: screenshot pixel std {grey.std():.3f}"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{page}.html screenshot has almost no colours"


@pytest.mark.parametrize("page", PAGES)
def test_claims_table_visible(driver, site, page):
    _open(driver, site, page)
    tables = driver.find_elements("css selector", "table.claims")
    assert tables, f"{page}.html has no <table class='claims'>"
    for table in tables:
        assert table.is_displayed(), f"a claims table on {page}.html is not displayed"
        assert table.size["width"] > 0 and table.size["height"] > 0, table.size
    rows = driver.find_elements("css selector", "table.claims tr.held, table.claims tr.not-held")
    assert rows, f"{page}.html: no claim row has class held or not-held"
    assert all(r.is_displayed() for r in rows), f"{page}.html: a claim row is hidden"


@pytest.mark.parametrize("page", PAGES)
def test_images_loaded(driver, site, page):
    _open(driver, site, page)
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'))")
    assert broken == [], f"{page}.html: images that did not load: {broken}"
    if page == TARGET:
        srcs = driver.execute_script("return Array.from(document.images).map(i => i.getAttribute('src'))")
        assert srcs, f"{page}.html shows no image"
        expected = {f"{TARGET}/{p.name}" for p in (RESULTS / TARGET).glob("*.png")}
        assert expected <= set(srcs), f"figures missing from {page}.html: {sorted(expected - set(srcs))}"
        for fig in driver.find_elements("css selector", "figure img"):
            assert fig.is_displayed() and fig.size["width"] > 0 and fig.size["height"] > 0, fig.get_attribute("src")


@pytest.mark.parametrize("page", PAGES)
def test_no_horizontal_page_scroll(driver, site, page):
    _open(driver, site, page)
    # clientWidth is innerWidth less a classic vertical scrollbar (15 px here): content wider than it already
    # brings up the page's horizontal scrollbar, so it is the stricter bound of the two
    scroll_width, client_width, inner_width = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.clientWidth, window.innerWidth]")
    assert inner_width == WIDTH, inner_width
    assert scroll_width <= min(client_width, inner_width), (
        f"{page}.html scrolls sideways at {WIDTH}px: scrollWidth {scroll_width} > clientWidth {client_width}")


def test_index_links_to_target_page(driver, site):
    """The targets table links every result set; following the link opens that target's page."""
    _open(driver, site, "index")
    hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", "table.targets a")]
    sets = sorted(p.parent.name for p in RESULTS.glob("*/summary.json"))
    linked = {href.rsplit("/", 1)[-1].removesuffix(".html") for href in hrefs}
    assert set(sets) <= linked, f"not linked from index.html: {sorted(set(sets) - linked)}"
    driver.find_element("css selector", f'table.targets a[href="{TARGET}.html"]').click()
    assert driver.current_url.endswith(f"/{TARGET}.html"), driver.current_url
    assert driver.find_element("css selector", "table.claims").is_displayed()
