"""A real Prometheus server for tests, and what the dashboard test needs around it.

:class:`Prometheus` runs the Debian package's ``prometheus`` binary on a free
loopback port with a scrape configuration of static targets, and queries it
through its HTTP API (``/api/v1/query``, ``/api/v1/label/NAME/values``).
:func:`metric_names` reads the metric names out of a PromQL expression and
:func:`exported_metric_names` lists every sample name the code exports, so a
dashboard query naming a metric that does not exist is caught without a
server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from support.procs import free_port, stop, wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "mulambda.json"

# Grafana's variables, as a test evaluates a dashboard query: every executor and client, and
# ranges long enough to hold a short test's scrapes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$executor": ".*",
    "$client": ".*",
}


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error (a parse error names the position)."""


class Prometheus:
    """``Prometheus(workdir, {"job": ["127.0.0.1:PORT", ...]}).start()``; ``query``; ``stop``."""

    def __init__(self, workdir: Path, targets: Mapping[str, Iterable[str]], *,
                 scrape_interval: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package `prometheus`, "
                               "installed by .ci/run)")
        self.binary = binary
        self.workdir = workdir
        self.targets = {job: list(hosts) for job, hosts in targets.items()}
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": job, "scrape_timeout": interval,
                 "static_configs": [{"targets": hosts}]}
                for job, hosts in self.targets.items()
            ],
        }

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config()))  # JSON is YAML
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(self.workdir / "prometheus.log").open("wb"),
        )
        wait_until(lambda: self._get("/-/ready", raw=True) is not None, timeout,
                   "prometheus", interval=0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the HTTP API ------------------------------------------------------------------
    def _get(self, path: str, params: Mapping[str, str] | None = None, *,
             raw: bool = False) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with its reason
            body = exc.read()
            if raw:
                return None
        if raw:
            return body
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PrometheusError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one series) ``expr`` evaluates to now."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._get(f"/api/v1/label/{label}/values", {"match[]": match}))

    def targets_health(self) -> dict[str, str]:
        """scrape URL -> "up" / "down" / "unknown" of every active target."""
        data = self._get("/api/v1/targets")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def wait_for_targets(self, timeout: float = 20.0) -> None:
        wait_until(lambda: set(self.targets_health().values()) == {"up"}, timeout,
                   "every scrape target up", interval=0.2)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def dashboard_panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    found = []
    for p in board["panels"]:
        found.append(p)
        found.extend(p.get("panels", []))
    return found


def dashboard_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels(board)
            for t in p.get("targets", [])]


def dashboard_variables(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(variable name, its ``label_values(...)`` query) of every query variable."""
    return [(v["name"], v["query"]["query"]) for v in board["templating"]["list"]
            if v["type"] == "query"]


def grafana_expr(expr: str, variables: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    """A dashboard expression with Grafana's variables replaced, longest name first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


# -- metric names ------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)  # label matchers, with any Grafana variable in them
    text = _RANGE.sub(" ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def label_values_queries(expr: str) -> tuple[str, str] | None:
    """(metric, label) of Grafana's ``label_values(METRIC, LABEL)``, else None."""
    found = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
    return (found.group(1), found.group(2)) if found else None


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def sample_names(registry: Any) -> set[str]:
    """Every sample name ``registry`` exports, also for labelled metrics without children
    yet (their families have no samples until a label set is used)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exported_metric_names() -> dict[str, set[str]]:
    """Component -> the sample names its ``/metrics`` can export, from the code's own
    registries: the operator's (the process-wide default registry its modules define
    their metrics in), a companion's and a selector's (each builds its own, with every
    part a running one has: the companion's task worker, the selector's task API)."""
    from prometheus_client import REGISTRY

    import mulambda.operator.main  # noqa: F401  (defines the operator's metrics)
    from mulambda.companion.lifecycle import Companion, S3ModelSource
    from mulambda.companion.serving import ServingClient
    from mulambda.selector.app import create_app
    from mulambda.selector.service import SELECTOR_KEY
    from mulambda.settings import CompanionSettings
    from mulambda.store.metadata import MetadataStore

    # Both build their state without connecting: nothing needs to listen there.
    store = MetadataStore.from_url(store_url())
    app = create_app(store)
    config = CompanionSettings.from_env({
        "MULAMBDA_EXECUTOR": "ml/m", "MULAMBDA_MODEL_URI": "s3://models/m",
        "MULAMBDA_MODELS_DIR": "/models", "MULAMBDA_POD_NAME": "m-0",
        "MULAMBDA_TFSERVING_URL": "http://127.0.0.1:8501", "MULAMBDA_REDIS_URL": store_url(),
    })
    serving = ServingClient(config.serving_rest_url)
    companion = Companion(config, store, S3ModelSource(None, config), serving)
    assert companion.worker is not None, "the companion's task worker is on by default"
    return {
        "operator": sample_names(REGISTRY),
        "companion": sample_names(companion.metrics.registry),
        "selector": sample_names(app[SELECTOR_KEY].registry),
    }


def store_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def wait_for_series(prom: Prometheus, exprs: Iterable[str], timeout: float) -> dict[str, int]:
    """Poll until every expression returns at least one series; expression -> series count
    (0 for those still empty at the deadline)."""
    pending = list(exprs)
    counts: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for expr in list(pending):
            counts[expr] = len(prom.query(expr))
            if counts[expr]:
                pending.remove(expr)
        if not pending or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)
