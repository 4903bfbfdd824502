"""Deployment files, checked offline (schemas, linters, promtool) and a real Prometheus scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, bone_phantom, png_bytes
from tests.live import ServiceProcess, free_port, wait_for

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


def served_metric_names() -> set[str]:
    """Every sample name the service exposes (histograms with their suffixes)."""
    from prometheus_client import generate_latest

    from app.core.metrics import Metrics

    m = Metrics()
    m.requests.labels("/v1/predict", "200").inc()
    m.request_duration.labels("/v1/predict").observe(0.1)
    m.batch_size.labels("crop").observe(1)
    m.model_info.labels("cropper", "x", "1", "abc", "CPUExecutionProvider").set(1)
    m.refused.labels("out_of_scope").inc()
    m.flagged.labels("classifier-x", "out_of_distribution").inc()
    m.probability.labels("classifier-x").observe(0.5)
    m.ood_score.labels("classifier-x").observe(1.0)
    m.feedback.labels("classifier-x", "agree").inc()
    text = generate_latest(m.registry).decode()
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


# --- Kubernetes -----------------------------------------------------------------------------------


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_overlays_render_and_pass_the_kubernetes_schemas(overlay, tmp_path):
    docs = render(overlay)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(rendered)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"]: d for d in docs}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
    } <= set(kinds)

    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and container["securityContext"]["readOnlyRootFilesystem"]
    )
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # uploads spool there
    probes = {
        k: container[k]["httpGet"]["path"]
        for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    startup = container["startupProbe"]
    assert (
        startup["periodSeconds"] * startup["failureThreshold"] >= 300
    )  # model loading and warm-up
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) if overlay == "gpu" else gpus is None
    assert container["image"].endswith(f"-{overlay}")

    # The HPA scales on a metric the service really exports, through the adapter rule in the repo.
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in served_metric_names()
    adapter = yaml.safe_load((REPO / "k8s" / "prometheus-adapter" / "rules.yaml").read_text())
    assert any(r["name"]["as"] == metric for r in adapter["rules"]["custom"])

    # Selectors and ports line up.
    service = kinds["Service"]
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert set(service["spec"]["selector"].items()) <= set(labels.items())
    monitor = kinds["ServiceMonitor"]["spec"]
    assert set(monitor["selector"]["matchLabels"].items()) <= set(
        service["metadata"]["labels"].items()
    )
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    policy_port = kinds["NetworkPolicy"]["spec"]["ingress"][0]["ports"][0]["port"]
    assert policy_port == container["ports"][0]["containerPort"]


# --- compose, Dockerfile, Prometheus, Grafana -----------------------------------------------------


def test_compose_file_follows_the_compose_specification():
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(REPO / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    gpu = services["fracture"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "profiles" not in services["fracture"]  # `docker compose up` starts it
    assert services["fracture-cpu"]["profiles"] == ["cpu"]
    assert services["orthanc"]["profiles"] == ["pacs"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_dockerfile_passes_hadolint_and_keeps_its_promises():
    result = subprocess.run(
        [tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile.gpu")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile.gpu").read_text()
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/healthz" in text
    installs = " ".join(
        line for line in text.splitlines() if line.startswith("RUN") and "pip install" in line
    )
    assert installs and not re.search(
        r"torch|ultralytics|\[train|\[test", installs
    )  # the service only
    assert re.search(r"cudnn-runtime", text) and "--require-hashes" in installs
    assert "ARG LOCK=requirements/serve-gpu.txt" in text
    assert "onnxruntime-gpu==" in (REPO / "requirements" / "serve-gpu.txt").read_text()


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool = tool("promtool")
    for args in (
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/alerts.yml"],
    ):
        result = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_query_metrics_the_service_exports():
    names = served_metric_names() | {"up"}
    dashboard = json.loads(
        (REPO / "deploy" / "grafana" / "dashboards" / "fracture-service.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(fracture_[a-z_]+)", e)}
    assert used and used <= names, used - names
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needle in (
        "request rate",
        "errors",
        "p95",
        "stage",
        "in flight",
        "batch",
        "outside validated conditions",
        "drift",
    ):
        assert needle in titles


# --- a real Prometheus scraping the real service ----------------------------------------------------


@pytest.mark.slow
def test_real_prometheus_scrapes_requests_and_latency(tmp_path):
    prometheus = tool("prometheus")
    app_port, prom_port = free_port(), free_port()
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    job = config["scrape_configs"][0]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{app_port}"]
    shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    service = ServiceProcess(app_port)
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        app = service.http
        api = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
        image = png_bytes(bone_phantom(200, 160))
        for _ in range(3):
            assert (
                app.post(
                    "/v1/predict", content=image, headers={"content-type": "image/png"}
                ).status_code
                == 200
            )

        def query(q: str) -> list:
            body = api.get("/api/v1/query", params={"query": q}).json()
            return body["data"]["result"]

        wait_for(
            lambda: query('up{job="fracture-service"} == 1'), 60, "Prometheus to scrape the service"
        )
        series = wait_for(
            lambda: [
                r
                for r in query('fracture_requests_total{endpoint="/v1/predict",status="200"}')
                if float(r["value"][1]) >= 3
            ],
            60,
            "the request counter",
        )
        assert series[0]["metric"]["job"] == "fracture-service"
        count = wait_for(
            lambda: query('fracture_request_duration_seconds_count{endpoint="/v1/predict"} >= 3'),
            30,
            "the latency histogram",
        )
        assert count
        buckets = query('fracture_request_duration_seconds_bucket{endpoint="/v1/predict"}')
        assert len(buckets) >= 10  # every bucket of the histogram arrived
        assert query('fracture_stage_duration_seconds_count{stage="detect"} >= 3')
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        service.stop()
