"""The registry browser in a real browser: Debian's chromium driven by Selenium through its
chromium-driver (``.ci/run`` installs both). Every page of a registry the suite builds, its numbers
against the CLI's ``--json``, sorting, the playground against ``skillhub generate``, hostile
names and card text shown as text, and no request leaving the server.

Set ``SKILLHUB_SCREENSHOTS=DIR`` to keep screenshots of the main pages (docs/images/ come from here).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillhub.cli import main
from skillhub.compress.pipeline import create_pack
from skillhub.compress.recipe import PAPER_RECIPE
from skillhub.demo.synthetic import split_examples, write_jsonl
from skillhub.evaluation.forgetting import add_and_score, declare_task
from skillhub.registry.front import Registry
from skillhub.routing.generate import Generator
from skillhub.routing.training import train_router
from skillhub.serving import Limits, create_app
from skillhub.serving.app import create_browser_app

from conftest import ROUTED_TASKS, FineTune, app_server, copy_tree

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMEDRIVER is None, reason="needs Debian's chromium-driver (.ci/run installs it)")

HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


@pytest.fixture(scope="module")
def scored(three_packs, finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose three tasks were scored at every addition, with a router; its base lives
    in a directory with markup in its name, and a fourth pack's recipe description is markup."""
    root = tmp_path_factory.mktemp("browsed")
    base = copy_tree(finetuned.base, root / '<b onmouseover="window.pwned=3">base')
    registry = Registry(root / "registry")
    registry.register_base(base)
    for task in ROUTED_TASKS:
        _, test = split_examples(task, train=0, test=40, seed=5)
        declare_task(registry, task, write_jsonl(test, root / f"{task}.jsonl"))
    for task in ROUTED_TASKS:
        add_and_score(registry, three_packs[task], task=task, merge=None)
    train_router(registry)
    hostile = create_pack(base, finetuned.tuned, root / "hostile", task="shift", name="hostile-card",
                          recipe={**PAPER_RECIPE, "description": HOSTILE})
    registry.add(hostile, task="shift")
    return root / "registry"


@contextmanager
def running(app) -> Iterator[str]:
    with app_server(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser):
    """The browser, its request log emptied of earlier tests' requests."""
    requested_urls(browser)
    return browser


def cli_json(*args: str):
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("SKILLHUB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"ui-{name}.png"))


def test_every_page_shows_what_the_cli_reports(scored: Path, page) -> None:
    from selenium.webdriver.common.by import By

    registry = str(scored)
    packs = cli_json("--registry", registry, "list", "--all")
    metrics = cli_json("--registry", registry, "metrics")
    router = cli_json("--registry", registry, "route", "show")
    with running(create_browser_app(Registry(scored))) as url:
        page.get(url + "/")
        assert page.find_element(By.CSS_SELECTOR, "#bases td[data-field=packs]").text == str(len(packs))
        screenshot(page, "bases")
        page.get(url + "/packs")
        rows = page.find_elements(By.CSS_SELECTOR, "#packs tbody tr")
        assert [r.find_element(By.CSS_SELECTOR, "td.mono").text for r in rows] == [p["id"] for p in packs]
        assert [int(r.find_element(By.CSS_SELECTOR, "td.bytes").get_attribute("data-value")) for r in rows] == [
            p["bytes"] for p in packs]
        screenshot(page, "packs")
        # sorting by stored bytes, ascending then descending
        page.find_element(By.CSS_SELECTOR, "a.sort[data-sort=bytes]").click()
        shown = [int(e.get_attribute("data-value")) for e in page.find_elements(By.CSS_SELECTOR, "td.bytes")]
        assert shown == sorted(p["bytes"] for p in packs)
        page.find_element(By.CSS_SELECTOR, "a.sort[data-sort=bytes]").click()
        shown = [int(e.get_attribute("data-value")) for e in page.find_elements(By.CSS_SELECTOR, "td.bytes")]
        assert shown == sorted((p["bytes"] for p in packs), reverse=True)
        # a pack's page: its manifest's modules and its card
        page.get(url + f"/packs/{packs[0]['id']}")
        assert page.find_element(By.ID, "pack-task").text == packs[0]["task"]
        details = cli_json("--registry", registry, "show", packs[0]["id"])
        assert len(page.find_elements(By.CSS_SELECTOR, "#modules tbody tr")) == len(details["manifest"]["modules"])
        screenshot(page, "pack")
        # forgetting: every policy's heatmap cell and ACC as `skillhub metrics` reports them
        page.get(url + "/tasks")
        for policy, result in metrics["policies"].items():
            figure = page.find_element(By.CSS_SELECTOR, f"figure.policy[data-policy={policy}]")
            for i, row in enumerate(result["R"]):
                for j, value in enumerate(row):
                    if value is not None:
                        cell = figure.find_element(By.CSS_SELECTOR, f"text[data-row='{i}'][data-column='{j}']")
                        assert cell.text == f"{value:.2f}"
            if result["metrics"]:
                acc = figure.find_element(By.CSS_SELECTOR, "span[data-metric=ACC]").text
                assert acc == f"ACC {result['metrics']['ACC']:.3f}"
        screenshot(page, "tasks")
        page.get(url + "/router")
        assert page.find_element(By.ID, "router-heldout").text == f"{router['info']['accuracy']['heldout']:.2f}"
        assert len(page.find_elements(By.CSS_SELECTOR, "#classes tbody tr")) == len(router["classes"])
        screenshot(page, "router")
        page.get(url + "/lineage")
        events = cli_json("--registry", registry, "log")
        assert len(page.find_elements(By.CSS_SELECTOR, "#events li")) == len(events)
        page.get(url + "/interference")
        pairs = page.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")
        assert len(pairs) == len(packs) * (len(packs) - 1) // 2
        # /api/ returns what the CLI's --json prints
        for path, expected in (("/api/packs", packs), ("/api/metrics", metrics), ("/api/router", router)):
            page.get(url + path)
            assert json.loads(page.find_element(By.TAG_NAME, "body").text) == expected
        assert all(u.startswith(url) for u in requested_urls(page)), "a page asked for something elsewhere"


def test_hostile_names_and_card_text_are_shown_as_text(scored: Path, page) -> None:
    from selenium.webdriver.common.by import By

    hostile = next(p for p in cli_json("--registry", str(scored), "list") if p["name"] == "hostile-card")
    with running(create_browser_app(Registry(scored))) as url:
        for path in ("/", f"/packs/{hostile['id']}", "/packs", "/lineage"):
            page.get(url + path)
            # as a reader's mouse would: had any markup become elements, its handlers would run now
            page.execute_script("document.querySelectorAll('*').forEach("
                                "e => e.dispatchEvent(new MouseEvent('mouseover', {bubbles: true})))")
            assert page.execute_script("return window.pwned === undefined"), path
            assert not page.find_elements(By.CSS_SELECTOR, "main img, main b, main script"), path
        page.get(url + f"/packs/{hostile['id']}")
        assert HOSTILE in page.find_element(By.ID, "recipe").text  # the recipe's description, as text
        assert '<b onmouseover=\\"window.pwned=3\\">base' in page.find_element(By.ID, "card").text
        page.get(url + "/")
        assert '<b onmouseover="window.pwned=3">base' in page.find_element(By.ID, "bases").text
        assert all(u.startswith(url) for u in requested_urls(page))


def test_the_page_is_read_only_and_needs_the_key_when_it_has_one(scored: Path, page) -> None:
    import http.client

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(create_browser_app(Registry(scored), api_key="k3y")) as url:
        port = int(url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/api/packs")
        assert connection.getresponse().status == 401
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/api/packs", body=b"{}")
        assert connection.getresponse().status == 405  # nothing here accepts a write
        page.delete_all_cookies()
        page.get(url + "/packs")
        assert page.current_url.endswith("/login")  # a page without the key goes to the form
        page.find_element(By.NAME, "key").send_keys("k3y\n")
        # The form's POST sets the cookie and redirects to "/": wait for it, or the next get races it.
        WebDriverWait(page, 30).until(lambda p: not p.current_url.endswith("/login"))
        page.get(url + "/packs")
        assert page.find_elements(By.CSS_SELECTOR, "#packs tbody tr")
    refused = CliRunner().invoke(main, ["--registry", str(scored), "ui", "--host", "0.0.0.0"])
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: --host 0.0.0.0 exposes the server")


def test_playground_streams_the_answer_generate_gives(routed, page) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with Generator(Registry(routed[0]), max_new_tokens=16) as generator:
        expected = {g.prompt: g for g in generator.generate(["shift abcde=", "sort zyxwv="], route=True)}
    with running(create_app(Registry(routed[0]), limits=Limits(max_tokens=16))) as url:
        page.get(url + "/playground")
        for prompt, model in (("shift abcde=", "shift"), ("sort zyxwv=", "auto")):
            Select(page.find_element(By.ID, "model")).select_by_value(model)
            field = page.find_element(By.ID, "max-tokens")
            field.clear()
            field.send_keys("16")
            box = page.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            page.execute_script("delete document.getElementById('playground').dataset.done")
            page.find_element(By.ID, "send").click()
            WebDriverWait(page, 60).until(
                lambda d: d.execute_script("return document.getElementById('playground').dataset.done === 'true'"))
            assert page.find_element(By.ID, "answer").text == expected[prompt].output
            assert page.find_element(By.ID, "packs").text == ", ".join(expected[prompt].packs)
            if model == "auto":
                assert page.find_element(By.ID, "task").text == expected[prompt].task
                assert float(page.find_element(By.ID, "probability").text) == pytest.approx(
                    expected[prompt].probability, abs=1e-3)
        screenshot(page, "playground")
        assert all(u.startswith(url) for u in requested_urls(page))
