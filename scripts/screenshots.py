"""Screenshots of a lineage in the MLflow UI, for the README (headless Debian Chromium).

    ./scripts/screenshots.sh text-demo model docs/mlflow-lineage.png
    ./scripts/screenshots.sh text-demo version:2 docs/mlflow-version.png
    ./scripts/screenshots.sh text-demo plots docs/mlflow-plots.png

``model``: the registered model's page, tall enough for every version; ``version:N``: one
version's page; ``plots``: the champion's run, ``plots/accuracy_per_step.png`` open. MLflow
is found at ``MLFLOW_TRACKING_URI`` (default the embedded stack's http://127.0.0.1:5000).
The assistant side panel is closed before the shot.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright

WIDTH = 1900
CHROMIUM = "/usr/bin/chromium"


def _api(base: str, path: str, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _page(base: str, lineage: str, what: str) -> tuple[str, int, str]:
    """URL, viewport height and a text to wait for."""
    if what == "model":
        found = _api(base, "model-versions/search", filter=f"name='{lineage}'", max_results="1000")
        n = len(found.get("model_versions", []))
        # the versions table scrolls inside the page: make the viewport hold every row
        return f"{base}/#/models/{lineage}", 560 + 305 * n, "text=Version 1"
    if what.startswith("version:"):
        v = what.split(":", 1)[1]
        return f"{base}/#/models/{lineage}/versions/{v}", 1500, f"text=Version {v}"
    if what == "plots":
        champion = _api(base, "registered-models/alias", name=lineage, alias="champion")
        run_id = champion["model_version"]["run_id"]
        experiment = _api(base, "runs/get", run_id=run_id)["run"]["info"]["experiment_id"]
        path = "plots/accuracy_per_step.png"
        return (
            f"{base}/#/experiments/{experiment}/runs/{run_id}/artifacts/{path}",
            1300,
            "text=accuracy_per_step.png",
        )
    raise SystemExit(f"screenshots: unknown page {what!r} (model, version:N or plots)")


def main(lineage: str, what: str, out: str) -> None:
    base = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000").rstrip("/")
    url, height, ready = _page(base, lineage, what)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": WIDTH, "height": height})
        page.goto(url)
        page.wait_for_selector(ready, timeout=60_000)
        time.sleep(3)  # the tables fill in after the first rows
        close = page.locator('[aria-label="Close"]')
        if close.count():
            close.first.click(timeout=5_000)
            time.sleep(1)
        page.screenshot(path=out)
        browser.close()
    print(f"{out}: {url} ({WIDTH}x{height})")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
