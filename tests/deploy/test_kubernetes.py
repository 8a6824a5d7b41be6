"""deploy/k8s validated offline: kubernetes-validate --strict on the core resources (its warnings count as
failures), KServe's custom resources checked for the fields their CRDs require, and the wiring between
the files (labels, ports, probe paths the server really answers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
CORE = sorted(K8S.glob("*.yaml"))
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.mark.skipif(not VALIDATOR.exists(), reason="kubernetes-validate not installed (in the dev extra)")
@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_manifests_pass_kubernetes_validate_strict(path):
    done = subprocess.run([str(VALIDATOR), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARN" not in output.upper().replace("WARNINGS: 0", ""), output


def test_deployment_probes_resources_and_wiring():
    deployment, service = load("deployment.yaml"), load("service.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Kubernetes kills at the end of the grace period: it must cover the preStop pause and the server's
    # own shutdown grace, or in-flight requests die with the pod.
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + float(env["BERTSERVE_SHUTDOWN_GRACE_S"])
    for name in ("hpa.yaml", "hpa-queue-depth.yaml"):
        target = load(name)["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert load("hpa-queue-depth.yaml")["spec"]["metrics"][0]["pods"]["metric"]["name"] == "bertserve_queue_depth"
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_probe_paths_are_routes_of_the_server():
    from service.app import create_app

    paths = set(create_app().openapi()["paths"])
    assert {"/v2/health/ready", "/v2/health/live", "/metrics"} <= paths


def test_kserve_resources_have_what_their_crds_require():
    runtime = load("kserve/servingruntime.yaml")
    isvc = load("kserve/inferenceservice.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    spec = runtime["spec"]
    assert spec["containers"] and spec["containers"][0]["image"]  # required by the CRD
    assert spec["supportedModelFormats"] and all("name" in f for f in spec["supportedModelFormats"])
    assert "v2" in spec["protocolVersions"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and model["storageUri"]
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env["BERTSERVE_MODEL_STORE"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert env["BERTSERVE_HOST"] == "0.0.0.0"


def test_the_grpc_port_is_declared_where_the_server_listens():
    container = load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(env["BERTSERVE_GRPC_PORT"]) != ports["http"] == int(env["BERTSERVE_PORT"])
    service = {p["name"]: p for p in load("service.yaml")["spec"]["ports"]}
    assert service["grpc"]["targetPort"] == "grpc" and service["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    # KServe: the runtime listens on both; an InferenceService over gRPC routes its one port, named h2c.
    runtime = load("kserve/servingruntime.yaml")["spec"]
    runtime_env = {e["name"]: e["value"] for e in runtime["containers"][0]["env"]}
    assert "grpc-v2" in runtime["protocolVersions"]
    isvc = load("kserve/inferenceservice-grpc.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == load("kserve/servingruntime.yaml")["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2" and model["storageUri"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    grpc_port = int(runtime_env["BERTSERVE_GRPC_PORT"])
    assert [(p["name"], p["containerPort"]) for p in model["ports"]] == [("h2c", grpc_port)]
