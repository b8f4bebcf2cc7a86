"""The deployment files agree with the daemon: ports, paths and grace periods in the Kubernetes
manifests, the Dockerfile and the systemd unit are checked against the daemon's own settings
and constants (read from ``cdc_daemon``, never written down twice), and every metric the
Grafana dashboard queries exists in the registry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cdc_daemon.config import DaemonSettings, Settings, load_settings
from cdc_daemon.ops.health import CHECK_TIMEOUT_S, HEALTHZ_PATH, METRICS_PATH, READYZ_PATH
from cdc_daemon.ops.metrics import Metrics, metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes" / "base"
SYSTEMD = DEPLOY / "systemd"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def configmap_settings(tmp_path: Path) -> Settings:
    path = tmp_path / "cdc.toml"
    path.write_text(one("ConfigMap")["data"]["cdc.toml"])
    return load_settings(path)


def container(name: str = "cdc-daemon") -> dict[str, Any]:
    spec = one("Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == name)


def test_every_manifest_parses_with_kind_and_name() -> None:
    """Each YAML document is a Kubernetes object with apiVersion, kind and a name; the
    kustomization lists files that exist."""
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Service",
        "ServiceMonitor",
        "Kustomization",
    }
    for doc in docs:
        assert doc["apiVersion"]
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]
        else:
            assert all((K8S / r).is_file() for r in doc["resources"])


def test_deployment_runs_one_pod_that_waits_for_the_lock(tmp_path: Path) -> None:
    """One replica, Recreate (never two pods at once during a rollout), and the configuration
    makes a second pod wait for the lock instead of crash-looping on exit code 5."""
    spec = one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert configmap_settings(tmp_path).daemon.wait_for_lock is True


def test_ports_paths_and_grace_periods_agree_with_the_daemon(tmp_path: Path) -> None:
    """The container port, both probes, the scrape annotations, the Service, the
    ServiceMonitor and the Dockerfile's EXPOSE all use the port of the ConfigMap's
    ``http.address``; probe paths are the daemon's routes; the pod's grace period is above
    the daemon's; the readiness timeout leaves room for the daemon's own check timeout."""
    settings = configmap_settings(tmp_path)
    port = settings.http.port
    pod = one("Deployment")["spec"]["template"]
    main = container()
    named = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert named == {"http": port}

    def probe_port(probe: dict[str, Any]) -> int:
        target = probe["httpGet"]["port"]
        return named[target] if isinstance(target, str) else int(target)

    assert main["livenessProbe"]["httpGet"]["path"] == HEALTHZ_PATH
    assert main["readinessProbe"]["httpGet"]["path"] == READYZ_PATH
    assert probe_port(main["livenessProbe"]) == probe_port(main["readinessProbe"]) == port
    assert main["readinessProbe"]["timeoutSeconds"] > CHECK_TIMEOUT_S
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port
    assert notes["prometheus.io/path"] == METRICS_PATH
    service = one("Service")["spec"]["ports"][0]
    assert service["port"] == port
    assert service["targetPort"] in ("http", port)
    assert one("ServiceMonitor")["spec"]["endpoints"][0]["path"] == METRICS_PATH
    exposed = re.findall(
        r"^EXPOSE\s+(\d+)", (DEPLOY / "kubernetes" / "Dockerfile").read_text(), re.M
    )
    assert exposed == [str(port)]

    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.daemon.shutdown_grace_s + 10
    # The liveness probe must not kill a loop before the daemon itself calls it stalled.
    live = main["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] < settings.daemon.stall_timeout_s


def test_pod_is_non_root_read_only_with_writable_spool(tmp_path: Path) -> None:
    """Non-root (the Dockerfile's USER is the pod's runAsUser), read-only root filesystem,
    no privilege escalation, and the spool directory and /tmp are emptyDir volumes; the
    configuration file is mounted where the arguments point; credentials come from a Secret
    (and the example Secret has that name), never from the ConfigMap."""
    settings = configmap_settings(tmp_path)
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = re.findall(r"^USER\s+(\d+)", (DEPLOY / "kubernetes" / "Dockerfile").read_text(), re.M)
    assert user == [str(pod["securityContext"]["runAsUser"])]
    assert int(user[0]) != 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = one("Secret")["metadata"]["name"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert "emptyDir" in mounts[str(settings.batch.spool_dir)]
        assert "emptyDir" in mounts["/tmp"]
        config = Path(c["args"][c["args"].index("--config") + 1])
        assert "configMap" in mounts[str(config.parent)]
        assert [e["secretRef"]["name"] for e in c["envFrom"]] == [secret]
    assert "dsn" not in one("ConfigMap")["data"]["cdc.toml"].lower()


def unit_file(name: str = "cdc-daemon.service") -> dict[str, dict[str, list[str]]]:
    """The unit's keys per section (a key may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_systemd_unit_agrees_with_the_daemon() -> None:
    """Type=notify with a watchdog, restart on failure, secrets from an environment file,
    TimeoutStopSec above the daemon's default grace period, the spool in the StateDirectory,
    and the usual hardening; the example configuration loads."""
    service = unit_file()["Service"]
    defaults = DaemonSettings()
    assert service["Type"] == ["notify"]
    assert seconds(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["/etc/cdc-daemon/cdc-daemon.env"]
    assert seconds(service["TimeoutStopSec"][0]) > defaults.shutdown_grace_s + 10
    assert f"CDC_BATCH__SPOOL_DIR=/var/lib/{service['StateDirectory'][0]}" in service["Environment"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "DynamicUser"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert "AF_UNIX" in service["RestrictAddressFamilies"][0]  # the notify socket
    example = load_settings(SYSTEMD / "cdc.toml.example")
    assert example.http.port == configmap_port()
    assert example.daemon.shutdown_grace_s < seconds(service["TimeoutStopSec"][0])


def configmap_port() -> int:
    text = one("ConfigMap")["data"]["cdc.toml"]
    match = re.search(r'address = "[^"]*:(\d+)"', text)
    assert match
    return int(match[1])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit (with the install path pointed at this
    environment's executable, which verify requires to exist)."""
    unit = tmp_path / "cdc-daemon.service"
    exe = Path(sys.executable).parent / "cdc-daemon"
    assert exe.exists()
    unit.write_text(
        (SYSTEMD / "cdc-daemon.service")
        .read_text()
        .replace("/opt/cdc-daemon/venv/bin/cdc-daemon", str(exe))
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "cdc-daemon.service" not in done.stderr, done.stderr  # no warning about the unit


def dashboard_queries() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "cdc-daemon.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    return exprs


def test_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    """Every metric name in the dashboard's queries (a name before ``{``, ``[`` or in
    label_values) is a sample the registry exposes; the dashboard covers lag, throughput,
    batch states, reconciler outcomes and retries."""
    exported = metric_names(Metrics(CollectorRegistry(), "public.t").registry)
    used: set[str] = set()
    for expr in dashboard_queries():
        used |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
        used |= set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    assert used - exported == set()
    assert {
        "cdc_lag_seconds",
        "cdc_rows_exported_total",
        "cdc_batches",
        "cdc_reconciler_outcomes_total",
        "cdc_retries_total",
        "cdc_batch_duration_seconds_bucket",
    } <= used


def test_dashboard_is_grafana_json() -> None:
    """Panels have unique ids, a type, a Prometheus datasource and a grid position."""
    dash = json.loads((DEPLOY / "grafana" / "cdc-daemon.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] != "row":
            assert p["datasource"]["type"] == "prometheus"
            assert p["targets"]


OVERLAYS = DEPLOY / "kubernetes" / "overlays"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")
def test_each_group_overlay_renders_its_own_deployment(tmp_path: Path) -> None:
    """``kubectl kustomize`` renders every overlay of deploy/kubernetes/overlays from the one
    base: one Deployment per group, its own names and selector label, its own configuration
    (a loading cdc.toml with its own group, so its own lock, slot and publication), and
    every reference inside it renamed with it; no two groups share a name or a slot."""
    seen: dict[str, str] = {}
    for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir()):
        group = overlay.name
        done = subprocess.run(
            ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout)}
        deployment = docs["Deployment"]
        assert deployment["metadata"]["name"] == f"cdc-daemon-{group}"
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert labels["cdc-daemon/group"] == group
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == f"cdc-daemon-{group}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == f"cdc-daemon-{group}"
        config = tmp_path / f"{group}.toml"
        config.write_text(docs["ConfigMap"]["data"]["cdc.toml"])
        settings = load_settings(config)
        assert settings.group == group
        assert settings.slot_name not in seen, (group, seen)
        seen[settings.slot_name] = group
    assert len(seen) >= 2


def test_systemd_template_is_the_unit_per_group() -> None:
    """cdc-daemon@.service is cdc-daemon.service with the configuration, secrets and state
    directory named after the instance (%i: the group), nothing else changed."""
    plain = unit_file()
    template = unit_file("cdc-daemon@.service")
    per_instance = {"ExecStartPre", "ExecStart", "EnvironmentFile", "StateDirectory", "Environment"}
    for section, keys in plain.items():
        for key, values in keys.items():
            if section == "Service" and key in per_instance:
                assert all("%i" in v for v in template[section][key]), key
            elif key != "Description":
                assert template[section][key] == values, (section, key)
    assert template["Service"]["ExecStart"] == [
        "/opt/cdc-daemon/venv/bin/cdc-daemon --config /etc/cdc-daemon/%i.toml run"
    ]
