"""The documentation: a current params reference, links that resolve, a strict build, a browser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from convpipe.config.edit import leaves
from convpipe.config.reference import render
from convpipe.config.schema import read_yaml
from tests.helpers.project import ROOT, documented_pages
from tests.test_dvc_deps import MAY_IMPORT, SHARED

REFERENCE = ROOT / "docs" / "params.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def test_the_params_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(
        ROOT / "params.yaml", ROOT / "dvc.yaml"
    ), "docs/params.md is stale: run `make docs`"


def test_the_params_reference_lists_every_key() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    keys = [key for key, _ in leaves(read_yaml(ROOT / "params.yaml"))]
    # a search dimension is one row: tune.space.<params key>, its type/low/high inline
    keys = [key.rsplit(".", 1)[0] if key.startswith("tune.space.") else key for key in keys]
    assert len(keys) > 100
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert missing == []


def test_the_reference_says_which_stage_reads_a_key() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    assert re.search(r"\| `train\.lr` \| float > 0\.0 \| `0\.003` \| .* \| train \|", text)
    assert re.search(r"\| `data\.resize` \| one of `stretch` \\\| `crop` \\\| `pad` \|", text)
    assert "| `tune.n_trials` |" in text and "`convpipe tune`" in text


@pytest.mark.parametrize("page", documented_pages(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in t]
    broken = [t for t in targets if not (page.parent / t).exists()]
    assert broken == []


def test_the_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in documented_pages()[1:]:
        assert f"(docs/{page.name})" in readme, f"the README does not link {page.name}"


def test_the_architecture_page_states_the_import_rules_the_tests_enforce() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for package, allowed in MAY_IMPORT.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{package}/` |"))
        stated = set(re.findall(r"`([a-z_.]+)`", row.rsplit("|", 2)[-2]))
        stated = {name.split(".")[0] for name in stated} - SHARED
        assert stated == allowed, f"{package}: the page says {sorted(stated)}"


@pytest.mark.subprocess
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "params.html").is_file()
    assert (site / "results" / "RESULTS.html").is_file()  # benchmarks/ reports


@pytest.mark.slow
@pytest.mark.browser
def test_a_browser_finds_the_reference_and_the_navigation(tmp_path: Path) -> None:
    from docs import screenshots

    if screenshots.browser_binaries() is None:
        if os.environ.get("CONVPIPE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (CONVPIPE_REQUIRE_BROWSER)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium-driver)")
    site = tmp_path / "site"
    subprocess.run(
        [str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=True,
    )
    with screenshots.browser() as driver:
        driver.get((site / "params.html").as_uri())  # use_directory_urls: false
        body = driver.find_element("tag name", "body").text
        assert "Parameters reference" in body and "train.lr" in body
        links = {a.text.strip() for a in driver.find_elements("css selector", "nav a")}
        assert {"Getting started", "Your data", "Tuning", "When things go wrong"} <= links
        driver.find_element("link text", "Tuning").click()
        assert "Tuning with Optuna" in driver.find_element("tag name", "h1").text
