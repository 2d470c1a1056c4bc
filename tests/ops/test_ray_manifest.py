"""deploy/ray: the RayJob that runs `zooserve batch --ray auto`, checked with no cluster. RayJob is
KubeRay's custom resource and no package here ships its schema, so the test checks the fields it
names: the API and kind, the entrypoint (through zooserve's own parser), the Ray version against the
one installed, and the volumes: every node mounts the registry and the batch claim at the same paths
(serve/batch_ray.py needs them shared). `kubectl kustomize` renders it where kubectl is present.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
RAY = ROOT / "deploy" / "ray"


def rayjob() -> dict:
    (doc,) = [d for d in yaml.safe_load_all((RAY / "rayjob.yaml").read_text()) if d]
    return doc


def pod_templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}


def test_it_is_a_rayjob_whose_entrypoint_is_a_sharded_zooserve_batch():
    from serve.cli import build_parser

    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "zooserve"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.ray, args.no_progress) == ("batch", "auto", True)
    assert args.shards >= 1 and args.input.startswith("/batch/") and args.output.startswith("/batch/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_ray_version_is_the_installed_one():
    from importlib.metadata import version

    ray = pytest.importorskip("ray")
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == version("ray") == ray.__version__


def test_every_node_mounts_the_registry_and_the_batch_volume_at_the_same_paths():
    job = rayjob()
    templates = pod_templates(job)
    assert set(templates) == {"head", "shards"}
    for name, spec in templates.items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"registry": "zooserve-registry", "batch": "zooserve-batch"}, name
        (c,) = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert mounts["registry"] == env["ZOOSERVE_REGISTRY"] == "/registry", name
        assert mounts["batch"] == "/batch", name
        assert spec["securityContext"]["runAsNonRoot"] is True and c["resources"]["limits"], name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
def test_kustomize_renders_it_with_the_tagged_image(tmp_path):
    import subprocess

    done = subprocess.run(["kubectl", "kustomize", str(RAY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (job,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert job["metadata"]["namespace"] == "zooserve"
    images = {spec["containers"][0]["image"] for spec in pod_templates(job).values()}
    (image,) = images
    assert image.startswith("registry.example.com/zooserve:") and not image.endswith(":latest")


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])      # tests/ops/test_k8s_manifests.py's K8S_VERSIONS
def test_the_pod_templates_validate_strictly_as_pods(version, tmp_path):
    """KubeRay's pod templates are core/v1 PodSpecs: validated as Pods against the Kubernetes schemas."""
    import subprocess
    import sys

    validate = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(validate).exists():
        pytest.skip("no `kubernetes-validate` (pip install kubernetes-validate)")
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"rayjob-{name}"}, "spec": spec}
            for name, spec in pod_templates(rayjob()).items()]
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all(pods))
    done = subprocess.run([validate, "--strict", "-k", version, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
