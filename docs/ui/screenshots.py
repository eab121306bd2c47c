"""Screenshots of the MLflow UI after a sweep, for docs/mlflow.md and the README.

What it does:

1. runs the cpu preset of ``table4`` (about 1 min on 2 cores), then ``fig3`` into the same folder
   (it reuses table4's models where it can), then ``wbsweep report table4 --claims``;
2. starts ``wbsweep mlflow-server`` on that folder and waits until it answers;
3. opens the MLflow UI in headless Chromium (Playwright) and writes PNGs to ``docs/img/``:
   the table4 runs list with its nested runs expanded, the spec-level report run (its claims table
   and, from fig3, a figure in the artifact viewer), a repeat-stage parent's mean/std over seeds,
   one model run (params, metrics, tags) and its artifacts, the fig3 experiment's runs (reference
   runs to table4's models) and a chart comparing the repeat-stage models.

What it needs: wbsweep installed (``pip install -e ".[screenshots]"``, which adds the Python package
``playwright``) and a Chromium binary (Debian/Ubuntu: ``apt-get install chromium``; give another
path with ``--chromium``). Never ``playwright install``: the system Chromium is used.

    python docs/ui/screenshots.py                     # sweep in a temporary folder, PNGs to docs/img/
    python docs/ui/screenshots.py --out /tmp/shots    # keep the sweep's folder
    python docs/ui/screenshots.py --out /tmp/shots --skip-sweep   # reuse a folder that has the sweep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
MAX_BYTES = 400_000


def log(msg: str) -> None:
    print(f"[screenshots {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wbsweep(*args: str) -> list[str]:
    """The command line of ``wbsweep ARGS`` with this checkout's code."""
    return [sys.executable, "-m", "orchestrator.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def sweep(out: Path) -> None:
    for cmd in (["run", "table4", "--out", str(out), "--quiet"],
                ["run", "fig3", "--out", str(out), "--quiet"],
                ["report", "table4", "--claims", "--out", str(out)]):
        log("wbsweep " + " ".join(cmd))
        subprocess.run(wbsweep(*cmd), check=True, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL)


def start_server(out: Path, port: int, timeout: float = 180) -> subprocess.Popen:
    """``wbsweep mlflow-server`` on ``out``, once its /health answers."""
    logf = open(out / "mlflow-server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(wbsweep("mlflow-server", "--out", str(out), "--port", str(port)), cwd=ROOT, env=env(),
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the MLflow server ended (rc {proc.returncode}); see {out / 'mlflow-server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"the MLflow server did not answer within {timeout:.0f} s; see {out / 'mlflow-server.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class Ids:
    """The experiment and run ids the screenshots open, looked up in the sweep's store."""

    def __init__(self, out: Path):
        from mlflow import MlflowClient

        c = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}")
        self.exp = {e.name: e.experiment_id for e in c.search_experiments()}
        t4, f3 = self.exp["table4"], self.exp["fig3"]

        def one(exp: str, flt: str) -> str:
            runs = c.search_runs([exp], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
            if not runs:
                raise SystemExit(f"no run with {flt} in experiment {exp}")
            return runs[0].info.run_id

        self.report4 = one(t4, "tags.`wbsweep.kind` = 'report'")
        self.report3 = one(f3, "tags.`wbsweep.kind` = 'report'")
        self.repeat_parent = one(t4, "attributes.run_name = 'repeat/wd_fr_etf'")
        self.tune_parent = one(t4, "attributes.run_name = 'tune/wd_fr_etf'")
        self.model = one(t4, f"tags.`mlflow.parentRunId` = '{self.repeat_parent}' and tags.`wbsweep.seed` = '1'")
        self.figure = next(a.path for a in c.list_artifacts(self.report3, "figures") if a.path.endswith(".png"))
        self.parents3 = [r.info.run_id for r in c.search_runs([f3], max_results=5000)
                         if r.data.tags.get("wbsweep.stage") and "mlflow.parentRunId" not in r.data.tags]


def page_state(columns: list[str], expanded: list[str]) -> str:
    """The runs page's saved view (MLflow keeps it in localStorage): which columns, which parent
    runs are expanded."""
    return json.dumps({
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": [], "columnWidths": {},
        "runsExpanded": dict.fromkeys(expanded, True), "runsPinned": [], "runsHidden": [],
        "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}})


def init_script(ids: Ids) -> str:
    """localStorage before the app first loads: the Model training view (not the GenAI home), the
    assistant panel closed, the runs tables' columns and expanded parents."""
    cols4 = ["tags.`wbsweep.stage`", "tags.`wbsweep.method`", "tags.`wbsweep.chosen`", "tags.`wbsweep.kind`",
             "metrics.`none.acc_avg`", "metrics.`mean.none.acc_avg`", "metrics.`std.none.acc_avg`"]
    cols3 = ["tags.`wbsweep.stage`", "tags.`wbsweep.kind`", "tags.`wbsweep.reference_of`", "metrics.`fdr_train`"]
    items = {
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "_mlflow_dark_mode_toggle_enabled": "false",
        "databricks-dark-mode-pref": "light",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{ids.exp["table4"]}"]-ReactComponentState':
            page_state(cols4, [ids.repeat_parent, ids.tune_parent]),
        f'MLflowLocalStorage-1.1-ExperimentPage-["{ids.exp["fig3"]}"]-ReactComponentState':
            page_state(cols3, ids.parents3),
    }
    sets = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())
    return f"if (!sessionStorage.getItem('wbsweep-seeded')) {{ {sets} sessionStorage.setItem('wbsweep-seeded', '1'); }}"


class Shooter:
    def __init__(self, page, base: str, img: Path):
        self.page, self.base, self.img = page, base, img

    def goto(self, route: str, wait_text: str | None = None, settle: float = 3.0, height: int = 900) -> None:
        self.page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        self.page.goto(f"{self.base}/#{route}")
        if wait_text:
            self.page.get_by_text(wait_text, exact=False).first.wait_for(timeout=60_000)
        with contextlib.suppress(Exception):  # the app polls; the text waited for is what matters
            self.page.wait_for_load_state("networkidle", timeout=10_000)
        time.sleep(settle)

    def sidebar(self, show: bool) -> None:
        """Show or hide MLflow's left bar (its width is kept in the page: toggle only when needed)."""
        shown = self.page.get_by_text("Model registry", exact=True).first.is_visible()
        if shown != show:
            self.page.get_by_label("Toggle sidebar").first.click()
            time.sleep(1)

    def shot(self, name: str, full_page: bool = False) -> Path:
        path = self.img / name
        self.page.mouse.move(0, VIEWPORT["height"] - 1)  # no hover highlight or tooltip
        time.sleep(0.5)
        self.page.screenshot(path=str(path), full_page=full_page)
        size = path.stat().st_size
        log(f"{name}: {size / 1000:.0f} kB" + ("  (over 400 kB)" if size > MAX_BYTES else ""))
        return path


#: The columns of the claims table a researcher reads first (the rest: the viewer's Table settings),
#: and their widths in pixels (the viewer gives each 150 and cuts the claim's text).
CLAIM_COLUMNS = {"text": 430, "diff": 130, "p": 110, "verdict": 120}

#: Shows only the given columns of the artifact viewer's table, as wide as given (header and cells,
#: by position; MLflow's Table settings menu does the same by hand).
COLUMNS_JS = """widths => {
  const heads = [...document.querySelectorAll('[role=columnheader]')];
  const cols = heads.map(h => [[...h.parentElement.children].indexOf(h), widths[h.innerText.trim()]]);
  for (const row of document.querySelectorAll('[role=row]')) {
    for (const [i, w] of cols) {
      const c = row.children[i];
      if (!c) continue;
      if (w === undefined) c.style.display = 'none';
      else Object.assign(c.style, {maxWidth: w + 'px', minWidth: w + 'px', width: w + 'px', flex: `0 0 ${w}px`});
    }
  }
}"""

#: The same for the report's table (it also has each column's std, fdr_test and the paper's numbers).
REPORT_COLUMNS = {"method": 80, "la": 45, "fdr_train_mean": 110, "acc_many_mean": 135, "acc_medium_mean": 150,
                  "acc_few_mean": 115, "acc_avg_mean": 115, "acc_avg_std": 100, "seeds": 60}


def table_columns(page, keep: dict[str, int]) -> None:
    """Show only the columns ``keep`` of a logged table in the artifact viewer, as wide as ``keep`` says."""
    page.evaluate(COLUMNS_JS, keep)
    time.sleep(1)


def take(ids: Ids, base: str, img: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    t4, f3 = ids.exp["table4"], ids.exp["fig3"]
    img.mkdir(parents=True, exist_ok=True)
    q = "?workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        ctx.add_init_script(init_script(ids))
        s = Shooter(ctx.new_page(), base, img)

        # a. table4's runs: the spec-level runs, a parent per stage, two stages expanded
        s.goto(f"/experiments/{t4}/runs{q}", wait_text="repeat/wd_fr_etf", settle=4, height=1240)
        s.sidebar(False)
        s.shot("mlflow-runs.png")

        # b. the spec-level report run: the claims table, the report table; fig3's: its figure
        s.goto(f"/experiments/{t4}/runs/{ids.report4}/artifacts/claims_table.json", wait_text="claims_table.json")
        table_columns(s.page, CLAIM_COLUMNS)
        s.shot("mlflow-report-claims.png")
        s.page.get_by_text("report_table.json", exact=True).first.click()  # same page: the route alone keeps claims
        s.page.get_by_text("acc_avg_mean", exact=True).first.wait_for(timeout=60_000)
        time.sleep(2)
        table_columns(s.page, REPORT_COLUMNS)
        s.shot("mlflow-report-table.png")
        s.goto(f"/experiments/{f3}/runs/{ids.report3}/artifacts/{ids.figure}", wait_text="figures")
        s.shot("mlflow-report-figure.png")

        # c. a repeat-stage parent: mean/std over seeds, its child runs
        s.goto(f"/experiments/{t4}/runs/{ids.repeat_parent}", wait_text="mean.mult.acc_avg")
        s.shot("mlflow-repeat-parent.png")

        # d. a model run: metrics, tags (config hash, source commit), params; its artifacts
        s.goto(f"/experiments/{t4}/runs/{ids.model}", wait_text="wbsweep.config_hash", height=1300)
        s.shot("mlflow-model-run.png")
        s.goto(f"/experiments/{t4}/runs/{ids.model}/artifacts/config.json", wait_text="config.json")
        s.shot("mlflow-model-artifacts.png")

        # e. fig3: every model of the figure, those trained by table4 as reference runs
        s.goto(f"/experiments/{f3}/runs{q}", wait_text="repeat/wd_cb", settle=4)
        s.shot("mlflow-fig3-runs.png")

        # f. charts: the repeat stages' mean/std average accuracy side by side; one stage's training curves
        flt = urllib.parse.quote("attributes.run_name LIKE 'repeat/%'")
        s.goto(f"/experiments/{t4}/runs{q}&compareRunsMode=CHART&searchFilter={flt}", wait_text="Model metrics")
        s.page.get_by_placeholder("Search metric charts").fill("acc_avg")
        time.sleep(3)
        s.shot("mlflow-chart-methods.png")
        flt = urllib.parse.quote(f"tags.`mlflow.parentRunId` = '{ids.repeat_parent}'")
        s.goto(f"/experiments/{t4}/runs{q}&compareRunsMode=CHART&searchFilter={flt}", wait_text="Model metrics",
               height=1240)
        s.page.get_by_placeholder("Search metric charts").fill("val_acc")
        time.sleep(2)
        s.page.get_by_text("val_acc", exact=True).first.scroll_into_view_if_needed()  # the per-epoch curves
        time.sleep(2)
        s.shot("mlflow-chart-curves.png")

        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the sweep's results folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--skip-sweep", action="store_true", help="--out already holds table4, fig3 and the claims")
    ap.add_argument("--port", type=int, default=5077, help="the MLflow server's port (default 5077)")
    ap.add_argument("--url", help="use the MLflow server already serving --out at this address "
                    "(http://127.0.0.1:5000) instead of starting one")
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"), help="where the PNGs go (default docs/img)")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary (default /usr/bin/chromium)")
    args = ap.parse_args(argv)
    if args.skip_sweep and not args.out:
        ap.error("--skip-sweep needs --out")
    if not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium} (apt-get install chromium, or --chromium PATH)")
    t0 = time.monotonic()
    tmp = None
    if args.out:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="wbsweep-shots-")
        out = Path(tmp.name)
    try:
        if not args.skip_sweep:
            sweep(out)
        ids = Ids(out)
        if args.url:
            take(ids, args.url.rstrip("/"), Path(args.img).resolve(), args.chromium)
        else:
            log(f"MLflow server on port {args.port}")
            server = start_server(out, args.port)
            try:
                take(ids, f"http://127.0.0.1:{args.port}", Path(args.img).resolve(), args.chromium)
            finally:
                stop_server(server)
    finally:
        if tmp is not None:
            tmp.cleanup()
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
