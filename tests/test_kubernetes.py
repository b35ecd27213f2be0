"""deploy/kubernetes/: every manifest (and the ConfigMap kustomize makes from edgellm.toml)
passes the Kubernetes API's schemas offline, in strict mode (kubernetes-validate), and the
manifests keep docs/deployment.md's promises: edgellm, started with the pod's arguments,
environment and config file, listens where the probes and Services look and answers them as
they expect; the grace period outlasts preStop and the drain; the pod runs unprivileged with
its data directory on its volume; the HPA's metric is one edgellm exports."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgellm.server.drain import CUT_OFF_GRACE_S
from edgellm.settings import EngineSettings, ServerSettings
from tests.inprocess import scripted_server
from tests.test_settings_flags import parse

KUBE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
AUTOSCALING = KUBE / "autoscaling"
ADAPTER_VALUES = AUTOSCALING / "prometheus-adapter-values.yaml"  # Helm values, not a manifest
# the oldest release with preStop's sleep action, and the newest the package knows
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SECRET_VALUE = "sk-from-the-secret"  # stands for the Secret's api-key


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (less the name's hash suffix)."""
    kustomization = load(KUBE / "kustomization.yaml")
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "namespace": kustomization["namespace"]},
            "data": {Path(f).name: (KUBE / f).read_text() for f in generator["files"]},
        }
        for generator in kustomization["configMapGenerator"]
    ]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(where, resource) of every Kubernetes resource in deploy/kubernetes/."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path == ADAPTER_VALUES:
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            found.append((f"{path.relative_to(KUBE)}#{i}", doc))
    found += [(f"configMapGenerator {m['metadata']['name']}", m) for m in generated_config_maps()]
    return found


def the(kind: str) -> dict[str, Any]:
    """The one resource of `kind` (a fresh copy: tests may change it)."""
    (only,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return only


def services() -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == "Service"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("where", "resource"), manifests(), ids=[w for w, _ in manifests()])
def test_every_manifest_passes_the_api_schema_strictly(
    where: str, resource: dict[str, Any], version: str
) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """What the strict mode is for: a misspelt key is an error, not a silently dropped probe."""
    statefulset = the("StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("folder", [KUBE, AUTOSCALING], ids=["base", "autoscaling"])
def test_each_kustomization_applies_every_manifest_beside_it(folder: Path) -> None:
    kustomization = load(folder / "kustomization.yaml")
    beside = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml", ADAPTER_VALUES.name}
    assert set(kustomization["resources"]) == beside
    assert kustomization["namespace"] == load(KUBE / "namespace.yaml")["metadata"]["name"]


def test_the_image_kustomize_sets_is_the_containers() -> None:
    (image,) = load(KUBE / "kustomization.yaml")["images"]
    containers = the("StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [image["name"]]


# -- the pod as edgellm sees it ------------------------------------------------------------


@dataclass
class Pod:
    """The StatefulSet's pod, and the settings `edgellm serve` resolves in it."""

    spec: dict[str, Any]  # the pod template's spec
    container: dict[str, Any]  # edgellm's container
    env: dict[str, str]  # its environment, as the kubelet would set it
    server: ServerSettings
    engine: EngineSettings


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables: values as given, the Secret's as SECRET_VALUE, a resource
    field as the kubelet computes it (rounded up to whole divisors)."""
    env = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in source:
            env[var["name"]] = SECRET_VALUE
        else:
            field = source["resourceFieldRef"]
            kind, resource = field["resource"].split(".")
            amount = cpu_cores(container["resources"][kind][resource])
            env[var["name"]] = str(math.ceil(amount / cpu_cores(field.get("divisor", "1"))))
    return env


def config_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> Path:
    """The file of deploy/kubernetes/ that the pod sees at `path`: a key of a generated
    ConfigMap, mounted as a volume."""
    (mount,) = [m for m in container["volumeMounts"] if Path(path).parent == Path(m["mountPath"])]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [
        m for m in generated_config_maps() if m["metadata"]["name"] == volume["configMap"]["name"]
    ]
    assert Path(path).name in config_map["data"], f"the ConfigMap has no key {Path(path).name}"
    return KUBE / Path(path).name


@pytest.fixture
def pod(monkeypatch: pytest.MonkeyPatch) -> Pod:
    spec = the("StatefulSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = container_env(container)
    for name in list(os.environ):
        if name.startswith("EDGELLM_") and name != "EDGELLM_HOME":
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name not in ("EDGELLM_HOME", "HOME"):  # the tests' own data directory stays
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("EDGELLM_CONFIG", str(config_file(spec, container, env["EDGELLM_CONFIG"])))
    assert container["command"] == ["edgellm"] and container["args"][0] == "serve"
    server, engine, *_ = parse(container["args"][1:])
    return Pod(spec, container, env, server, engine)


def http_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    (named,) = [p for p in container["ports"] if p["name"] == port]
    return int(named["containerPort"])


def test_edgellm_listens_where_the_probes_look(pod: Pod) -> None:
    assert pod.server.host == "0.0.0.0"  # every pod address, not loopback
    assert [http_port(pod.container, p["name"]) for p in pod.container["ports"]] == [
        pod.server.port
    ]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert http_port(pod.container, pod.container[probe]["httpGet"]["port"]) == pod.server.port
    assert pod.container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert pod.container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod.container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod.server.api_key == SECRET_VALUE  # a public bind with a key: serve starts
    assert pod.server.metrics_compat == "vllm" and pod.server.metrics_public
    # llama.cpp's threads are the cores the pod asked for, not the node's
    requested = pod.container["resources"]["requests"]["cpu"]
    assert pod.engine.threads == math.ceil(cpu_cores(requested))


@pytest.mark.anyio
async def test_the_probe_paths_answer_as_the_probes_expect(pod: Pod) -> None:
    """edgellm as the pod configures it, in-process: the probes' paths need no key, /ready
    turns 503 from the drain's first instant while /health stays 200 (no restart mid-drain),
    and /metrics is open to scrapers while the API needs the key."""
    ready = pod.container["readinessProbe"]["httpGet"]["path"]
    alive = pod.container["livenessProbe"]["httpGet"]["path"]
    async with scripted_server(pod.server) as srv:
        assert (await srv.client.get(ready)).status_code == 200
        assert (await srv.client.get(alive)).status_code == 200
        assert (await srv.client.get("/metrics")).status_code == 200
        assert (await srv.client.get("/v1/models")).status_code == 401
        key = {"Authorization": f"Bearer {SECRET_VALUE}"}
        assert (await srv.client.get("/v1/models", headers=key)).status_code == 200
        srv.app.state.drain.begin()
        assert (await srv.client.get(ready)).status_code == 503
        assert (await srv.client.get(alive)).status_code == 200


def test_the_grace_period_outlasts_prestop_and_the_drain(pod: Pod) -> None:
    pre_stop = pod.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0  # the load balancers stop sending before SIGTERM's drain begins
    worst = pre_stop + pod.server.drain_timeout + CUT_OFF_GRACE_S + pod.server.shutdown_timeout
    assert pod.spec["terminationGracePeriodSeconds"] > worst


def test_the_pod_runs_unprivileged_with_its_data_on_its_volume(pod: Pod) -> None:
    security = pod.spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod.container["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert pod.spec["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in pod.container["volumeMounts"]}
    (claim,) = the("StatefulSet")["spec"]["volumeClaimTemplates"]
    assert mounts[pod.env["EDGELLM_HOME"]] == claim["metadata"]["name"]
    volumes = {v["name"]: v for v in pod.spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the one other place written
    assert "memory" in pod.container["resources"]["limits"]


def service_link_variables(service: dict[str, Any]) -> set[str]:
    """The variables the kubelet puts in every pod of the namespace for a Service with a
    cluster IP, unless the pod sets enableServiceLinks: false."""
    if service["spec"].get("clusterIP") == "None":
        return set()
    name = service["metadata"]["name"].upper().replace("-", "_")
    found = {f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"}
    for port in service["spec"]["ports"]:
        tcp = f"{name}_PORT_{port['port']}_TCP"
        found |= {tcp, f"{tcp}_PROTO", f"{tcp}_PORT", f"{tcp}_ADDR"}
        if "name" in port:
            found.add(f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
    return found


def test_service_links_cannot_reach_edgellms_settings(
    pod: Pod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Service `edgellm` would give its pods EDGELLM_PORT=tcp://IP:8000, which edgellm
    reads as --port and refuses: the pod must turn service links off."""
    fields = {f"EDGELLM_{f.upper()}" for f in ServerSettings.model_fields} | {
        f"EDGELLM_{f.upper()}" for f in EngineSettings.model_fields
    }
    colliding = {v for s in services() for v in service_link_variables(s)} & fields
    if colliding:
        assert pod.spec["enableServiceLinks"] is False
    assert colliding == {"EDGELLM_PORT"}  # (the reason, checked: it does break serve)
    monkeypatch.setenv("EDGELLM_PORT", "tcp://10.96.0.12:8000")
    with pytest.raises(ValueError, match="port"):
        ServerSettings.load()


def test_the_services_reach_the_pods_http_port(pod: Pod) -> None:
    statefulset = the("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for service in services():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert http_port(pod.container, port["targetPort"]) == pod.server.port
    (headless,) = [s for s in services() if s["spec"].get("clusterIP") == "None"]
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    budget = the("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.anyio
async def test_the_hpa_scales_on_a_gauge_edgellm_exports(pod: Pod) -> None:
    """The HPA's metric is what the adapter's rule names, and a gauge on edgellm's /metrics
    (with the pod's settings, so the vLLM names are there too)."""
    async with scripted_server(pod.server) as srv:
        assert (await srv.chat(headers={"Authorization": f"Bearer {SECRET_VALUE}"})).is_success
        text = (await srv.client.get("/metrics")).text
    gauges = {f.name for f in text_string_to_metric_families(text) if f.type == "gauge"}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= gauges
    hpa = the("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "StatefulSet",
        the("StatefulSet")["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in gauges
    (rule,) = load(ADAPTER_VALUES)["rules"]["custom"]
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series is not None and series.group(1) == name
    assert re.fullmatch(rule["name"]["matches"], name) and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a Pods metric
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
