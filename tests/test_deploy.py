"""The Helm chart, checked offline: lint, render with the Helm SDK, validate every manifest against the Kubernetes
1.30 schemas, each toggle, the values schema, the restricted security context; and the Dockerfiles statically."""

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser, configs

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "certkv"
DOCKER = CHART.parent.parent / "docker"
KUBE = "1.30.0"
CRDS = {"ServiceMonitor", "ScaledObject"}  # no bundled schema: checked by hand below


def validate(values: dict) -> None:
    """The values an install would use (chart defaults coalesced with `values`) against values.schema.json."""
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(chart.merge_values(values))


def render(values: dict | None = None) -> list[dict]:
    validate(values or {})
    out = helm.Chart.load(str(CHART)).render(values or {}, name="rel", namespace="serving", is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_lint_is_clean():
    result = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE}")
    assert result["errors"] == [] and result["messages"] == []


@pytest.mark.parametrize("values", [
    {},
    {"autoscaling": {"enabled": True}},
    {"keda": {"enabled": True}},
    {"serviceMonitor": {"enabled": True}},
    {"networkPolicy": {"enabled": False}},
    {"auth": {"existingSecret": "certkv-key"}, "tls": {"existingSecret": "certkv-tls"}},
    {"model": {"path": "/models/m", "existingClaim": ""}, "service": {"headless": False}},
])
def test_every_manifest_is_valid_kubernetes(values):
    for doc in render(values):
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] and doc["metadata"]["name"] and doc["spec"]
        else:
            kubernetes_validate.validate(doc, KUBE, strict=True)


def test_toggles_render_what_they_should():
    base = kinds(render())
    assert base == ["ConfigMap", "Deployment", "NetworkPolicy", "Pod", "PodDisruptionBudget", "Service", "Service",
                    "ServiceAccount"]
    assert "HorizontalPodAutoscaler" in kinds(render({"autoscaling": {"enabled": True}}))
    keda = render({"keda": {"enabled": True}, "autoscaling": {"enabled": True}})
    assert "ScaledObject" in kinds(keda) and "HorizontalPodAutoscaler" not in kinds(keda)  # KEDA owns its HPA
    assert "replicas" not in by_kind(keda, "Deployment")["spec"]
    assert "ServiceMonitor" in kinds(render({"serviceMonitor": {"enabled": True}}))
    assert "NetworkPolicy" not in kinds(render({"networkPolicy": {"enabled": False}}))
    headless = [d for d in render() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and headless[0]["spec"]["ports"][0]["name"] == "grpc"


def test_pod_is_restricted_and_drains_before_it_is_killed():
    deployment = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50052  # the plaintext health port
    values = yaml.safe_load((CHART / "values.yaml").read_text())["server"]
    assert pod["terminationGracePeriodSeconds"] > values["drainDelaySeconds"] + values["drainGraceSeconds"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/cache"} <= writable
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HOME"].startswith("/cache") and env["HF_HUB_OFFLINE"] == "1"


def test_configmap_args_are_the_servers_flags(tmp_path):
    docs = render({"server": {"kvMode": "audit", "tolerance": 0.2, "extraArgs": ["--max-model-len", "4096"]}})
    args_file = tmp_path / "server.args"
    args_file.write_text(by_kind(docs, "ConfigMap")["data"]["server.args"])
    server, engine, telemetry = configs(build_parser().parse_args([f"@{args_file}"]))
    assert (server.host, server.port, engine.kv_mode, engine.tolerance, engine.max_model_len) == (
        "0.0.0.0", 50051, "audit", 0.2, 4096)
    assert telemetry.metrics_port == 9400 and server.health_port == 50052


def test_secrets_are_mounted_files_only():
    docs = render({"auth": {"existingSecret": "certkv-key"}, "tls": {"existingSecret": "certkv-tls"}})
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"certkv-key", "certkv-tls"}
    assert not any("valueFrom" in e for e in pod["containers"][0]["env"])
    assert "--api-key-file" in by_kind(docs, "ConfigMap")["data"]["server.args"]


@pytest.mark.parametrize("bad", [
    {"replicaCount": "two"},
    {"server": {"kvMode": "bogus"}},
    {"server": {"tolerance": -1}},
    {"server": {"kBits": 3}},
    {"securityContext": {"allowPrivilegeEscalation": True, "readOnlyRootFilesystem": True}},
    {"typo": 1},
])
def test_schema_refuses_bad_values(bad):
    with pytest.raises(helm.HelmValuesError):
        validate(bad)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name):
    lines = [line.strip() for line in (DOCKER / name).read_text().splitlines()]
    instructions = [line.split()[0] for line in lines if line and not line.startswith("#") and line[0].isupper()]
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] != "0" and "root" not in user[-1]
    assert instructions.index("USER") > max(i for i, ins in enumerate(instructions) if ins == "RUN")
    assert any("server.client" in line and "--health" in line for line in lines)  # gRPC health check
    assert "ARG" in instructions and any("BAKE_MODEL" in line for line in lines)
    assert any("torch==2.13.0" in line for line in lines)
