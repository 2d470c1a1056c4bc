"""deploy/k8s (kustomize base, cpu and gpu overlays, the Indexed batch Job) and deploy/kserve, checked
with no cluster: `kubectl kustomize` renders each, `kubernetes-validate --strict` validates every
built-in object against the Kubernetes schemas of K8S_VERSIONS (and the pod parts of the custom
resources, wrapped in a Pod), the custom resources are checked for the fields named below, and the
content is checked against the code it runs: probe paths and port, grace period against the drain
timeout, the HPA's metric against serve/metrics.py, every ZOOSERVE_* variable against
serve/settings.py, the commands against zooserve's own argument parser, and the Indexed Job's shard
arithmetic, run by sh for several indexes, against serve/batch.py's line ranges.

kubectl comes with this machine (Google Cloud SDK's `kubectl`, with kustomize built in); a
standalone `kustomize` works too. kubernetes-validate: `pip install kubernetes-validate`. Each check
that needs one is skipped, with the reason, where it is missing.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
RENDERED = {**OVERLAYS, "batch": K8S / "batch", "kserve": KSERVE}
LOADER = K8S / "registry-loader.yaml"          # a plain manifest, not a kustomization
K8S_VERSIONS = ("1.29.0", "1.33.0")          # the oldest release we claim, and a recent one
CUSTOM_KINDS = {"ServiceMonitor", "ClusterServingRuntime", "InferenceService"}
SERVER = "zooserve"                            # the server Deployment and its container


def tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


KUBECTL, KUSTOMIZE, VALIDATE = tool("kubectl"), tool("kustomize"), tool("kubernetes-validate")
needs_kustomize = pytest.mark.skipif(KUBECTL is None and KUSTOMIZE is None,
                                     reason="no `kubectl` nor `kustomize` on PATH (Google Cloud SDK's kubectl, "
                                            "or a kustomize binary)")
needs_validate = pytest.mark.skipif(VALIDATE is None, reason="no `kubernetes-validate` (pip install "
                                                             "kubernetes-validate)")


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    cmd = [KUBECTL, "kustomize", str(folder)] if KUBECTL else [KUSTOMIZE, "build", str(folder)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


_cache: dict[str, list[dict]] = {}


def render(name: str) -> list[dict]:
    if name == "loader":
        return [yaml.safe_load(LOADER.read_text())]
    if name not in _cache:
        done = kustomize(RENDERED[name])
        assert done.returncode == 0, f"kustomize {RENDERED[name]} failed:\n{done.stderr}"
        _cache[name] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return _cache[name]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name} in {[(o['kind'], o['metadata']['name']) for o in objects]}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objects:
        if o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        elif o["kind"] in {"Deployment", "Job"}:
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "ClusterServingRuntime":
            out.append((f"{o['kind']}/{o['metadata']['name']}", {"containers": o["spec"]["containers"]}))
    return out


def container(objects: list[dict], kind: str, name: str, container_name: str) -> dict:
    (found,) = [c for c in one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
                if c["name"] == container_name]
    return found


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def validate(tmp_path: Path, objects: list[dict], version: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"objects-{version}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run([VALIDATE, "--strict", "-k", version, str(path)], capture_output=True, text=True,
                          timeout=120)


pytestmark = needs_kustomize


# ---- rendering and schemas -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_kustomization_renders_what_it_should(name):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render(name))
    expected = {
        "cpu": [("ConfigMap", "zooserve-rollout"), ("Deployment", "zooserve"),
                ("Deployment", "zooserve-rollout-controller"), ("HorizontalPodAutoscaler", "zooserve"),
                ("PersistentVolumeClaim", "zooserve-registry"), ("PodDisruptionBudget", "zooserve"),
                ("Service", "zooserve"), ("ServiceMonitor", "zooserve")],
        "batch": [("Job", "zooserve-batch"), ("PersistentVolumeClaim", "zooserve-batch")],
        "kserve": [("ClusterServingRuntime", "zooserve"), ("InferenceService", "zooserve")],
    }
    assert kinds == expected.get(name, expected["cpu"])
    if name != "kserve":
        assert {o["metadata"].get("namespace") for o in render(name)} == {"zooserve"}


@needs_validate
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", [*sorted(RENDERED), "loader"])
def test_every_object_validates_strictly_against_the_kubernetes_schemas(name, version, tmp_path):
    objects = render(name)
    builtin = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    # the pod parts of the custom resources, as Pods: their containers are core/v1 Containers
    wrapped = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": label.replace("/", "-").lower()},
                "spec": spec} for label, spec in pod_specs(objects) if label.split("/")[0] in CUSTOM_KINDS]
    if builtin or wrapped:
        done = validate(tmp_path, builtin + wrapped, version)
        assert done.returncode == 0, done.stdout + done.stderr
        short = version.rsplit(".", 1)[0]
        assert done.stdout.count(f"against version {short}") + done.stderr.count(f"against version {short}") \
            == len(builtin + wrapped), done.stdout + done.stderr


@needs_validate
def test_strict_validation_catches_a_misspelt_field(tmp_path):
    """The schema check is not vacuous: a typo in a probe, or an unknown field, fails it."""
    objects = [copy.deepcopy(o) for o in render("cpu") if o["kind"] == "Deployment"]
    spec = objects[0]["spec"]["template"]["spec"]["containers"][0]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    done = validate(tmp_path, objects, K8S_VERSIONS[0])
    assert done.returncode != 0 and "readinesProbe" in done.stdout + done.stderr, done.stdout + done.stderr


# ---- images ----------------------------------------------------------------------------------

IMAGE_WITH_TAG = re.compile(r"^[^@\s]+/[^/:@\s]+:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


@pytest.mark.parametrize("name", [*sorted(RENDERED), "loader"])
def test_every_image_names_a_repository_and_a_tag_not_latest(name):
    for label, spec in pod_specs(render(name)):
        for c in spec["containers"]:
            match = IMAGE_WITH_TAG.match(c["image"])
            assert match and match["tag"] != "latest", f"{label}: image {c['image']!r} has no tag"


def test_an_overlay_without_an_image_tag_does_not_render(tmp_path):
    overlay = tmp_path / "no-tag"
    overlay.mkdir()
    text = (OVERLAYS["cpu"] / "kustomization.yaml").read_text()
    text = text.replace("../../base", os.path.relpath(K8S / "base", overlay))
    assert re.search(r'^\s+newTag: "0\.1\.0"\n', text, re.MULTILINE)
    (overlay / "kustomization.yaml").write_text(re.sub(r'^\s+newTag: "0\.1\.0"\n', "", text, flags=re.MULTILINE))
    done = kustomize(overlay)
    assert done.returncode != 0, done.stdout[:2000]
    assert "options.index 1 is out of bounds for value registry.example.com/zooserve" in done.stderr, done.stderr
    # and with the tag back it renders, with the tag as the version label
    (overlay / "kustomization.yaml").write_text(text)
    done = kustomize(overlay)
    assert done.returncode == 0, done.stderr
    deployment = one(list(yaml.safe_load_all(done.stdout)), "Deployment", SERVER)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"


# ---- the server Deployment -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_probes_are_on_the_v2_health_routes_of_the_served_port(name):
    objects = render(name)
    c = container(objects, "Deployment", SERVER, SERVER)
    (port,) = c["ports"]
    assert port["containerPort"] == int(env(c)["ZOOSERVE_PORT"]) and env(c)["ZOOSERVE_HOST"] == "0.0.0.0"
    paths = {probe: (c[probe]["httpGet"]["path"], c[probe]["httpGet"]["port"])
             for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert paths == {"livenessProbe": ("/v2/health/live", port["name"]),
                     "readinessProbe": ("/v2/health/ready", port["name"]),
                     "startupProbe": ("/v2/health/ready", port["name"])}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "the first load gets 5 minutes"
    service = one(objects, "Service", SERVER)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_the_grace_period_covers_the_prestop_sleep_and_the_drain_timeout(name):
    from serve.settings import ENV_PREFIX, ServeSettings

    spec = one(render(name), "Deployment", SERVER)["spec"]["template"]["spec"]
    c = container(render(name), "Deployment", SERVER, SERVER)
    variable = ENV_PREFIX + "drain_timeout_s".upper()
    assert "drain_timeout_s" in ServeSettings.model_fields
    drain = float(env(c).get(variable, ServeSettings.model_fields["drain_timeout_s"].default))
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    assert spec["terminationGracePeriodSeconds"] > float(command[1]) + drain, (spec["terminationGracePeriodSeconds"],
                                                                                command, drain)


def test_every_zooserve_variable_is_a_setting_the_code_reads():
    """ServeSettings ignores unknown ZOOSERVE_* variables (extra="ignore"): a misspelt one would be
    silently without effect, so each must name a field of serve/settings.py (or the kernel cache)."""
    from serve.settings import ENV_PREFIX, ServeSettings

    known = {ENV_PREFIX + field.upper() for field in ServeSettings.model_fields} | {"ZOOSERVE_KERNEL_CACHE"}
    assert "ZOOSERVE_KERNEL_CACHE" in (ROOT / "training" / "kernels" / "selective_scan.py").read_text()
    for name in [*RENDERED, "loader"]:
        for label, spec in pod_specs(render(name)):
            for c in spec["containers"]:
                unknown = {v for v in env(c) if v.startswith(ENV_PREFIX)} - known
                assert not unknown, f"{name}: {label}: {sorted(unknown)} are not settings of serve/settings.py"
    server = env(container(render("cpu"), "Deployment", SERVER, SERVER))
    assert ServeSettings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in server.items()
                            if k != "ZOOSERVE_KERNEL_CACHE" and k.startswith(ENV_PREFIX)}).rollout_controller is False


def test_the_gpu_limit_is_in_the_gpu_overlay_only():
    for name, device in (("cpu", "cpu"), ("gpu", "cuda")):
        for label, spec in pod_specs(render(name)):
            for c in spec["containers"]:
                limits = c.get("resources", {}).get("limits", {})
                if (label, c["name"]) == (f"Deployment/{SERVER}", SERVER) and name == "gpu":
                    assert limits["nvidia.com/gpu"] == 1, limits
                    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                        spec["tolerations"]
                else:
                    assert "nvidia.com/gpu" not in limits, (name, label)
        assert env(container(render(name), "Deployment", SERVER, SERVER))["ZOOSERVE_DEVICE"] == device
    for name in ("batch", "kserve"):
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(render(name))


@pytest.mark.parametrize("name", [*sorted(RENDERED), "loader"])
def test_every_pod_runs_as_the_images_non_root_user_with_requests_and_limits(name):
    uid = int(re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1])
    for label, spec in pod_specs(render(name)):
        for c in spec["containers"]:
            context = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("runAsUser") == uid, (label, context)
            assert context.get("allowPrivilegeEscalation") is False and context["capabilities"]["drop"] == ["ALL"]
            resources = c["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


# ---- scaling, disruption, monitoring ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_the_hpa_scales_the_server_on_the_queue_depth_gauge_the_server_exports(name):
    from serve.metrics import FAMILIES

    (metric, kind) = next((n, k) for n, _, k, attribute, _ in FAMILIES if attribute == "queue_depth")
    assert kind == "gauge"
    hpa = one(render(name), "HorizontalPodAutoscaler", SERVER)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [metric]
    assert "replicas" not in one(render(name), "Deployment", SERVER)["spec"], "the HPA owns the count"
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # the prometheus-adapter rule serves that gauge, under that name, per pod
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert re.fullmatch(rule["name"]["matches"], metric) and rule["name"]["as"] == metric
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_service_pdb_and_servicemonitor_select_the_server_pods(name):
    objects = render(name)
    pod_labels = one(objects, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    controller_labels = one(objects, "Deployment", "zooserve-rollout-controller")["spec"]["template"]["metadata"][
        "labels"]

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    service = one(objects, "Service", SERVER)
    pdb = one(objects, "PodDisruptionBudget", SERVER)["spec"]
    for selector in (service["spec"]["selector"], pdb["selector"]["matchLabels"]):
        assert selects(selector, pod_labels) and not selects(selector, controller_labels), selector
    assert pdb.get("maxUnavailable") == 1
    monitor = one(objects, "ServiceMonitor", SERVER)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # the job label is the one deploy/prometheus's rules and alerts expect
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert re.search(rf"job_name: {job}\b", (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())


def test_every_workload_mounts_the_registry_from_one_readwritemany_claim():
    for name in ("cpu", "gpu", "batch", "loader"):
        for label, spec in pod_specs(render(name)):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims.get("registry") == "zooserve-registry", (name, label)
            (c,) = spec["containers"]
            mount = next(m for m in c["volumeMounts"] if m["name"] == "registry")
            assert mount["mountPath"] == env(c).get("ZOOSERVE_REGISTRY", "/registry") == "/registry"
    pvc = one(render("cpu"), "PersistentVolumeClaim", "zooserve-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one(render("batch"), "PersistentVolumeClaim", "zooserve-batch")["spec"]["accessModes"] == ["ReadWriteMany"]


# ---- commands, run for real by sh against zooserve's own parser ---------------------------------

def fake_zooserve(tmp_path: Path) -> tuple[Path, Path]:
    """A `zooserve` on PATH that writes its arguments, one a line, to a file: (bin folder, args file)."""
    bindir, args = tmp_path / "bin", tmp_path / "args"
    bindir.mkdir(exist_ok=True)
    script = bindir / "zooserve"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir, args


def run_container(c: dict, tmp_path: Path, extra_env: dict[str, str],
                  bindir: Path | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The container's command + args under /bin/sh with its env and a fake zooserve (or the `zooserve`
    of `bindir`); returns the fake's argv."""
    fake_bindir, args_file = fake_zooserve(tmp_path)
    args_file.unlink(missing_ok=True)
    environment = {**{k: v for k, v in env(c).items() if v is not None}, **extra_env,
                   "PATH": f"{bindir or fake_bindir}:/usr/bin:/bin"}
    done = subprocess.run([*c["command"], *c["args"]], env=environment, capture_output=True, text=True,
                          timeout=300 if bindir else 30)
    return done, (args_file.read_text().splitlines() if args_file.exists() else [])


def test_the_rollout_controller_runs_zooserve_rollout_run_alone_and_the_servers_do_not(tmp_path):
    from serve.cli import build_parser

    for name in OVERLAYS:
        objects = render(name)
        deployment = one(objects, "Deployment", "zooserve-rollout-controller")["spec"]
        assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
        c = container(objects, "Deployment", "zooserve-rollout-controller", "controller")
        config = one(objects, "ConfigMap", "zooserve-rollout")["data"]
        done, argv = run_container(c, tmp_path, {**config, "ROLLOUT_MODELS": "mlp-digits decoder-tiny",
                                                 "POD_NAME": "controller-0"})
        assert done.returncode == 0, done.stderr
        args = build_parser().parse_args(argv)
        assert (args.command, args.names, args.prometheus, args.registry, args.owner) == \
            ("rollout", ["mlp-digits", "decoder-tiny"], config["PROMETHEUS_URL"], "/registry", "controller-0")
        assert env(container(objects, "Deployment", SERVER, SERVER))["ZOOSERVE_ROLLOUT_CONTROLLER"] == "false"
        assert container(objects, "Deployment", SERVER, SERVER)["command"] == ["zooserve", "serve"]


def shard_ranges(job_container: dict, tmp_path: Path, input_path: Path, shards: int) -> list[str]:
    from serve.cli import build_parser

    ranges = []
    for index in range(shards):
        done, argv = run_container(job_container, tmp_path, {"JOB_COMPLETION_INDEX": str(index),
                                                             "SHARDS": str(shards), "INPUT": str(input_path),
                                                             "OUTPUT_DIR": str(tmp_path / "out")})
        assert done.returncode == 0, done.stderr
        args = build_parser().parse_args(argv)        # what `zooserve batch` would be given
        assert (args.command, args.input, args.created, args.no_progress) == ("batch", str(input_path), 0, True)
        assert args.output == str(tmp_path / "out" / f"part-{index:05d}.jsonl")
        ranges.append(args.lines)
    return ranges


@pytest.mark.parametrize("lines,shards,final_newline", [(10, 4, True), (10, 4, False), (3, 4, True),
                                                         (1, 1, False), (1000, 7, True), (0, 3, True)])
def test_the_indexed_jobs_shards_cover_every_line_exactly_once(tmp_path, lines, shards, final_newline):
    from serve.batch import parse_range

    job = one(render("batch"), "Job", "zooserve-batch")["spec"]
    assert job["completionMode"] == "Indexed"
    c = container(render("batch"), "Job", "zooserve-batch", "batch")
    assert int(env(c)["SHARDS"]) == job["completions"], "SHARDS must equal the Job's completions"
    data = "".join(f'{{"custom_id": "{i}"}}\n' for i in range(lines))
    if not final_newline:
        data = data.removesuffix("\n")
    (tmp_path / "in.jsonl").write_text(data)
    physical = len(data.splitlines())
    covered = []
    for text in shard_ranges(c, tmp_path, tmp_path / "in.jsonl", shards):
        start, stop = parse_range(text)
        covered.extend(range(start, physical if stop is None else min(stop, physical)))
    assert covered == list(range(physical)), covered         # in order, each once, none missing


@pytest.mark.slow
def test_the_indexed_jobs_parts_concatenate_to_the_bytes_of_one_whole_run(demo_registry, tmp_path):
    """The Job's script for real, with the real `zooserve batch`: 3 shards of 8 lines (the last without
    a newline), their parts concatenated in index order, against one run over the whole file."""
    import json

    bindir = Path(sys.executable).parent
    if not (bindir / "zooserve").exists():
        pytest.skip(f"no zooserve beside {sys.executable} (pip install -e .)")
    c = container(render("batch"), "Job", "zooserve-batch", "batch")
    digit = [float(v % 17) for v in range(64)]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v2/models/mlp-digits/infer",
                         "body": {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                              "data": digit[i:] + digit[:i]}]}}) for i in range(8)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines))
    work = {"SHARDS": "3", "INPUT": str(source), "OUTPUT_DIR": str(tmp_path / "out"),
            "ZOOSERVE_REGISTRY": str(demo_registry), "ZOOSERVE_KERNEL_CACHE": str(tmp_path / "kernels"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    for index in range(3):
        done, _ = run_container(c, tmp_path, {**work, "JOB_COMPLETION_INDEX": str(index)}, bindir=bindir)
        assert done.returncode == 0, done.stderr[-3000:]
    parts = sorted((tmp_path / "out").glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    whole = tmp_path / "whole.jsonl"
    done = subprocess.run([str(bindir / "zooserve"), "batch", "--registry", str(demo_registry), "-i", str(source),
                           "-o", str(whole), "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    merged = b"".join(p.read_bytes() for p in parts)
    assert merged == whole.read_bytes()
    records = [json.loads(line) for line in merged.splitlines()]
    assert [r["custom_id"] for r in records] == [f"r{i}" for i in range(8)]
    assert {r["response"]["status_code"] for r in records} == {200}


def test_an_index_past_the_shard_count_is_refused(tmp_path):
    c = container(render("batch"), "Job", "zooserve-batch", "batch")
    (tmp_path / "in.jsonl").write_text("{}\n")
    done, argv = run_container(c, tmp_path, {"JOB_COMPLETION_INDEX": "4", "SHARDS": "4",
                                              "INPUT": str(tmp_path / "in.jsonl"), "OUTPUT_DIR": str(tmp_path)})
    assert done.returncode == 2 and "set SHARDS to the Job's completions" in done.stderr and argv == []
    done, argv = run_container(c, tmp_path, {"SHARDS": "4", "INPUT": str(tmp_path / "in.jsonl"),
                                              "OUTPUT_DIR": str(tmp_path)})
    assert done.returncode != 0 and "run this as an Indexed Job" in done.stderr and argv == []


# ---- KServe ----------------------------------------------------------------------------------

def test_the_kserve_runtime_serves_v2_on_kserves_port_and_the_inference_service_uses_it(tmp_path):
    from serve.cli import build_parser

    objects = render("kserve")
    runtime = one(objects, "ClusterServingRuntime", "zooserve")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert "v2" in spec["protocolVersions"]
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"                 # the name KServe merges the predictor into
    assert [p["containerPort"] for p in c["ports"]] == [8080] == [int(env(c)["ZOOSERVE_PORT"])]
    assert env(c)["ZOOSERVE_REGISTRY"] == "/mnt/models" and env(c)["ZOOSERVE_HOST"] == "0.0.0.0"
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == \
        ("/v2/health/ready", "/v2/health/live")
    assert {c["readinessProbe"]["httpGet"]["port"], c["livenessProbe"]["httpGet"]["port"]} == {8080}
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8080"
    assert build_parser().parse_args(c["command"][1:]).command == "serve" and c["command"][0] == "zooserve"

    service = one(objects, "InferenceService", "zooserve")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] == "v2"
    claim = one(render("cpu"), "PersistentVolumeClaim", "zooserve-registry")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}/"
    assert service["metadata"]["namespace"] == one(render("cpu"), "Deployment", SERVER)["metadata"]["namespace"]
