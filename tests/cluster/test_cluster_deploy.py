"""deploy/: the KubeRay RayCluster + Service manifest validates against Kubernetes' schemas (the
RayCluster's pod templates as Pods: its CRD schema is not in kubernetes-validate), its embedded xpuflow
config validates, and the Dockerfile installs the ray extra."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from xpuflow.config import parse_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "raycluster.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def _validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_service_and_config_map_validate() -> None:
    docs = _docs()
    assert set(docs) == {"ConfigMap", "RayCluster", "Service"}
    _validate(docs["Service"])
    _validate(docs["ConfigMap"])
    config = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["xpuflow.yaml"]))
    assert config.cluster is not None
    assert config.cluster.address == "auto"


def test_ray_cluster_pod_templates_validate_and_the_service_selects_the_head() -> None:
    docs = _docs()
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        template = group["template"]
        _validate(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": template.get("metadata", {"name": "x"}) | {"name": "x"},
                "spec": template["spec"],
            }
        )
    for worker in spec["workerGroupSpecs"]:
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    head_labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = docs["Service"]["spec"]["selector"]
    assert selector.items() <= head_labels.items()
    ports = [p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] in ports


def test_dockerfile_installs_the_ray_extra_at_the_pinned_version() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    import ray

    assert f"rayproject/ray:{ray.__version__}-py311" in text
    assert '".[ray]"' in text
    # the image installs what the README's set-up installs: the lock, with setup.sh's pip
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pip = re.search(r'pip_version="([^"]+)"', setup)
    assert pip is not None
    assert f'"pip=={pip.group(1)}"' in text
    assert "--constraint requirements/lock.txt --build-constraint requirements/build-lock.txt" in text
    assert re.search(
        rf"^ray==\S*{re.escape(ray.__version__)}$", (ROOT / "requirements" / "lock.txt").read_text(), re.M
    )
    # every COPY source exists in the checkout (docker build would fail on the first missing one)
    for line in text.splitlines():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            assert sources, line
            for source in sources:
                assert (ROOT / source).exists(), f"{line}: {source} is not in the checkout"
