"""The Prefect UI in a real headless browser (Debian's chromium, driven by playwright):
the ad-hoc deployment's custom-run form shows our parameters with their descriptions and
refuses a wrong value with a message, and the finished run's artifacts show the member
table, at a 1280 px wide window. Screenshots are kept in .artifacts/screenshots/."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.params import ScoreParams
from flows.report import ARTIFACT_KEYS
from tests.deployments.conftest import PrefectStack

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags chromium keeps trying to reach the outside
# (refused here); a fresh profile per test keeps the UI's stored preferences out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
FORM_FIELDS = ["models", "manifest", "input", "output", "ensemble", "bad_rows", "concurrency"]


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1600})
        context.set_default_timeout(45_000)
        try:
            yield context.new_page()
        finally:
            context.close()


# Screenshots are kept after the run (a laptop-sized 1280 px window), for people to look
# at: .artifacts/screenshots/ at the repo root, or $SCREENSHOT_DIR.
SHOTS = Path(os.environ.get("SCREENSHOT_DIR")
             or Path(__file__).resolve().parents[2] / ".artifacts" / "screenshots")


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def _flow_runs(stack: PrefectStack, deployment_id: str) -> int:
    return len(stack.api("POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment_id]}}}).json())


def test_custom_run_form_shows_parameters_and_rejects_wrong_values(
        page: Any, stack: PrefectStack, adhoc_run: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    deployment_id = adhoc_run["deployment"]["id"]
    page.goto(f"{stack.url}/v2/deployments/deployment/{deployment_id}/run")
    fields = ScoreParams.model_fields
    expect(page.get_by_text(fields["concurrency"].title or "")).to_be_visible()
    for name in FORM_FIELDS:
        info = fields[name]
        assert info.title and info.description
        expect(page.get_by_text(info.title, exact=False).first).to_be_visible()
        expect(page.get_by_text(info.description, exact=True)).to_be_visible()
    _shot(page, "custom-run-form.png")

    runs_before = _flow_runs(stack, deployment_id)
    page.get_by_label(re.compile(re.escape(fields["input"].title or ""))).fill("/data/in")
    page.get_by_label(re.compile(re.escape(fields["output"].title or ""))).fill("/data/out")
    concurrency = page.get_by_label(re.compile(re.escape(fields["concurrency"].title or "")))
    concurrency.fill("0")
    page.get_by_role("button", name="Submit").click()
    message = concurrency.evaluate("e => e.validationMessage")
    assert "greater than or equal to 1" in message
    _shot(page, "custom-run-rejected.png")
    assert page.url.endswith("/run")  # still on the form
    assert _flow_runs(stack, deployment_id) == runs_before


def test_custom_run_filled_by_label_like_a_person(
        page: Any, stack: PrefectStack, adhoc_run: dict[str, Any], tmp_path: Path) -> None:
    """The manifest path has its own text box, found by its label (no type tab to pick
    first), and a run submitted from the form carries what was typed and completes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    deployment_id = adhoc_run["deployment"]["id"]
    page.goto(f"{stack.url}/v2/deployments/deployment/{deployment_id}/run")
    # The form renders before the deployment's schema and defaults have all arrived; text
    # typed into a box the UI then re-renders is lost, so the page is let settle first and
    # every value is checked to have held before the click.
    page.wait_for_load_state("networkidle")
    fields = ScoreParams.model_fields
    params = adhoc_run["params"]
    out = tmp_path / "from-the-form"
    typed = [(page.get_by_label(re.compile(re.escape(fields[name].title or ""))), value)
             for name, value in (("models", params["models"]), ("input", params["input"]),
                                 ("output", str(out)))]
    for box, value in typed:
        box.fill(value)
        expect(box).to_have_value(value)
    for box, value in typed:
        expect(box).to_have_value(value)
    _shot(page, "custom-run-filled.png")
    runs_before = _flow_runs(stack, deployment_id)
    # The UI's own request to create the run is what the click must cause; its answer (or
    # its absence) is what a failure reports. Prefect's server answers 503 ("Service
    # Unavailable", its signal to retry) when SQLite is locked by the worker and runs of
    # the other tests, as happened on a loaded 2-core machine: a person clicks again.
    statuses: list[int] = []
    for _attempt in range(3):
        for box, value in typed:  # what a retry submits is still what was typed
            expect(box).to_have_value(value)
        try:
            with page.expect_response(
                    lambda r: r.request.method == "POST"
                    and r.url.endswith(f"/deployments/{deployment_id}/create_flow_run"),
                    timeout=90_000) as answer:
                page.get_by_role("button", name="Submit").click()
        except PlaywrightTimeout:
            _shot(page, "custom-run-not-submitted.png")
            raise AssertionError(
                f"the form sent no create_flow_run in 90 s (answers before: {statuses}); "
                f"boxes held "
                f"{[box.input_value() for box, _ in typed]}; the page at {page.url} ends:\n"
                f"{page.inner_text('body')[-2500:]}") from None
        response = answer.value
        statuses.append(response.status)
        if response.status != 503:
            break
        page.wait_for_timeout(2_000)
    assert response.ok, (f"the UI's create_flow_run answered {statuses}: "
                         f"{response.text()}")
    assert _flow_runs(stack, deployment_id) == runs_before + 1
    [created] = [r for r in stack.api("POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment_id]}}}).json()
        if r["parameters"]["params"].get("output") == str(out)]
    run = stack.wait_for_run(created["id"])
    assert run["parameters"]["params"]["models"] == params["models"]
    assert run["state_type"] == "COMPLETED", f"{run['state']}\n{stack.logs()}"
    assert (out / "_run.json").is_file()


def test_run_artifacts_show_the_member_table(page: Any, stack: PrefectStack,
                                             adhoc_run: dict[str, Any],
                                             tmp_path: Path) -> None:
    from playwright.sync_api import expect

    run_id = adhoc_run["run"]["id"]
    page.goto(f"{stack.url}/v2/runs/flow-run/{run_id}?tab=Artifacts")
    for key in ARTIFACT_KEYS.values():
        expect(page.get_by_text(key, exact=True)).to_be_visible()
    _shot(page, "run-artifacts.png")

    page.get_by_text(ARTIFACT_KEYS["members"], exact=True).click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    table = page.get_by_role("table")
    for header in ("member", "rows", "mean", "std", "seconds", "rows/s", "digest", "load s"):
        expect(table.get_by_role("columnheader", name=header, exact=True)).to_be_visible()
    for name in ("seed0", "seed1", "seed2"):
        expect(table.get_by_role("cell", name=name, exact=True)).to_be_visible()
    _shot(page, "member-table.png")
    # Formatted as the summary formats them (6,000 rows, not 6000).
    expect(table.get_by_role("cell", name="6,000", exact=True).first).to_be_visible()

    # The figures table fits one page of the UI's table: its last row shows with its first.
    page.goto(f"{stack.url}/v2/runs/flow-run/{run_id}?tab=Artifacts")
    page.get_by_text(ARTIFACT_KEYS["figures"], exact=True).click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    table = page.get_by_role("table")
    for figure in ("rows", "rows/s while scoring", "ensemble_score mean ± std"):
        expect(table.get_by_role("cell", name=figure, exact=True)).to_be_visible()
    expect(page.get_by_text("Page 1 of 1")).to_be_visible()
    _shot(page, "figures-table.png")
