"""Playwright with Debian's Chromium (no browser download), against the app under real uvicorn."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "test-artifacts"
AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 375, "height": 667}
expect.set_options(timeout=15_000)  # a 2-core CI machine can be slow to start the first page
DESKTOP = {"width": 1280, "height": 800}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("chromium is not installed: `make test` installs it from Debian's packages")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A phone-sized page by default; the test's screenshot is saved as an artifact."""
    options: dict[str, Any] = getattr(request, "param", {}) or {}
    context = browser.new_context(
        viewport=options.get("viewport", PHONE), java_script_enabled=options.get("javascript", True), locale=options.get("locale", "en-GB")
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    finally:
        context.close()


def snap(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """Run axe-core (WCAG 2.2 AA rules) on the page. Stripe's own card element is Stripe's to check."""
    # Judge the page as a person sees it: fully loaded, styles applied.
    page.wait_for_load_state("load")
    for _ in range(100):  # (wait_for_function would need 'unsafe-eval', which our CSP rightly refuses)
        if page.evaluate("() => document.styleSheets.length > 0 && [...document.styleSheets].every(s => s.cssRules.length > 0)"):
            break
        page.wait_for_timeout(50)
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        """() => axe.run({exclude: [['#card-element']]},
               {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa', 'best-practice']}})"""
    )
    return [{"id": v["id"], "help": v["help"], "nodes": [n["target"] for n in v["nodes"]]} for v in result["violations"]]


def small_targets(page: Page, least: int = 44) -> list[str]:
    """Visible links, buttons, summaries and check boxes' labels on the page less than `least` px tall (the
    README promises touch targets of at least 44 px; Stripe's card element is Stripe's)."""
    found: list[str] = page.evaluate(
        """(least) => [...document.querySelectorAll('main a, main button, main summary, main label.check, footer.site a')]
            .filter(e => e.offsetParent !== null && !e.closest('#card-element'))
            .map(e => [e, e.getBoundingClientRect()])
            .filter(([e, r]) => r.height < least)
            .map(([e, r]) => `${e.tagName.toLowerCase()} "${e.textContent.trim().slice(0, 40)}": ${Math.round(r.height)} px`)""",
        least,
    )
    return found


def assert_accessible(page: Page) -> None:
    violations = axe_violations(page)
    assert violations == [], f"axe found accessibility problems on {page.url}: {violations}"
