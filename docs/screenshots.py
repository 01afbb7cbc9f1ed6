"""Screenshots of the MLflow UI over a project's store, taken with headless Chromium.

    python docs/screenshots.py [--project DIR] [--out docs]
    python docs/screenshots.py --dashboard http://127.0.0.1:8080 [--study NAME] [--out docs]

starts ``mlflow server`` on 127.0.0.1 over the project's ``mlflow.db``, opens its training
runs in Debian's ``chromium`` (through ``chromedriver`` and Selenium) and writes
``mlflow_runs.png`` (the runs table: names, datasets), ``mlflow_val_acc.png`` (the chart
view filtered to ``val/acc`` per epoch) and ``mlflow_system_metrics.png`` (the newest training
run's system metrics tab). The README's "Compare experiments" pictures are made
with it after the commands of that section; with ``--dashboard`` it writes
``tune_dashboard.png``, optuna-dashboard's page of a study that ``convpipe tune-ui`` serves
(docs/tuning.md). ``tests/journeys/test_compare.py``
(``test_mlflow_ui_shows_every_experiment``) drives the same browser through :func:`browser`
and :func:`open_runs`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
WINDOW = (1600, 900)
PAGE_TIMEOUT_S = 60.0
SERVER_TIMEOUT_S = 90.0


def browser_binaries() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when either is not installed."""
    chromium = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which(CHROMEDRIVER)
    return (chromium, driver) if chromium and driver else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(store: Path, log: Path) -> Iterator[str]:
    """Serve ``store`` (an sqlite file) with ``mlflow server`` on 127.0.0.1; yield its URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store.resolve()}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(proc, f"{url}/health", log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}, see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"mlflow server gave no answer on {url} in {SERVER_TIMEOUT_S:.0f} s, see {log}"
    )


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Selenium through Debian's chromedriver.

    Raises:
        RuntimeError: If chromium or chromedriver is not installed (``apt-get install chromium
            chromium-driver``); Selenium is never let to download a browser.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = browser_binaries()
    if found is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium "
                           "chromium-driver")  # fmt: skip
    chromium, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    with tempfile.TemporaryDirectory(prefix="convpipe-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait_until(driver: Any, found: Callable[[Any], Any], what: str) -> Any:
    """Poll ``found(driver)`` until it is truthy; fail naming ``what`` after the page timeout."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = found(driver)
            if value:
                return value
        time.sleep(0.5)
    raise RuntimeError(f"the page never showed {what} at {driver.current_url}")


def _close_assistant(driver: Any) -> None:
    """Close MLflow's assistant side panel if it opened: it covers a third of the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            button.click()


def open_runs(
    driver: Any, url: str, experiment_id: str, names: list[str], chart: bool = False
) -> str:
    """Open an experiment's training runs (table, or chart view) until every name shows.

    Returns:
        The page's visible text.
    """
    from selenium.webdriver.common.by import By

    mode = "?compareRunsMode=CHART" if chart else ""
    driver.get(f"{url}/#/experiments/{experiment_id}/runs{mode}")
    text = wait_until(
        driver,
        lambda d: (
            (t := d.find_element(By.TAG_NAME, "body").text) and all(n in t for n in names) and t
        ),
        f"the runs {names}",
    )
    _close_assistant(driver)
    return str(text)


def show_chart(driver: Any, metric: str) -> None:
    """In the chart view, keep only the charts whose name matches ``metric``."""
    from selenium.webdriver.common.by import By

    box = wait_until(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"),
        "the chart search box",
    )
    box.send_keys(metric)
    time.sleep(2)  # the charts re-render after the filter


def enlarge_first_chart(driver: Any) -> None:
    """Open the first chart full screen (the button left of its card menu)."""
    from selenium.webdriver.common.by import By

    menu = "//button[@data-testid='experiment-view-compare-runs-card-menu']"
    button = wait_until(
        driver, lambda d: d.find_element(By.XPATH, f"{menu}/preceding::button[1]"), "a chart"
    )
    button.click()
    time.sleep(2)


def experiment_id(store: Path, name: str) -> str:
    """The id of experiment ``name`` in ``store``."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(f"sqlite:///{store.resolve()}").get_experiment_by_name(name)
    if found is None:
        raise RuntimeError(f"no MLflow experiment {name!r} in {store}")
    return str(found.experiment_id)


def training_run_names(store: Path, experiment: str) -> list[str]:
    """The names of the experiment's training runs (not tuning), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    return [r.info.run_name for r in runs if "convpipe.kind" not in r.data.tags]


def newest_run_with_system_metrics(store: Path, experiment: str) -> str:
    """The id of the experiment's newest training run that has MLflow's system metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    for run in client.search_runs([experiment], order_by=["attributes.start_time DESC"]):
        if "convpipe.kind" not in run.data.tags and any(
            key.startswith("system/") for key in run.data.metrics
        ):
            return str(run.info.run_id)
    raise RuntimeError(f"no training run with system metrics in experiment {experiment}")


def system_metrics_shot(driver: Any, url: str, experiment: str, run_id: str, out: Path) -> None:
    """Screenshot the run page's *System metrics* tab (CPU, memory, disk, network charts)."""
    driver.get(f"{url}/#/experiments/{experiment}/runs/{run_id}/system-metrics")
    wait_until(
        driver,
        lambda d: "cpu_utilization" in d.find_element("tag name", "body").text,
        "the system metrics charts",
    )
    _close_assistant(driver)
    time.sleep(3)  # the charts draw after the page's text
    driver.save_screenshot(str(out))


def dashboard_shot(driver: Any, url: str, study: str, out: Path) -> None:
    """Screenshot optuna-dashboard's page of ``study`` (``convpipe tune-ui`` at ``url``)."""
    import json

    with urllib.request.urlopen(f"{url}/api/studies", timeout=30) as response:
        summaries = json.loads(response.read())["study_summaries"]
    study_id = next(s["study_id"] for s in summaries if s["study_name"] == study)
    driver.get(f"{url}/dashboard/studies/{study_id}")
    wait_until(driver, lambda d: "History" in d.find_element("tag name", "body").text, "history")
    time.sleep(3)  # the plots draw after the page's text
    driver.save_screenshot(str(out))


def main(argv: list[str] | None = None) -> None:
    """Write the runs-table and ``val/acc`` chart screenshots of a project's MLflow store."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--project", type=Path, default=Path("."), help="folder with mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    parser.add_argument("--experiment", default="convpipe", help="MLflow experiment name")
    parser.add_argument("--dashboard", help="instead: the URL `convpipe tune-ui` serves")
    parser.add_argument("--study", default="convpipe", help="with --dashboard: the study")
    args = parser.parse_args(argv)
    if args.dashboard:
        args.out.mkdir(parents=True, exist_ok=True)
        with browser() as driver:
            dashboard_shot(driver, args.dashboard, args.study, args.out / "tune_dashboard.png")
        print(f"{args.out}/tune_dashboard.png: study {args.study}")
        return
    store = args.project / "mlflow.db"
    exp = experiment_id(store, args.experiment)
    names = training_run_names(store, exp)
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow_server(store, Path(tmp) / "server.log") as url,
        browser() as driver,
    ):
        open_runs(driver, url, exp, names)
        driver.save_screenshot(str(args.out / "mlflow_runs.png"))
        open_runs(driver, url, exp, names, chart=True)
        show_chart(driver, "val/acc")
        enlarge_first_chart(driver)
        driver.save_screenshot(str(args.out / "mlflow_val_acc.png"))
        run_id = newest_run_with_system_metrics(store, exp)
        system_metrics_shot(driver, url, exp, run_id, args.out / "mlflow_system_metrics.png")
    print(
        f"{args.out}/mlflow_runs.png, {args.out}/mlflow_val_acc.png: runs {', '.join(names)}; "
        f"{args.out}/mlflow_system_metrics.png: run {run_id}"
    )


if __name__ == "__main__":
    main()
