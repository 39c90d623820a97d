"""deploy/k8s, checked offline: the kustomization renders, every object validates against the Kubernetes
schemas (kubernetes-validate, strict), and the wiring holds: GPU limits, native gRPC probes on
grpc.health.v1, a grace period above the drain period, the headless Service the clients' targets name,
the PodDisruptionBudget, Secrets, settings names and the cache volume.

Rendering: no kustomize binary installs from PyPI or Debian's archive, so `render` below applies the
few kustomize fields deploy/k8s uses (resources, namespace, labels without selectors, images) and
refuses any other. Where `kubectl` is installed, its built-in kustomize must give the same objects.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}


def _images(containers: list[dict], images: list[dict]) -> None:
    for container in containers:
        name, _, tag = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"


def render(directory: Path) -> list[dict]:
    """`kustomize build directory`, for the fields listed in SUPPORTED."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= SUPPORTED, f"extend render() for {set(kustomization) - SUPPORTED}"
    objects: list[dict] = []
    for resource in kustomization["resources"]:
        assert (directory / resource).is_file(), f"{resource}: only files, no bases, in this renderer"
        objects += [doc for doc in yaml.safe_load_all((directory / resource).read_text()) if doc]
    for obj in objects:
        if kustomization.get("namespace") and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            assert not label.get("includeSelectors") and not label.get("includeTemplates"), label
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod:
            _images(pod.get("containers", []) + pod.get("initContainers", []), kustomization.get("images", []))
    return objects


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    rendered = render(K8S)
    keys = [_key(o) for o in rendered]
    assert len(keys) == len(set(keys)), "duplicate objects"
    return {_key(o): o for o in rendered}


def test_kustomize_build_renders(objects):
    assert set(objects) >= {
        ("Namespace", "product-in-action"),
        ("Deployment", "generator"),
        ("Deployment", "upscaler"),
        ("Deployment", "web"),
        ("Service", "generator-headless"),
        ("PodDisruptionBudget", "generator"),
        ("Secret", "pia-s3"),
        ("Secret", "pia-service-token"),
        ("PersistentVolumeClaim", "pia-cache"),
    }
    kubectl = shutil.which("kubectl")
    if kubectl:  # an extra cross-check where kubectl exists; render() is what always runs
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = {_key(o): o for o in yaml.safe_load_all(out.stdout) if o}
        assert theirs == objects


def _validate_strictly(objects: dict[tuple[str, str], dict], version: str) -> None:
    for key, obj in objects.items():
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key} against {version}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_every_object_validates_strictly(objects, version):
    _validate_strictly(objects, version)


def _pod(objects, name: str) -> dict:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]


def _container(objects, name: str) -> dict:
    (container,) = _pod(objects, name)["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_generator_gets_gpus_and_grpc_probes(objects):
    pod, container = _pod(objects, "generator"), _container(objects, "generator")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert port == 50051
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"]["port"] == port, kind
    assert container["readinessProbe"]["grpc"]["service"] == "productinaction.v1.Generator"
    # Loading can take minutes: the startup probe gives it at least 10 before liveness may kill it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Drain: the pod's grace period must outlast the service's own grace period for running requests.
    from services.generator.settings import GeneratorSettings

    env = _env(container)
    drain = float(env["PIA_GENERATOR_GRACE_PERIOD_S"]["value"]) if "PIA_GENERATOR_GRACE_PERIOD_S" in env else None
    drain = drain if drain is not None else GeneratorSettings.model_fields["grace_period_s"].default
    assert pod["terminationGracePeriodSeconds"] > drain
    upscaler = _container(objects, "upscaler")
    assert upscaler["readinessProbe"]["grpc"]["service"] == "productinaction.v1.Upscaler"
    assert _pod(objects, "upscaler")["terminationGracePeriodSeconds"] > float(
        _env(upscaler)["PIA_UPSCALER_GRACE_PERIOD_S"]["value"]
    )


def test_clients_reach_every_replica_through_the_headless_service(objects):
    service = objects[("Service", "generator-headless")]
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = objects[("Deployment", "generator")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    web = _env(_container(objects, "web"))
    assert web["PIA_WEB_GENERATOR"]["value"] == f"dns:///{service['metadata']['name']}:{grpc_port['port']}"
    upscaler = objects[("Service", "upscaler-headless")]
    assert upscaler["spec"]["clusterIP"] == "None"
    assert web["PIA_WEB_UPSCALER"]["value"] == f"dns:///upscaler-headless:{upscaler['spec']['ports'][0]['port']}"
    assert objects[("Deployment", "generator")]["spec"]["replicas"] >= 2


def test_disruption_budget_keeps_a_generator(objects):
    pdb = objects[("PodDisruptionBudget", "generator")]
    deployment = objects[("Deployment", "generator")]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert deployment["spec"]["replicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_secrets_settings_and_volumes_are_wired(objects):
    from client.web import WebSettings
    from services.generator.settings import GeneratorSettings
    from services.upscaler.settings import UpscalerSettings

    fields = {
        "PIA_GENERATOR_": set(GeneratorSettings.model_fields),
        "PIA_UPSCALER_": set(UpscalerSettings.model_fields),
        "PIA_WEB_": set(WebSettings.model_fields),
    }
    secrets = {name: obj for (kind, name), obj in objects.items() if kind == "Secret"}
    config_maps = {name: obj for (kind, name), obj in objects.items() if kind == "ConfigMap"}
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", re.I)
    storage = {}
    for name in ("generator", "upscaler", "web"):
        pod, container = _pod(objects, name), _container(objects, name)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        for source in container.get("envFrom", []):
            assert source["secretRef"]["name"] in secrets
        for key, entry in _env(container).items():
            if key.startswith("PIA_"):
                prefix = next(p for p in fields if key.startswith(p))
                assert key[len(prefix) :].lower() in fields[prefix], f"{name}: {key} is no setting"
            # Secrets come from Secrets, never as literal values in the manifest.
            assert not (secretish.search(key) and not key.endswith("_FILE") and "value" in entry), key
            ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps[ref["name"]]["data"], key
                if key.endswith("_STORAGE"):
                    storage[name] = (ref["name"], ref["key"])
        token_file = next(e["value"] for k, e in _env(container).items() if k.endswith("TOKEN_FILE"))
        token_dir, token_key = token_file.rsplit("/", 1)
        assert volumes[mounts[token_dir]]["secret"]["secretName"] == "pia-service-token"
        assert token_key in secrets["pia-service-token"]["stringData"]
        assert container["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts
        assert pod["securityContext"]["runAsNonRoot"]
    # One bucket and prefix for both services.
    assert storage["generator"] == storage["upscaler"]
    # The page, the part people reach, has a login from a Secret.
    web_pod, web = _pod(objects, "web"), _container(objects, "web")
    login_dir, login_key = _env(web)["PIA_WEB_AUTH_FILE"]["value"].rsplit("/", 1)
    login_volume = next(m["name"] for m in web["volumeMounts"] if m["mountPath"] == login_dir)
    login_secret = next(v["secret"]["secretName"] for v in web_pod["volumes"] if v["name"] == login_volume)
    assert login_key in secrets[login_secret]["stringData"]
    # Hub models and compiled kernels: one cache volume, where the images point HF_HOME and the inductor.
    generator_mounts = {m["mountPath"]: m["name"] for m in _container(objects, "generator")["volumeMounts"]}
    cache = {v["name"]: v for v in _pod(objects, "generator")["volumes"]}[generator_mounts["/cache"]]
    assert cache["persistentVolumeClaim"]["claimName"] == "pia-cache"
    dockerfile = (ROOT / "Dockerfile.generator").read_text()
    for variable in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert re.search(rf"{variable}=/cache/", dockerfile), variable


def test_images_are_the_three_dockerfiles(objects):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {i["name"] for i in kustomization["images"]} == {"pia-generator", "pia-upscaler", "pia-web"}
    for name in ("generator", "upscaler", "web"):
        image = _container(objects, name)["image"]
        assert image.startswith(f"registry.example.com/pia-{name}:"), image
        assert (ROOT / f"Dockerfile.{name}").exists()


# The catalogue job (deploy/k8s/catalogue-job.yaml): applied per job, beside the base


@pytest.fixture(scope="module")
def catalogue_job() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all((K8S / "catalogue-job.yaml").read_text()) if d]
    return {_key(d): d for d in docs}


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_catalogue_job_validates_strictly(catalogue_job, version):
    _validate_strictly(catalogue_job, version)


def test_catalogue_job_shards_over_the_headless_service_and_resumes_from_storage(catalogue_job, objects):
    from client.cli import _parser

    job = catalogue_job[("Job", "pia-catalogue")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # backoffLimitPerIndex needs it
    (container,) = spec["template"]["spec"]["containers"]
    env = _env(container)
    assert env["SHARD"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    # What the pod runs, with Kubernetes' $(VAR) expansion done for shard 2: the real CLI parses it.
    values = {"SHARD": "2", "STORAGE": "s3://b/p", "S3_ENDPOINT": "http://s3"}
    values |= {k: env[k]["value"] for k in ("JOB_ID", "CATALOGUE", "RESULTS")}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    assert container["command"][-2:] == ["-m", "client.cli"]
    args = _parser().parse_args(argv)
    assert (args.command, args.catalogue_command) == ("catalogue", "run")
    index, count = args.shard.split("/")
    assert index == "2" and int(count) == spec["completions"] == spec["parallelism"]
    assert args.job == values["JOB_ID"] and args.storage == "s3://b/p" and args.s3_endpoint == "http://s3"
    # The catalogue and the results in S3 (the images' bucket); the pod's own folder is an emptyDir.
    bucket = "s3://" + objects[("ConfigMap", "pia-storage")]["data"]["storage"].removeprefix("s3://").split("/")[0]
    assert args.file.startswith(f"{bucket}/") and args.file.endswith(".csv")
    assert args.publish == f"{values['RESULTS']}/shard-2" and args.publish.startswith(f"{bucket}/")
    assert values["JOB_ID"] in values["RESULTS"]
    # The target is the base's headless Service; the storage, S3 credentials and token are the base's own.
    service = objects[("Service", "generator-headless")]
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert args.generator == f"dns:///generator-headless:{grpc_port['port']}"
    assert env["STORAGE"]["valueFrom"]["configMapKeyRef"]["name"] in {n for k, n in objects if k == "ConfigMap"}
    assert {s["secretRef"]["name"] for s in container["envFrom"]} <= {n for k, n in objects if k == "Secret"}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] in {n for k, n in objects if k == "Secret"}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert str(args.out).startswith("/work/") and "emptyDir" in mounts["/work"] and "emptyDir" in mounts["/tmp"]
