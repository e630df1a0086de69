#!/usr/bin/env python3
"""Offline checks of the Switchboard Helm chart.

Run from the repository root: python3 helm/tests/check_chart.py
(`--rules-out FILE` only writes the rendered alerts as a rules file;
`--pod-config DIR` only writes the edge's and router's rendered args, env
and config files as DIR/edge.json and DIR/router.json.)

Needs the Python packages helm-python-sdk, kubernetes-validate, yamllint and
pyyaml, and promtool (Debian package `prometheus`). Steps: helm lint; renders
that must succeed and renders that must fail; Kubernetes schema validation
plus structural checks of the prometheus-operator resources; cross-checks
between the rendered objects (and against the edge's and router's settings in
the Rust sources and the metrics table in docs/operations.md); promtool check
and unit tests of the alerts; yamllint of the values files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "switchboard"
ALERT_TESTS = ROOT / "helm" / "tests" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "switchboard.json"
# The alert unit tests expect this release and namespace.
RELEASE, NAMESPACE = "sb", "switchboard"
EDGE_JOB, ROUTER_JOB = "switchboard-edge", "switchboard-router"
# values.yaml budgets this much memory per socket (edge RSS + kernel).
BYTES_PER_SOCKET = 15 * 1024
REQUIRED_ALERTS = {
    "SwitchboardEdgeDown",
    "SwitchboardRouterDown",
    "SwitchboardDeliveryLatencyHigh",
    "SwitchboardSlowConsumerDisconnectsRising",
    "SwitchboardNatsDisconnected",
    "SwitchboardRedisUnavailable",
    "SwitchboardConnectionDropsSpiking",
    "SwitchboardAuthFailuresSpiking",
    "SwitchboardEdgeNearCapacity",
    "SwitchboardUnrecoverableGaps",
}
# Exported by both binaries besides the documented metrics table.
PROCESS_METRICS = {
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
    "process_start_time_seconds",
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
    from yamllint import linter as yamllint_linter
    from yamllint.config import YamlLintConfig
except ImportError as e:
    sys.exit(
        f"check_chart: missing Python package ({e.name}); install with\n"
        "  pip install helm-python-sdk kubernetes-validate yamllint pyyaml"
    )

# The oldest supported Kubernetes (the preStop sleep action) and the newest schema known.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


class Problems:
    """Failures of one step, reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")

    def check(self, ok: bool, where: str, msg: str) -> bool:
        if not ok:
            self.add(where, msg)
        return ok


FAILED_STEPS: list[str] = []


def step(title: str):
    def wrap(fn):
        def run(*args, **kwargs):
            started = time.monotonic()
            problems = Problems()
            print(f"== {title}", flush=True)
            try:
                result = fn(problems, *args, **kwargs)
            except helm.HelmError as e:
                # A chart that does not even load (bad Chart.yaml, template syntax).
                problems.add("helm", f"{type(e).__name__}: {e}")
                result = None
            took = time.monotonic() - started
            if problems.items:
                for p in problems.items:
                    print(f"   FAIL {p}")
                print(f"   -> {len(problems.items)} problem(s) ({took:.1f} s)")
                FAILED_STEPS.append(title)
            else:
                print(f"   ok ({took:.1f} s)")
            return result

        return run

    return wrap


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


PRODUCTION = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
# The least a default install needs: a JWT key (no default key is safe).
DEFAULTS = {"auth": {"jwtSecret": "check-chart-secret"}}
MONITORING = merge(
    DEFAULTS,
    {"alerts": {"enabled": True}, "serviceMonitor": {"enabled": True}, "dashboards": {"enabled": True}},
)
VARIANTS: dict[str, dict] = {
    "defaults": DEFAULTS,
    "production": PRODUCTION,
    "monitoring": MONITORING,
    "subcharts": merge(DEFAULTS, {"nats": {"enabled": True}, "redis": {"enabled": True}, "auth": {"apiKey": "k"}}),
    "wss-hard-affinity": merge(
        DEFAULTS,
        {
            "edge": {
                "tls": {"enabled": True, "secretName": "edge-tls"},
                "affinity": {"podAntiAffinity": "hard"},
                "autoscaling": {"enabled": True},
                "settings": {"allowed_origins": ["https://a.example"], "max_handshakes": 500},
            },
            "auth": {"jwtPublicKey": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"},
            "externalRedis": {"existingSecret": "redis-pw"},
            "externalNats": {"existingSecret": "nats-urls"},
        },
    ),
    # Redis deployment modes (ADR 0018), with the password from a Secret.
    "redis-sentinel": merge(
        DEFAULTS,
        {
            "externalRedis": {
                "mode": "sentinel",
                "hosts": ["s1:26379", "s2:26379", "s3:26379"],
                "sentinelMaster": "sbmaster",
                "database": 2,
                "existingSecret": "redis-pw",
            }
        },
    ),
    "redis-cluster": merge(
        DEFAULTS,
        {"externalRedis": {"mode": "cluster", "hosts": ["r0:6379", "r1:6379", "r2:6379"], "existingSecret": "redis-pw"}},
    ),
    # Traces (ADR 0038): both Deployments get the endpoint and the ratio.
    "tracing": merge(DEFAULTS, {"tracing": {"otlpEndpoint": "http://otel-collector:4317", "sampleRatio": 0.05}}),
    # The event tap (ADR 0032): edge TOML keys and router env the binaries know.
    "event-tap": merge(DEFAULTS, {"cluster": {"eventTap": {"enabled": True, "replicas": 3}}}),
    # Everything optional around the pods: Ingress and Gateway API route with
    # WebSocket timeouts, NetworkPolicies (egress too), a ServiceAccount.
    "exposure": merge(
        DEFAULTS,
        {
            "edge": {
                "ingress": {
                    "enabled": True,
                    "className": "nginx",
                    "tls": [{"hosts": ["chat.example.com"], "secretName": "chat-tls"}],
                },
                "httpRoute": {
                    "enabled": True,
                    "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
                    "hostnames": ["chat.example.com"],
                },
            },
            "networkPolicy": {
                "enabled": True,
                "apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                "egress": {"enabled": True, "extra": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443}]}]},
            },
            "serviceAccount": {"create": True, "annotations": {"example.com/role": "switchboard"}},
        },
    ),
    # An existing ServiceAccount, a TLS edge behind the Ingress, ingress-only policies.
    "exposure-existing-sa": merge(
        DEFAULTS,
        {
            "edge": {"ingress": {"enabled": True}, "tls": {"enabled": True, "secretName": "edge-tls"}},
            "networkPolicy": {"enabled": True},
            "serviceAccount": {"name": "switchboard-runner"},
        },
    ),
}
# The Redis URL each variant must give edges and routers alike ($(REDIS_PASSWORD) is expanded by Kubernetes).
REDIS_URLS = {
    "defaults": "redis://redis-master:6379",
    "redis-sentinel": "redis+sentinel://:$(REDIS_PASSWORD)@s1:26379,s2:26379,s3:26379/sbmaster/2",
    "redis-cluster": "redis+cluster://:$(REDIS_PASSWORD)@r0:6379,r1:6379,r2:6379",
}
# Renders that must fail, with (part of) the message they must give.
MUST_FAIL: dict[str, tuple[dict, str]] = {
    "no JWT key": ({}, "no JWT key configured"),
    "no NATS": (merge(DEFAULTS, {"externalNats": {"urls": []}}), "needs NATS"),
    "no Redis": (merge(DEFAULTS, {"externalRedis": {"url": ""}}), "needs Redis"),
    "alerts without ServiceMonitors": (merge(DEFAULTS, {"alerts": {"enabled": True}}), "alerts.scrapedElsewhere"),
    "sentinel without a master name": (
        merge(DEFAULTS, {"externalRedis": {"mode": "sentinel", "hosts": ["s1:26379"]}}),
        "externalRedis.sentinelMaster: sentinel mode needs the master name",
    ),
    "cluster without hosts": (
        merge(DEFAULTS, {"externalRedis": {"mode": "cluster"}}),
        "externalRedis.hosts: cluster mode needs host:port entries",
    ),
    "unknown Redis mode": (merge(DEFAULTS, {"externalRedis": {"mode": "shards"}}), "expected single, sentinel or cluster"),
    "subchart in cluster mode": (
        merge(DEFAULTS, {"redis": {"enabled": True}, "externalRedis": {"mode": "cluster"}}),
        "the redis subchart (redis.enabled) is one server",
    ),
    "credentials in Redis hosts": (
        merge(DEFAULTS, {"externalRedis": {"mode": "cluster", "hosts": [":pw@r0:6379"]}}),
        "give host:port only",
    ),
    "Redis over TLS": (merge(DEFAULTS, {"externalRedis": {"url": "rediss://r:6380"}}), "not built into Switchboard"),
    "admin key equal to the API key": (
        merge(DEFAULTS, {"auth": {"apiKey": "k", "adminKey": "k"}}),
        "auth.adminKey: must differ from auth.apiKey",
    ),
    "unknown log format": (merge(DEFAULTS, {"logFormat": "xml"}), "logFormat: expected text or json"),
    "OTLP endpoint without a scheme": (
        merge(DEFAULTS, {"tracing": {"otlpEndpoint": "otel-collector:4317"}}),
        "tracing.otlpEndpoint: expected http://host:port",
    ),
    "sample ratio above 1": (
        merge(DEFAULTS, {"tracing": {"otlpEndpoint": "http://c:4317", "sampleRatio": 2}}),
        "tracing.sampleRatio: expected 0.0 to 1.0",
    ),
    "existingSecret and inline keys": (
        merge(DEFAULTS, {"auth": {"existingSecret": "keys", "existingSecretKeys": {"jwtSecret": "s"}}}),
        "not both",
    ),
    "chart-owned edge setting": (
        merge(DEFAULTS, {"edge": {"settings": {"max_connections": 5}}}),
        "edge.settings.max_connections: the chart sets this itself",
    ),
    "dev mode": (merge(DEFAULTS, {"edge": {"settings": {"dev": True}}}), "edge.settings.dev"),
    "TLS without a Secret": (merge(DEFAULTS, {"edge": {"tls": {"enabled": True}}}), "edge.tls.secretName"),
    "HTTPRoute without a Gateway": (
        merge(DEFAULTS, {"edge": {"httpRoute": {"enabled": True}}}),
        "edge.httpRoute.parentRefs",
    ),
    "Ingress that cuts quiet sockets": (
        merge(DEFAULTS, {"edge": {"ingress": {"enabled": True, "webSocketTimeoutSeconds": 30}}}),
        "edge.ingress.webSocketTimeoutSeconds",
    ),
}


def render(values: dict) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__file__"] = path
                out.append(doc)
    return out


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__file__"}


def kn(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- sources of truth outside the chart ---------------------------------------


def rust_settings() -> tuple[set[str], set[str], set[str]]:
    """(edge TOML keys, edge env names, router env names) from the Rust sources:
    each process's Settings plus the ClusterSettings both flatten in."""

    def struct_body(path: str, name: str) -> str:
        src = (ROOT / path).read_text()
        start = src.index(f"pub struct {name} {{")
        return src[start : src.index("\n}\n", start)]

    shared = struct_body("router/node/src/config.rs", "ClusterSettings")
    edge = struct_body("edge/src/config.rs", "Settings") + shared
    router = struct_body("router/server/src/config.rs", "Settings") + shared
    toml_keys = set(re.findall(r"pub (\w+): Option<", edge)) - {"config"}
    edge_env = set(re.findall(r'env = "(SWITCHBOARD_\w+)"', edge))
    router_env = set(re.findall(r'env = "(SWITCHBOARD_\w+)"', router))
    if len(toml_keys) < 20 or len(edge_env) < 20 or len(router_env) < 5:
        sys.exit(
            "check_chart: could not read the settings from edge/src/config.rs, "
            "router/server/src/config.rs and router/node/src/config.rs"
        )
    return toml_keys, edge_env, router_env


def documented_metrics() -> set[str]:
    """Series names from the metrics table of docs/operations.md."""
    names: set[str] = set()
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not cells[1].startswith("`switchboard_"):
            continue
        tokens = re.findall(r"`([a-z0-9_]+)`", cells[1])
        component = re.match(r"(switchboard_[a-z]+)_", tokens[0]).group(1)
        for t in tokens:
            name = t if t.startswith("switchboard_") else component + t
            names.add(name)
            if cells[2] == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
    if len(names) < 20:
        sys.exit("check_chart: could not read the metrics table of docs/operations.md")
    return names | PROCESS_METRICS


def runbook_anchors() -> set[str]:
    """Anchors of docs/operations.md a runbook_url may point at."""
    text = (ROOT / "docs" / "operations.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    return headings | set(re.findall(r'<a id="([^"]+)"', text))


METRIC_WORD = re.compile(r"(?<![\w.])(?:switchboard|process)_[a-z0-9_]+")


# --- steps ---------------------------------------------------------------------


@contextlib.contextmanager
def captured_stderr():
    """Redirects fd 2 (where the Go library logs) into a list of lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(f.read().splitlines())


@step("1. helm lint (chart defaults, defaults + JWT key, ci/production-values.yaml)")
def lint(p: Problems) -> None:
    deps = helm.dependency_list(str(CHART))
    missing = {d["name"] for d in deps if d["status"] == "missing"}
    for d in deps:
        p.check(d["status"] in ("ok", "missing"), "Chart.yaml", f"dependency {d['name']}: {d['status']}")
    # Subcharts are declared but not vendored (no network here; `helm
    # dependency build` fetches them): that one warning is expected.
    expected = f"chart directory is missing these dependencies: {','.join(sorted(missing))}"
    for name, values in (("chart defaults", None), ("defaults + JWT key", DEFAULTS), ("production", PRODUCTION)):
        # Lint mode turns fail() into a log line on the library's stderr.
        with captured_stderr() as log:
            report = helm.lint(str(CHART), values, namespace=NAMESPACE, kube_version="v" + KUBE_VERSIONS[0])
        skipped = re.findall(r'fail message="([^"]*)"', "\n".join(log))
        if skipped:
            print(f"   lint {name}: lint mode skips fail(): {skipped[0][:70]}... (step 2 checks it)")
        for e in report["errors"]:
            p.add(f"lint {name}", e)
        for m in report["messages"]:
            if m["severity"] >= 2 and not (missing and m["error"] == expected):
                p.add(f"lint {name}", f"{m['path']}: {m['error']}")
        shown = [m["error"] for m in report["messages"] if m["severity"] >= 2]
        print(f"   lint {name}: {len(report['errors'])} errors; warnings: {shown or 'none'}")


@step("2. render: variants that must succeed, and must fail")
def renders(p: Problems) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name, values in VARIANTS.items():
        try:
            rendered = render(values)
        except helm.HelmError as e:
            p.add(f"render {name}", f"failed: {e}")
            continue
        try:
            objs = objects(rendered)
        except yaml.YAMLError as e:
            p.add(f"render {name}", f"output is not YAML: {e}")
            continue
        notes = next((t for k, t in rendered.items() if k.endswith("NOTES.txt")), "")
        p.check(bool(notes.strip()), f"render {name}", "NOTES.txt is empty")
        out[name] = objs
        print(f"   {name}: {len(objs)} objects ({', '.join(sorted({o['kind'] for o in objs}))})")
    for name, (values, message) in MUST_FAIL.items():
        try:
            render(values)
            p.add(f"render '{name}'", "rendered, but must fail")
        except helm.HelmError as e:
            ok = p.check(message in str(e), f"render '{name}'", f"failed without saying {message!r}: {e}")
            if ok:
                print(f"   '{name}' fails as it must: {str(e).splitlines()[-1][:110]}")
    return out


def check_service_monitor(p: Problems, where: str, sm: dict, services: list[dict]) -> str | None:
    spec = sm.get("spec", {})
    p.check(sm.get("apiVersion") == "monitoring.coreos.com/v1", where, "apiVersion must be monitoring.coreos.com/v1")
    p.check(spec.get("jobLabel") == "switchboard.io/job", where, "jobLabel must be switchboard.io/job")
    p.check(
        NAMESPACE in spec.get("namespaceSelector", {}).get("matchNames", []),
        where,
        "namespaceSelector misses the release namespace",
    )
    sel = spec.get("selector", {}).get("matchLabels")
    if not p.check(bool(sel), where, "spec.selector.matchLabels is required"):
        return None
    matched = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
    if not p.check(len(matched) == 1, where, f"selector {sel} matches {len(matched)} Services, expected 1"):
        return None
    svc = matched[0]
    job = svc["metadata"]["labels"].get("switchboard.io/job")
    p.check(job in (EDGE_JOB, ROUTER_JOB), where, f"selected Service {kn(svc)} has switchboard.io/job={job!r}")
    endpoints = spec.get("endpoints") or []
    p.check(bool(endpoints), where, "spec.endpoints is empty")
    port_names = {pt.get("name") for pt in svc["spec"]["ports"]}
    for ep in endpoints:
        p.check(ep.get("port") in port_names, where, f"endpoint port {ep.get('port')!r} is not a port of {kn(svc)}")
        p.check(ep.get("path", "/metrics") == "/metrics", where, "metrics are served at /metrics")
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                p.check(
                    re.fullmatch(r"\d+(ms|s|m)", str(ep[key])) is not None,
                    where,
                    f"{key} {ep[key]!r} is not a duration",
                )
    return job


def check_http_route(p: Problems, where: str, route: dict, services: list[dict]) -> None:
    """Gateway API v1 HTTPRoute (no schema in kubernetes-validate): the fields
    the chart sets, and a backend that is a rendered Service port."""
    p.check(route.get("apiVersion") == "gateway.networking.k8s.io/v1", where, "apiVersion must be gateway.networking.k8s.io/v1")
    spec = route.get("spec", {})
    p.check(set(spec) <= {"parentRefs", "hostnames", "rules"}, where, f"unknown spec fields {sorted(set(spec))}")
    p.check(
        bool(spec.get("parentRefs")) and all(isinstance(r, dict) and r.get("name") for r in spec["parentRefs"]),
        where,
        "parentRefs need a name each",
    )
    for rule in spec.get("rules") or []:
        p.check(set(rule) <= {"matches", "timeouts", "backendRefs", "filters"}, where, f"unknown rule fields {sorted(rule)}")
        for m in rule.get("matches", []):
            path = m.get("path", {})
            p.check(path.get("type") in ("PathPrefix", "Exact", "RegularExpression"), where, f"path type {path.get('type')!r}")
            p.check(str(path.get("value", "")).startswith("/"), where, f"path {path.get('value')!r} must start with /")
        for key, value in (rule.get("timeouts") or {}).items():
            p.check(key in ("request", "backendRequest"), where, f"unknown timeout {key}")
            p.check(re.fullmatch(r"(\d+(h|m|s|ms))+", str(value)) is not None, where, f"timeout {value!r} is not a Gateway API duration")
        for ref in rule.get("backendRefs") or []:
            svc = next((s for s in services if s["metadata"]["name"] == ref.get("name")), None)
            if p.check(svc is not None, where, f"backendRef {ref.get('name')} is not a rendered Service"):
                p.check(
                    ref.get("port") in [pt["port"] for pt in svc["spec"]["ports"]],
                    where,
                    f"backendRef port {ref.get('port')} is not a port of {kn(svc)}",
                )


ANCHORS: set[str] = set()


def check_prometheus_rule(p: Problems, where: str, rule: dict, metrics: set[str]) -> set[str]:
    p.check(rule.get("apiVersion") == "monitoring.coreos.com/v1", where, "apiVersion must be monitoring.coreos.com/v1")
    groups = rule.get("spec", {}).get("groups") or []
    p.check(bool(groups), where, "spec.groups is empty")
    names: set[str] = set()
    for g in groups:
        p.check(bool(g.get("name")) and bool(g.get("rules")), where, f"group {g.get('name')!r} needs a name and rules")
        for r in g.get("rules", []):
            alert = r.get("alert")
            at = f"{where} {alert}"
            if not p.check(bool(alert) and bool(r.get("expr")), where, f"rule without alert/expr: {r}"):
                continue
            p.check(alert not in names, at, "duplicate alert name")
            names.add(alert)
            # A severity may depend on the series: '{{ if $labels.pod }}A{{ else }}B{{ end }}'.
            severity = str(r.get("labels", {}).get("severity"))
            choices = re.fullmatch(r"\{\{ if \$labels\.pod \}\}(\w+)\{\{ else \}\}(\w+)\{\{ end \}\}", severity)
            p.check(
                all(v in ("critical", "warning", "info") for v in (choices.groups() if choices else [severity])),
                at,
                "severity must be critical, warning or info",
            )
            ann = r.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                p.check(bool(ann.get(key)), at, f"annotation {key} missing")
            p.check(
                str(ann.get("runbook_url", "")).endswith(f"/docs/operations.md#{alert.lower()}"),
                at,
                "runbook_url must point at docs/operations.md#<alert>",
            )
            p.check(alert.lower() in ANCHORS, at, f"docs/operations.md has no section #{alert.lower()} for runbook_url")
            expr = str(r["expr"])
            for job in re.findall(r'job=~?"([^"]+)"', expr):
                p.check(set(job.split("|")) <= {EDGE_JOB, ROUTER_JOB}, at, f"job {job!r} is not a scraped job")
            for m in set(METRIC_WORD.findall(expr)) - metrics:
                p.add(at, f"metric {m} is not in docs/operations.md's metrics table")
            p.check(f'namespace="{NAMESPACE}"' in expr, at, "expr is not scoped to the release namespace")
    p.check(REQUIRED_ALERTS <= names, where, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}")
    return names


@step(f"3. validate manifests (kubernetes-validate strict, Kubernetes {', '.join(KUBE_VERSIONS)}; CRD structure)")
def validate(p: Problems, rendered: dict[str, list[dict]], metrics: set[str]) -> None:
    for variant, objs in rendered.items():
        services = [o for o in objs if o["kind"] == "Service"]
        jobs = set()
        for obj in objs:
            where = f"{variant} {kn(obj)} ({obj['__file__']})"
            if obj["kind"] == "ServiceMonitor":
                jobs.add(check_service_monitor(p, where, obj, services))
            elif obj["kind"] == "PrometheusRule":
                check_prometheus_rule(p, where, obj, metrics)
            elif obj["kind"] == "HTTPRoute":
                check_http_route(p, where, obj, services)
            else:
                for v in KUBE_VERSIONS:
                    try:
                        kubernetes_validate.validate(clean(obj), v, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        path = ".".join(str(x) for x in e.path)
                        p.add(where, f"Kubernetes {v}: {path}: {e.message}")
                    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
                        p.add(where, f"no schema: {e.message}")
        if any(o["kind"] == "ServiceMonitor" for o in objs):
            p.check(
                jobs == {EDGE_JOB, ROUTER_JOB},
                variant,
                f"ServiceMonitors give jobs {jobs}, expected both {EDGE_JOB} and {ROUTER_JOB}",
            )
        core = sum(o["kind"] not in CRD_KINDS for o in objs)
        print(
            f"   {variant}: {core} objects valid against {len(KUBE_VERSIONS)} versions, {len(objs) - core} CRD objects checked"
        )


def parse_bytes(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    scale = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    return float(m.group(1)) * scale[m.group(2)]


def pod_matches(selector: dict, deploy: dict) -> bool:
    labels = deploy["spec"]["template"]["metadata"].get("labels", {})
    return bool(selector) and selector.items() <= labels.items()


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_deployment(
    p: Problems, where: str, d: dict, known_env: set[str], by_kind: dict, externals: set[str], toml_keys: set[str]
) -> None:
    spec = d["spec"]
    pod = spec["template"]["spec"]
    p.check(
        spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(),
        where,
        "selector does not match its own pod labels",
    )
    ann = spec["template"]["metadata"].get("annotations", {})
    p.check(
        any(k.startswith("checksum/") for k in ann), where, "pods carry no checksum annotation of their config/secret"
    )
    p.check(pod.get("securityContext", {}).get("runAsNonRoot") is True, where, "pod runAsNonRoot")
    p.check(
        pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault",
        where,
        "seccomp RuntimeDefault",
    )
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        at = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        p.check(sc.get("readOnlyRootFilesystem") is True, at, "readOnlyRootFilesystem")
        p.check(sc.get("allowPrivilegeEscalation") is False, at, "allowPrivilegeEscalation false")
        p.check("ALL" in sc.get("capabilities", {}).get("drop", []), at, "capabilities drop ALL")
        ports = {pt.get("name"): pt["containerPort"] for pt in c.get("ports", [])}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet")
            if not p.check(get is not None, at, f"{probe} must be an httpGet"):
                continue
            p.check(get.get("path") == path, at, f"{probe} path {get.get('path')!r}, expected {path}")
            port = get.get("port")
            p.check(
                port in ports or port in ports.values(), at, f"{probe} port {port!r} is not a container port {ports}"
            )
        lifecycle = c.get("lifecycle", {}).get("preStop", {})
        p.check("exec" not in lifecycle, at, "preStop exec needs a shell; the image is distroless")
        env = env_map(c)
        defined: list[str] = []
        for e in c.get("env", []):
            if e["name"].startswith("SWITCHBOARD_"):
                p.check(
                    e["name"] in known_env, at, f"env {e['name']} is not a setting of this binary (ignored silently)"
                )
            for ref in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
                p.check(ref in defined, at, f"env {e['name']} expands $({ref}), which is not defined before it")
            defined.append(e["name"])
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                check_secret_ref(p, at, ref["name"], ref["key"], by_kind, externals)
        p.check(
            env.get("SWITCHBOARD_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            == "metadata.name",
            at,
            "SWITCHBOARD_NODE_ID must come from the pod name",
        )
        listen = env.get("SWITCHBOARD_LISTEN") or env.get("SWITCHBOARD_ROUTER_LISTEN")
        if p.check(listen is not None, at, "no listen address set"):
            host, _, port = str(listen.get("value")).rpartition(":")
            p.check(host == "0.0.0.0", at, f"listens on {host}, not reachable in a pod")
            p.check(port.isdigit() and int(port) in ports.values(), at, f"listen port {port} is not a container port")
        for m in c.get("volumeMounts", []):
            p.check(m["name"] in volumes, at, f"mount {m['name']} has no volume")
        args = c.get("args", [])
        if "--config" in args:
            path = Path(args[args.index("--config") + 1])
            mount = next((m for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == path.parent), None)
            if p.check(mount is not None, at, f"--config {path} is not on a mounted volume"):
                cm_name = volumes[mount["name"]].get("configMap", {}).get("name")
                cm = by_kind.get(("ConfigMap", cm_name))
                if p.check(
                    cm is not None and path.name in cm.get("data", {}),
                    at,
                    f"ConfigMap {cm_name} has no key {path.name}",
                ):
                    check_edge_toml(p, f"{at}: {kn(cm)} {path.name}", cm["data"][path.name], toml_keys)
    for name, v in volumes.items():
        if "secret" in v:
            for item in v["secret"].get("items", []) or [{"key": None}]:
                check_secret_ref(
                    p, f"{where} volume {name}", v["secret"]["secretName"], item["key"], by_kind, externals
                )
        if "configMap" in v:
            p.check(
                ("ConfigMap", v["configMap"]["name"]) in by_kind,
                f"{where} volume {name}",
                f"ConfigMap {v['configMap']['name']} is not rendered",
            )


def check_secret_ref(p: Problems, where: str, name: str, key: str | None, by_kind: dict, externals: set[str]) -> None:
    secret = by_kind.get(("Secret", name))
    if secret is None:
        p.check(name in externals, where, f"Secret {name} is neither rendered nor named in the values")
    elif key is not None:
        p.check(key in secret.get("data", {}), where, f"Secret {name} has no key {key}")


def check_edge_toml(p: Problems, where: str, text: str, toml_keys: set[str]) -> None:
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        p.add(where, f"not TOML: {e}")
        return
    for key, value in settings.items():
        p.check(key in toml_keys, where, f"{key} is not an edge setting (the edge would refuse to start)")
        p.check(not isinstance(value, float), where, f"{key} = {value} is a float; edge settings are integers")


def externals_of(values: dict) -> set[str]:
    """Secrets a render may reference without creating them."""
    merged = merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
    names = {
        merged["auth"]["existingSecret"],
        merged["externalRedis"]["existingSecret"],
        merged["externalNats"]["existingSecret"],
        merged["edge"]["tls"]["secretName"],
    }
    if merged["redis"]["enabled"]:
        names.add(f"{RELEASE}-redis")
    return {n for n in names if n}


@step("4. cross-checks (selectors, ports, drain timing, PDB, HPA, references, settings, dashboard)")
def cross_checks(p: Problems, rendered: dict[str, list[dict]], metrics: set[str]) -> None:
    toml_keys, edge_env, router_env = rust_settings()
    for variant, objs in rendered.items():
        by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objs}
        deploys = [o for o in objs if o["kind"] == "Deployment"]
        externals = externals_of(VARIANTS[variant])
        edge = next((d for d in deploys if d["metadata"]["labels"].get("app.kubernetes.io/component") == "edge"), None)
        router = next(
            (d for d in deploys if d["metadata"]["labels"].get("app.kubernetes.io/component") == "router"), None
        )
        if not (
            p.check(edge is not None, variant, "no edge Deployment")
            and p.check(router is not None, variant, "no router Deployment")
        ):
            continue
        check_deployment(p, f"{variant} {kn(edge)}", edge, edge_env, by_kind, externals, toml_keys)
        check_deployment(p, f"{variant} {kn(router)}", router, router_env, by_kind, externals, toml_keys)

        # Services select exactly one Deployment's pods, on a port it has.
        for svc in (o for o in objs if o["kind"] == "Service"):
            where = f"{variant} {kn(svc)}"
            matched = [d for d in deploys if pod_matches(svc["spec"].get("selector", {}), d)]
            if not p.check(len(matched) == 1, where, f"selector matches {len(matched)} Deployments, expected 1"):
                continue
            c = matched[0]["spec"]["template"]["spec"]["containers"][0]
            ports = {pt.get("name"): pt["containerPort"] for pt in c.get("ports", [])}
            for pt in svc["spec"]["ports"]:
                tp = pt.get("targetPort", pt["port"])
                p.check(
                    tp in ports or tp in ports.values(), where, f"targetPort {tp!r} is not a port of {kn(matched[0])}"
                )
            p.check(
                svc["spec"].get("sessionAffinity", "None") == "None",
                where,
                "no session affinity: any edge serves any client",
            )
            job = svc["metadata"].get("labels", {}).get("switchboard.io/job")
            expected = EDGE_JOB if matched[0] is edge else ROUTER_JOB
            p.check(job == expected, where, f"label switchboard.io/job={job!r}, expected {expected!r}")

        # Drain: SIGTERM only after the preStop sleep, then the edge's whole grace.
        pod = edge["spec"]["template"]["spec"]
        c = pod["containers"][0]
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        grace_ms = env_map(c).get("SWITCHBOARD_SHUTDOWN_GRACE_MS", {}).get("value")
        where = f"{variant} {kn(edge)}"
        if p.check(isinstance(sleep, int) and sleep > 0, where, "edge needs a preStop sleep") and p.check(
            str(grace_ms).isdigit(), where, "SWITCHBOARD_SHUTDOWN_GRACE_MS must be set"
        ):
            total = pod.get("terminationGracePeriodSeconds", 30)
            p.check(
                total > sleep + int(grace_ms) / 1000,
                where,
                f"terminationGracePeriodSeconds {total} <= preStop {sleep} s + grace {int(grace_ms) / 1000} s",
            )
        ru = edge["spec"].get("strategy", {}).get("rollingUpdate", {})
        p.check(
            edge["spec"].get("strategy", {}).get("type") == "RollingUpdate"
            and str(ru.get("maxUnavailable")) in ("0", "0%"),
            where,
            "rollouts must not remove a pod before its replacement is ready (maxUnavailable 0)",
        )
        surge = str(ru.get("maxSurge", "25%"))
        p.check(
            (surge.isdigit() and 0 < int(surge) <= 2) or (surge.endswith("%") and 0 < int(surge[:-1]) <= 25),
            where,
            f"maxSurge {surge} drains too many pods at once",
        )
        cap = env_map(c).get("SWITCHBOARD_MAX_CONNECTIONS", {}).get("value")
        mem = c.get("resources", {})
        if p.check(str(cap).isdigit(), where, "SWITCHBOARD_MAX_CONNECTIONS must be set explicitly"):
            need = int(cap) * BYTES_PER_SOCKET
            for kind in ("limits", "requests"):
                q = mem.get(kind, {}).get("memory")
                if p.check(q is not None, where, f"memory {kind} missing"):
                    p.check(
                        parse_bytes(q) >= need,
                        where,
                        f"memory {kind} {q} < {cap} sockets x {BYTES_PER_SOCKET} B = {need / 2**30:.2f} GiB",
                    )
        p.check(
            env_map(c).get("SWITCHBOARD_PRESENCE_TTL_MS")
            == env_map(router["spec"]["template"]["spec"]["containers"][0]).get("SWITCHBOARD_PRESENCE_TTL_MS"),
            variant,
            "edges and routers need the same SWITCHBOARD_PRESENCE_TTL_MS",
        )

        # PDBs select one Deployment and allow a drain to proceed.
        for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
            sel = pdb["spec"].get("selector", {}).get("matchLabels", {})
            matched = [d for d in deploys if pod_matches(sel, d)]
            p.check(
                len(matched) == 1, f"{variant} {kn(pdb)}", f"selector matches {len(matched)} Deployments, expected 1"
            )
            p.check(
                "minAvailable" not in pdb["spec"] or "maxUnavailable" not in pdb["spec"],
                f"{variant} {kn(pdb)}",
                "set one of minAvailable/maxUnavailable",
            )
        # HPA scales the edge, slowly down.
        for hpa in (o for o in objs if o["kind"] == "HorizontalPodAutoscaler"):
            where = f"{variant} {kn(hpa)}"
            ref = hpa["spec"]["scaleTargetRef"]
            p.check(
                (ref.get("apiVersion"), ref.get("kind"), ref.get("name"))
                == ("apps/v1", "Deployment", edge["metadata"]["name"]),
                where,
                f"scaleTargetRef {ref} is not the edge Deployment",
            )
            p.check("replicas" not in edge["spec"], where, "the edge Deployment sets replicas while the HPA owns them")
            down = hpa["spec"].get("behavior", {}).get("scaleDown", {})
            p.check(
                down.get("stabilizationWindowSeconds", 300) >= 300, where, "scale-down stabilization under 5 minutes"
            )
            p.check(
                bool(down.get("policies"))
                and all(pol["type"] == "Pods" and pol["value"] <= 1 for pol in down["policies"]),
                where,
                "scale-down must remove at most one pod per period",
            )
            for m in hpa["spec"].get("metrics", []):
                if m["type"] == "Pods":
                    p.check(
                        m["pods"]["metric"]["name"] in metrics,
                        where,
                        f"Pods metric {m['pods']['metric']['name']} is not exported",
                    )
        if not any(o["kind"] == "HorizontalPodAutoscaler" for o in objs):
            p.check("replicas" in edge["spec"], f"{variant} {kn(edge)}", "no HPA and no replicas")

        # Dashboard ConfigMap: the chart's JSON, valid, with panels.
        for cm in (
            o for o in objs if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})
        ):
            where = f"{variant} {kn(cm)}"
            p.check(cm["metadata"]["labels"]["grafana_dashboard"] == "1", where, 'label grafana_dashboard must be "1"')
            for key, text in cm.get("data", {}).items():
                try:
                    dash = json.loads(text)
                except json.JSONDecodeError as e:
                    p.add(where, f"{key} is not JSON: {e}")
                    continue
                p.check(isinstance(dash.get("panels"), list) and dash["panels"], where, f"{key} has no panels list")
                p.check(
                    dash == json.loads(DASHBOARD.read_text()),
                    where,
                    f"{key} differs from {DASHBOARD.relative_to(ROOT)}",
                )

        # Edges and routers get the same Redis URL, built for the mode.
        if variant in REDIS_URLS and edge and router:
            urls = [
                env_map(d["spec"]["template"]["spec"]["containers"][0]).get("SWITCHBOARD_REDIS_URL", {}).get("value")
                for d in (edge, router)
            ]
            p.check(
                urls == [REDIS_URLS[variant]] * 2,
                variant,
                f"Redis URLs {urls}, want {REDIS_URLS[variant]} on both",
            )

        # Ingress: routes to the edge Service's port, with WebSocket timeouts.
        for ing in (o for o in objs if o["kind"] == "Ingress"):
            where = f"{variant} {kn(ing)}"
            edge_svc = next((o for o in objs if o["kind"] == "Service" and pod_matches(o["spec"]["selector"], edge)), None)
            for rule in ing["spec"].get("rules", []):
                for path in rule["http"]["paths"]:
                    b = path["backend"]["service"]
                    p.check(
                        edge_svc is not None
                        and b["name"] == edge_svc["metadata"]["name"]
                        and b["port"].get("number") in [pt["port"] for pt in edge_svc["spec"]["ports"]],
                        where,
                        f"backend {b} is not the edge Service's port",
                    )
                    p.check(not path["path"].startswith("/api"), where, "the backend API must not be routed publicly")
            ann = ing["metadata"].get("annotations", {})
            for key in ("proxy-read-timeout", "proxy-send-timeout"):
                value = ann.get(f"nginx.ingress.kubernetes.io/{key}")
                p.check(str(value).isdigit() and int(value) >= 60, where, f"{key} {value!r}: sockets need >= 60 s")
        # NetworkPolicies select one Deployment each and name its ports.
        for np in (o for o in objs if o["kind"] == "NetworkPolicy"):
            where = f"{variant} {kn(np)}"
            matched = [d for d in deploys if pod_matches(np["spec"]["podSelector"].get("matchLabels", {}), d)]
            if not p.check(len(matched) == 1, where, f"podSelector matches {len(matched)} Deployments, expected 1"):
                continue
            names = {pt.get("name") for pt in matched[0]["spec"]["template"]["spec"]["containers"][0].get("ports", [])}
            for rule in np["spec"].get("ingress", []):
                for pt in rule.get("ports", []):
                    p.check(pt["port"] in names, where, f"ingress port {pt['port']!r} is not a container port {names}")
            p.check(
                any(pt["port"] == "http" for r in np["spec"].get("ingress", []) for pt in r.get("ports", [])),
                where,
                "probes and /metrics need the http port open",
            )
            if "Egress" in np["spec"].get("policyTypes", []):
                ports = {pt.get("port") for r in np["spec"].get("egress", []) for pt in r.get("ports", [])}
                p.check({53, 4222, 6379} <= ports, where, f"egress misses DNS, NATS or Redis: {ports}")
        # Both Deployments run as the ServiceAccount named, without its token.
        sa_name = merge(yaml.safe_load((CHART / "values.yaml").read_text()), VARIANTS[variant])["serviceAccount"]
        for d in (edge, router):
            pod = d["spec"]["template"]["spec"]
            where = f"{variant} {kn(d)}"
            p.check(pod.get("automountServiceAccountToken") is False, where, "no API token in the pods")
            name = pod.get("serviceAccountName")
            if sa_name["create"] or sa_name["name"]:
                p.check(name is not None, where, "serviceAccountName not set")
            if sa_name["create"]:
                p.check(("ServiceAccount", name) in by_kind, where, f"ServiceAccount {name} is not rendered")
            elif sa_name["name"]:
                p.check(name == sa_name["name"], where, f"serviceAccountName {name!r}, want {sa_name['name']!r}")

        # Traces: every pod exports to the one endpoint at the one ratio;
        # none without an endpoint.
        for d in (edge, router):
            env = env_map(d["spec"]["template"]["spec"]["containers"][0])
            got = (env.get("SWITCHBOARD_OTLP_ENDPOINT", {}).get("value"), env.get("SWITCHBOARD_TRACE_SAMPLE_RATIO", {}).get("value"))
            want = ("http://otel-collector:4317", "0.05") if variant == "tracing" else (None, None)
            p.check(got == want, f"{variant} {kn(d)}", f"trace settings {got}, want {want}")

        # The subchart wiring uses the upstream charts' Service names.
        if variant == "subcharts":
            env = env_map(c)
            p.check(
                env["SWITCHBOARD_NATS_URL"].get("value") == f"nats://{RELEASE}-nats:4222",
                variant,
                f"NATS URL {env['SWITCHBOARD_NATS_URL']}",
            )
            p.check(
                f"@{RELEASE}-redis-master:6379" in env["SWITCHBOARD_REDIS_URL"].get("value", ""),
                variant,
                f"Redis URL {env['SWITCHBOARD_REDIS_URL']}",
            )


@step("4b. dashboard file (files/dashboards/switchboard.json)")
def dashboard_file(p: Problems, metrics: set[str]) -> None:
    if not p.check(DASHBOARD.is_file(), str(DASHBOARD.relative_to(ROOT)), "missing"):
        return
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        p.add(str(DASHBOARD.relative_to(ROOT)), f"not JSON: {e}")
        return
    p.check(isinstance(dash.get("panels"), list) and bool(dash["panels"]), "dashboard", "no panels list")
    exprs: list[str] = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    walk(dash)
    text = " ".join(exprs)
    for m in sorted(set(METRIC_WORD.findall(text)) - metrics):
        p.add("dashboard", f"metric {m} is not in docs/operations.md's metrics table")
    for job in re.findall(r'job=~?\\?"([^"\\]+)', text):
        p.check(set(job.split("|")) <= {EDGE_JOB, ROUTER_JOB}, "dashboard", f"selects job {job!r}, not a scraped job")
    print(f"   {len(dash.get('panels', []))} panels, {len(exprs)} queries")


@step("5. promtool check rules / test rules (helm/tests/alerts_test.yaml)")
def promtool(p: Problems, rendered: dict[str, list[dict]]) -> None:
    exe = shutil.which("promtool")
    if not p.check(exe is not None, "promtool", "not on PATH (Debian: apt-get install prometheus)"):
        return
    rules = [o for o in rendered.get("monitoring", []) if o["kind"] == "PrometheusRule"]
    if not p.check(len(rules) == 1, "monitoring render", f"{len(rules)} PrometheusRules, expected 1"):
        return
    alerts = {r["alert"] for g in rules[0]["spec"]["groups"] for r in g["rules"]}
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    for a in sorted(alerts):
        p.check(a in fires, "alerts_test.yaml", f"{a} has no case where it fires")
        p.check(a in quiet, "alerts_test.yaml", f"{a} has no case where it must stay quiet")
    for a in sorted((fires | quiet) - alerts):
        p.add("alerts_test.yaml", f"tests {a}, which the chart does not define")
    with tempfile.TemporaryDirectory() as tmp:
        rules_file = Path(tmp) / "rendered-rules.yaml"
        rules_file.write_text(yaml.safe_dump(rules[0]["spec"], sort_keys=False))
        tests["rule_files"] = [str(rules_file)]
        test_file = Path(tmp) / "alerts_test.yaml"
        test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
        for args in (["check", "rules", str(rules_file)], ["test", "rules", str(test_file)]):
            run = subprocess.run([exe, *args], capture_output=True, text=True)
            out = (run.stdout + run.stderr).strip()
            if p.check(run.returncode == 0, f"promtool {' '.join(args[:2])}", "\n" + out):
                print(f"   promtool {' '.join(args[:2])}: {out.splitlines()[-1].strip()}")
    print(f"   {len(alerts)} alerts, each with a firing and a quiet case")


@step("6. yamllint (values files, Chart.yaml, alerts_test.yaml)")
def lint_yaml(p: Problems) -> None:
    conf = YamlLintConfig("extends: relaxed\nrules:\n  line-length: {max: 120}\n")
    # Alert descriptions are long one-liners; line length is not checked there.
    tests_conf = YamlLintConfig("extends: relaxed\nrules:\n  line-length: disable\n")
    files = [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml")), CHART / "Chart.yaml", ALERT_TESTS]
    for f in files:
        for problem in yamllint_linter.run(f.read_text(), tests_conf if f == ALERT_TESTS else conf, str(f)):
            p.add(str(f.relative_to(ROOT)), f"{problem.line}:{problem.column} {problem.level}: {problem.message}")
    print(f"   {len(files)} files")


def write_rules(out: Path) -> int:
    """Renders the alerts (namespace NAMESPACE) as a Prometheus rules file, for
    a live Prometheus in edge/system/tests/operate.rs."""
    rules = [o for o in objects(render(MONITORING)) if o["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        print(f"check_chart: {len(rules)} PrometheusRules rendered, expected 1", file=sys.stderr)
        return 1
    out.write_text(yaml.safe_dump(rules[0]["spec"], sort_keys=False))
    return 0


# A render whose edge and router configuration operate.rs starts the real
# binaries with: edge.settings of several TOML types, an API key, an admin
# key, JSON logs.
POD_CONFIG = merge(
    DEFAULTS,
    {
        "auth": {"apiKey": "check-chart-api-key", "adminKey": "check-chart-admin-key"},
        "logFormat": "json",
        "edge": {
            "settings": {
                "allowed_origins": ["https://app.example.com", "https://*.example.com"],
                "jwt_audience": "switchboard",
                "rate_publish_per_sec": 30,
                "heartbeat_interval_ms": 20000,
            }
        },
    },
)


def write_pod_config(out: Path) -> int:
    """Writes each Deployment's container args, resolved env and ConfigMap
    files as out/<component>.json, for operate.rs to start the binaries with."""
    import base64

    objs = objects(render(POD_CONFIG))
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
        for o in objs
        if o["kind"] == "Secret"
    }
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for d in (o for o in objs if o["kind"] == "Deployment"):
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                # Kubernetes expands $(VAR) from variables defined earlier.
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = f"{component}-0"  # metadata.name: the pod
            else:
                print(f"check_chart: cannot resolve env {e['name']}", file=sys.stderr)
                return 1
        files = {}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            cm = volumes[m["name"]].get("configMap")
            if cm:
                for key, text in configmaps[cm["name"]].items():
                    files[f"{m['mountPath']}/{key}"] = text
        spec = {"args": container.get("args", []), "env": env, "files": files}
        (out / f"{component}.json").write_text(json.dumps(spec, indent=1))
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--rules-out":
        return write_rules(Path(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--pod-config":
        return write_pod_config(Path(sys.argv[2]))
    started = time.monotonic()
    metrics = documented_metrics()
    ANCHORS.update(runbook_anchors())
    lint()
    rendered = renders() or {}
    validate(rendered, metrics)
    cross_checks(rendered, metrics)
    dashboard_file(metrics)
    promtool(rendered)
    lint_yaml()
    took = time.monotonic() - started
    if FAILED_STEPS:
        print(f"check_chart: FAILED in {took:.1f} s: {'; '.join(FAILED_STEPS)}", file=sys.stderr)
        return 1
    print(f"check_chart: all checks passed in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
