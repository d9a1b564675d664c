"""The model pages, against a real server on 127.0.0.1.

Plain httpx checks of the HTML and its headers run everywhere. The browser tests drive Debian's
Chromium headless through Playwright (`executable_path`, no downloaded browser) and skip with
the reason when either is missing; `make test` installs both. Every browser test ends by
checking that the page logged no console error and that no request left 127.0.0.1: requests
are intercepted, and any to another host is recorded and aborted.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import onnx
import pytest
from onnx import helper
from PIL import Image

from foldserve.model_metadata import InputSpec, ModelMetadata, OutputSpec
from service.ui.counters import histogram_quantile
from service.ui.render import CONTENT_SECURITY_POLICY
from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEVEN_PNG = FIXTURES / "digit_seven.png"
# A 7 as a person draws it on the pad: the bar, then the long stroke (fractions of the pad).
SEVEN_STROKES = [[(0.15, 0.15), (0.85, 0.15)], [(0.85, 0.15), (0.4, 0.9)]]
TOKEN = "pages-are-open"
HOSTILE = '<script>alert("label")</script>'
CHROMIUM_ARGS = [  # Playwright adds --headless and a fresh temporary --user-data-dir
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium calls Google's servers on its own, which an offline machine
    # cannot reach and which the test must not allow anyway.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1200, "height": 900}
NO_GRACE = "0"  # nothing to drain for: stop at once instead of waiting out the grace period
WAIT_MS = 20_000  # a noisy 2-core machine; a pass takes well under a second


# ---------------------------------------------------------------------- the server


def hostile_model() -> bytes:
    """The affine model, its labels and report written to break out of the HTML if unescaped."""
    model = onnx.load_from_string(om.affine_model())
    meta = ModelMetadata(
        labels=(HOSTILE, '"><img src=x onerror=alert(1)>', "c", "d"),
        input=InputSpec("x", "NC", (4,), (0.0,), (1.0,), (0.0, 1.0)),
        output=OutputSpec("y"),
        training={"data_source": "<b>bold</b>"},
        fold={"skipped": [{"bn": "<i>bn</i>", "kind": "k", "reason": "<script>alert(2)</script>"}]},
    )
    del model.metadata_props[:]
    helper.set_model_props(model, meta.to_props())
    return model.SerializeToString()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui") / "repo"
    om.publish(root, "digits", 1, om.DIGITS)  # a copy of the shipped model
    om.publish(root, "hostile", 1, hostile_model())
    om.publish(root, "typed", 1, om.typed_model())  # no foldserve metadata: no try-out
    om.publish(root, "fixed", 1, om.fixed_batch_model())  # on disk, never loaded
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[LiveServer]:
    with start_server(repo, models="digits,hostile,typed", shutdown_grace_s=NO_GRACE) as live:
        yield live


@pytest.fixture(scope="module")
def digits_meta() -> ModelMetadata:
    props = {
        p.key: p.value for p in onnx.load(str(om.DIGITS), load_external_data=False).metadata_props
    }
    return ModelMetadata.from_props(props)


# ---------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir).
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a page did: every request, and what went wrong (console errors, outside hosts)."""

    port: int
    requests: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def local(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.hostname == "127.0.0.1" and parts.port == self.port

    def assert_clean(self, expected_errors: tuple[str, ...] = ()) -> None:
        """No console error (beyond those expected), no dialog, nothing sent off this host."""
        unexpected = [e for e in self.errors if not any(x in e for x in expected_errors)]
        assert unexpected == [], unexpected
        assert self.dialogs == [], self.dialogs
        assert self.outside == [], self.outside
        assert self.requests and all(self.local(u) for u in self.requests), self.requests


@pytest.fixture
def watch(server: LiveServer) -> Watch:
    return Watch(port=server.port)


@pytest.fixture
def tab(browser: Any, watch: Watch) -> Iterator[Any]:
    """A fresh page whose requests outside 127.0.0.1:<port> are recorded and aborted."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)

    def route(route: Any) -> None:
        if watch.local(route.request.url):
            route.continue_()
        else:
            watch.outside.append(route.request.url)
            route.abort()

    def dialog(d: Any) -> None:
        watch.dialogs.append(d.message)
        d.dismiss()

    context.route("**/*", route)
    page.on("request", lambda request: watch.requests.append(request.url))
    page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: watch.errors.append(f"uncaught: {exc}"))
    page.on("dialog", dialog)
    yield page
    context.close()


def screenshot(page: Any, path: Path, min_height: int = 400) -> None:
    """A full-page PNG of what the browser shows, checked to be one."""
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == VIEWPORT["width"] and image.height >= min_height, image.size
    assert path.stat().st_size > 10_000


def draw(page: Any, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on the pad, in fractions of its size, as a person drags the pointer."""
    box = page.locator("#pad").bounding_box()

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + point[0] * box["width"], box["y"] + point[1] * box["height"]

    for stroke in strokes:
        page.mouse.move(*at(stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*at(point), steps=12)
        page.mouse.up()


def top_label(page: Any) -> str:
    from playwright.sync_api import expect

    expect(page.locator("#result")).to_have_attribute("data-state", "done")
    return page.locator("#predictions li").first.get_attribute("data-label")


def counter(page: Any, name: str) -> int:
    return int(page.locator(f'[data-counter="{name}"]').inner_text().replace(",", ""))


# ---------------------------------------------------------------------- in the browser


def test_index_lists_digits_as_ready(tab: Any, watch: Watch, server: LiveServer, tmp_path: Path):
    tab.goto(server.url + "/")
    row = tab.locator('tr[data-model="digits"][data-version="1"]')
    assert row.get_attribute("data-state") == "ready"
    assert "CPUExecutionProvider" in row.inner_text()
    assert "The server is ready" in tab.locator("#server-state").inner_text()
    screenshot(tab, tmp_path / "index.png", min_height=VIEWPORT["height"])
    row.locator("a").first.click()
    tab.wait_for_url("**/models/digits")
    watch.assert_clean()


def test_model_page_shows_the_fold_report(
    tab: Any, watch: Watch, server: LiveServer, tmp_path: Path, digits_meta: ModelMetadata
):
    tab.goto(server.url + "/models/digits")
    assert tab.locator("#state").inner_text() == "ready"
    fold = digits_meta.fold
    report = tab.locator("#fold-report").inner_text()
    assert f"{len(fold['folded'])} pairs folded" in report
    assert f"{len(fold['skipped'])} BatchNorms skipped" in report
    for pair in fold["folded"]:
        assert pair["bn"] in report
    counts = tab.locator("#fold-counts").inner_text()
    assert f"{fold['before']['parameters']:,}" in counts
    assert f"{fold['after']['parameters']:,}" in counts
    verification = tab.locator("#verification-facts").inner_text()
    assert f"{digits_meta.verification['accuracy_onnx_folded']:.2%}" in verification
    assert tab.locator("#labels li").all_inner_texts() == list(digits_meta.labels)
    assert "tritonclient" in tab.locator("#examples").inner_text()
    screenshot(tab, tmp_path / "model.png", min_height=2000)
    watch.assert_clean()


def test_a_seven_drawn_on_the_pad_reads_seven(
    tab: Any, watch: Watch, server: LiveServer, tmp_path: Path
):
    from playwright.sync_api import expect

    tab.goto(server.url + "/models/digits")
    before = counter(tab, "requests")
    draw(tab, SEVEN_STROKES)
    tab.click("#classify-drawing")
    assert top_label(tab) == "7"
    assert tab.locator("#predictions li").count() == 5
    # the live counters follow, from the same record /stats reads
    expect(tab.locator('[data-counter="requests"]')).to_have_text(f"{before + 1:,}")
    screenshot(tab, tmp_path / "drawing.png")
    assert any("/v2/models/digits/versions/1/classify" in u for u in watch.requests)
    watch.assert_clean()


def test_an_uploaded_picture_of_a_seven_reads_seven(
    tab: Any, watch: Watch, server: LiveServer, tmp_path: Path
):
    tab.goto(server.url + "/models/digits")
    tab.set_input_files("#upload", str(SEVEN_PNG))
    assert top_label(tab) == "7"
    assert "digit_seven.png" in tab.locator("#result-status").inner_text()
    screenshot(tab, tmp_path / "upload.png")
    watch.assert_clean()


def test_labels_from_the_model_file_are_shown_as_text(tab: Any, watch: Watch, server: LiveServer):
    """The array try-out of a model whose labels are markup: shown as text, nothing runs."""
    tab.goto(server.url + "/models/hostile")
    assert HOSTILE in tab.locator("#labels").inner_text()
    tab.locator("#array-input").fill("[1, 0, 0, 0]")  # y = 2x + 1: label 0 wins
    tab.click("#array-form button[type=submit]")
    assert top_label(tab) == HOSTILE
    assert tab.locator("script").count() == 1  # ui.js, nothing injected
    assert tab.locator("img").count() == 0
    watch.assert_clean()


def test_a_failed_model_shows_its_reason(
    tab: Any, watch: Watch, server: LiveServer, repo: Path, tmp_path: Path
):
    om.publish(repo, "broken", 1, b"this is not an onnx file")
    answer = httpx.post(server.url + "/v2/repository/models/broken/load", timeout=30)
    assert answer.status_code == 400
    index = httpx.post(server.url + "/v2/repository/index", timeout=30).json()
    reason = next(r["reason"] for r in index if r["name"] == "broken")
    assert "not a valid ONNX file" in reason

    tab.goto(server.url + "/")
    row = tab.locator('tr[data-model="broken"][data-version="1"]')
    assert row.get_attribute("data-state") == "failed"
    assert row.locator(".reason").inner_text() == reason
    assert tab.locator('tr[data-model="digits"]').get_attribute("data-state") == "ready"
    screenshot(tab, tmp_path / "index-failed.png", min_height=VIEWPORT["height"])

    tab.goto(server.url + "/models/broken")
    assert tab.locator("#state").inner_text() == "failed"
    assert tab.locator("#reason").inner_text() == reason
    assert tab.locator("#tryout").count() == 0
    screenshot(tab, tmp_path / "failed.png", min_height=VIEWPORT["height"])
    watch.assert_clean()


def test_a_bad_new_version_shows_beside_the_one_still_serving(
    tab: Any, watch: Watch, server: LiveServer, repo: Path
):
    om.publish(repo, "hostile", 2, b"\x00 truncated upload")
    answer = httpx.post(server.url + "/v2/repository/models/hostile/load", timeout=30)
    assert answer.status_code == 400 and "serving: [1]" in answer.json()["error"]

    tab.goto(server.url + "/models/hostile")  # the highest version that serves
    assert tab.locator("h1 small").inner_text() == "version 1"
    assert tab.locator("#state").inner_text() == "ready"
    failures = tab.locator("#failures").inner_text()
    assert "version 2:" in failures and "not a valid ONNX file" in failures
    assert tab.locator("#tryout").count() == 1
    tab.locator('nav.versions a:has-text("2")').click()
    assert tab.locator("#state").inner_text() == "failed"
    assert "not a valid ONNX file" in tab.locator("#reason").inner_text()
    watch.assert_clean()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("ui-token") / "repo"
    om.publish(root, "digits", 1, om.DIGITS)
    with start_server(root, api_token=TOKEN, shutdown_grace_s=NO_GRACE) as live:
        yield live


def test_with_a_token_the_page_is_open_and_the_try_out_sends_what_is_typed(
    tab: Any, watch: Watch, guarded: LiveServer
):
    from playwright.sync_api import expect

    watch.port = guarded.port
    tab.goto(guarded.url + "/models/digits")  # no token needed to look
    assert TOKEN not in tab.content()
    assert "$FOLDSERVE_API_TOKEN" in tab.locator("#examples").inner_text()
    tab.set_input_files("#upload", str(SEVEN_PNG))
    expect(tab.locator("#tryout-error")).to_contain_text("missing 'Authorization: Bearer")
    tab.fill("#token", TOKEN)
    tab.set_input_files("#upload", [])
    tab.set_input_files("#upload", str(SEVEN_PNG))
    assert top_label(tab) == "7"
    watch.assert_clean(expected_errors=("status of 401",))  # the refused try, as Chrome logs it


# ---------------------------------------------------------------------- plain HTTP


@pytest.mark.parametrize(
    ("path", "status"),
    [("/", 200), ("/models/digits", 200), ("/models/nope", 404), ("/models/digits?version=x", 400)],
)
def test_pages_carry_a_strict_content_security_policy(server: LiveServer, path: str, status: int):
    response = httpx.get(server.url + path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


def test_pages_hold_no_inline_script_or_style_and_load_only_from_here(server: LiveServer):
    for path in ("/", "/models/digits", "/models/hostile"):
        html = httpx.get(server.url + path).text
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [], path
        assert re.findall(r"<[^>]*\s(?:style|on\w+)=", html) == [], path
        assert "<style" not in html
        for url in re.findall(r'\s(?:src|href|action)="([^"]*)"', html):
            assert url.startswith(("/", "?", "#")) and not url.startswith("//"), url
        for asset in re.findall(r'\s(?:src|href)="(/static/[^"]*)"', html):
            assert httpx.get(server.url + asset).status_code == 200, asset


def test_a_model_without_metadata_and_one_not_loaded_get_pages(server: LiveServer):
    typed = httpx.get(server.url + "/models/typed")
    assert typed.status_code == 200
    assert "carries no foldserve metadata" in typed.text and 'id="tryout"' not in typed.text
    assert "in_bool" in typed.text and "tritonclient" in typed.text
    fixed = httpx.get(server.url + "/models/fixed")
    assert fixed.status_code == 200
    assert 'id="state">unavailable' in fixed.text and "not loaded" in fixed.text


def test_everything_from_the_model_file_is_escaped(server: LiveServer):
    html = httpx.get(server.url + "/models/hostile").text
    for raw in (HOSTILE, "<img src=x", "<b>bold</b>", "<i>bn</i>", "<script>alert(2)"):
        assert raw not in html
    assert "&lt;script&gt;alert(&#34;label&#34;)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html  # the skipped BN's reason


def test_unknown_models_and_versions_get_pages_with_the_apis_message(server: LiveServer):
    missing = httpx.get(server.url + "/models/nope")
    assert missing.status_code == 404 and "unknown model &#39;nope&#39;" in missing.text
    version = httpx.get(server.url + "/models/digits?version=9")
    assert version.status_code == 404 and "unknown version 9" in version.text


def test_the_index_replaces_the_redirect_and_docs_and_metrics_stay(server: LiveServer):
    index = httpx.get(server.url + "/")
    assert index.status_code == 200 and 'href="/models/digits"' in index.text
    assert httpx.get(server.url + "/docs").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert not any(p == "/" or p.startswith("/models") for p in schema["paths"])


def test_counters_match_the_statistics_endpoint(server: LiveServer):
    httpx.post(server.url + "/v2/models/digits/classify", files={"file": SEVEN_PNG.read_bytes()})
    counters = httpx.get(server.url + "/models/digits/counters").json()
    stats = httpx.get(server.url + "/v2/models/digits/stats").json()["model_stats"][0]
    assert counters["counters"]["requests"] == stats["inference_stats"]["success"]["count"]
    assert counters["counters"]["executions"] == stats["execution_count"]
    assert counters["display"]["p50"].endswith(" ms")
    missing = httpx.get(server.url + "/models/nope/counters")
    assert missing.status_code == 404 and "error" in missing.json()


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.001, 0.0), (0.01, 10.0), (0.1, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 3.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.5, []) is None
