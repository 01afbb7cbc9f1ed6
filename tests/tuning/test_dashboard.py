"""`convpipe tune-ui`: optuna-dashboard over the campaign's storage, looked at in a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from convpipe.tuning.storage import open_storage
from tests.helpers.project import ROOT
from tests.helpers.servers import free_port, stop_server, wait_for_http

STUDY = "dash"
CONVPIPE = str(Path(sys.executable).with_name("convpipe"))


@pytest.fixture(scope="module")
def campaign(raw_params, tmp_path_factory) -> Path:
    """A params file whose journal storage holds study ``dash`` with three finished trials."""
    root = tmp_path_factory.mktemp("dashboard")
    raw = {**raw_params, "tune": {**raw_params["tune"], "study_name": STUDY}}
    raw["tune"]["storage"] = f"journal:{root / 'tuning' / 'study.journal'}"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    storage = open_storage(raw["tune"]["storage"])
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="minimize")
    lr = FloatDistribution(1e-4, 1e-1, log=True)
    for value, loss in ((0.003, 0.31), (0.01, 0.22), (0.05, 0.47)):
        study.add_trial(
            create_trial(params={"train.lr": value}, distributions={"train.lr": lr}, value=loss)
        )
    return root


@pytest.fixture(scope="module")
def dashboard(campaign: Path, tmp_path_factory) -> Iterator[str]:
    """``convpipe tune-ui`` serving the campaign on a free port of 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("dashlog") / "tune-ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CONVPIPE, "--params", str(campaign / "params.yaml"), "tune-ui", "--port", str(port)],
            cwd=campaign,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(proc, f"{url}/api/studies", log, 60)
        yield url
    finally:
        stop_server(proc)
    said = log.read_text()
    assert f"study {STUDY}" in said and f"{url}/dashboard" in said


@pytest.mark.subprocess
def test_the_dashboard_serves_the_campaign_study_and_its_trials(dashboard: str) -> None:
    with urllib.request.urlopen(f"{dashboard}/api/studies", timeout=10) as response:
        studies = json.loads(response.read())["study_summaries"]
    (study,) = [s for s in studies if s["study_name"] == STUDY]
    with urllib.request.urlopen(f"{dashboard}/api/studies/{study['study_id']}", timeout=10) as got:
        detail = json.loads(got.read())
    assert len(detail["trials"]) == 3
    assert [t["values"] for t in detail["trials"]] == [[0.31], [0.22], [0.47]]


@pytest.mark.subprocess
def test_a_port_in_use_is_one_line(campaign: Path, dashboard: str) -> None:
    port = dashboard.rsplit(":", 1)[1]
    done = subprocess.run(
        [CONVPIPE, "--params", str(campaign / "params.yaml"), "tune-ui", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"convpipe: error: port {port} is in use, on 127.0.0.1, pass another --port"
    )


@pytest.mark.browser
@pytest.mark.subprocess
def test_a_browser_finds_the_study_and_its_trials(dashboard: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from docs import screenshots

    if screenshots.browser_binaries() is None:
        if os.environ.get("CONVPIPE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (CONVPIPE_REQUIRE_BROWSER)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium-driver)")
    with screenshots.browser() as driver:
        driver.get(f"{dashboard}/dashboard")
        body = screenshots.wait_until(
            driver, lambda d: STUDY in d.find_element("tag name", "body").text and d, "the study"
        )
        studies = json.loads(urllib.request.urlopen(f"{dashboard}/api/studies").read())[
            "study_summaries"
        ]
        study_id = next(s["study_id"] for s in studies if s["study_name"] == STUDY)
        driver.get(f"{dashboard}/dashboard/studies/{study_id}/trials")
        text = screenshots.wait_until(
            driver,
            lambda d: (t := d.find_element("tag name", "body").text) and "Trial 2" in t and t,
            "the trials",
        )
        assert "Trial 0" in text and "train.lr" in text
        shot = Path(os.environ.get("CONVPIPE_DASHBOARD_SHOT", tmp_path / "dashboard.png"))
        body.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")
