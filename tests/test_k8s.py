"""Every manifest in k8s/ against the KubeRay RayJob CRD schema, strictly (no cluster here).

The CRD's ``spec.versions[name=v1].schema.openAPIV3Schema`` becomes a JSON Schema in which an
object that lists ``properties`` (and does not say x-kubernetes-preserve-unknown-fields) rejects
any other key, as the API server's structural pruning would silently drop it: a misspelt field
fails here instead of vanishing on the cluster. The CRDs are read from GALAXYSAE_KUBERAY_CRDS
(default: ../shared/kuberay beside the checkout); they are never copied into the repo.
ConfigMaps are checked too: each config they carry must load as its job's typed config.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = Path(os.environ.get("GALAXYSAE_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay"))
JOBS = ("embed", "train", "sweep", "render")


def openapi_to_jsonschema(node, strict: bool = True):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema draft 7, closing objects that list properties."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: openapi_to_jsonschema(v, strict) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = openapi_to_jsonschema(value, strict) if isinstance(value, (dict, list)) else value
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue  # handled below, or not a validation keyword here
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if (strict and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_schema(name: str) -> dict:
    path = CRD_DIR / name
    if not path.is_file():
        pytest.fail(f"KubeRay CRD {path} not found: set GALAXYSAE_KUBERAY_CRDS to the folder "
                    "holding ray.io_rayjobs.yaml (ray-project/kuberay ray-operator/config/crd/bases)")
    crd = yaml.safe_load(path.read_text())
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert "v1" in versions, f"{path}: no v1 version"
    schema = openapi_to_jsonschema(versions["v1"]["schema"]["openAPIV3Schema"])
    # The CRD leaves these to the API server; pin them so a wrong apiVersion/kind fails too.
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    import jsonschema

    schema = _crd_schema("ray.io_rayjobs.yaml")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_manifests_exist_for_every_job():
    kinds = {}
    for path in _manifests():
        for doc in _docs(path):
            kinds.setdefault(doc.get("kind"), []).append(doc["metadata"]["name"])
    for job in JOBS:
        assert f"galaxysae-{job}" in kinds.get("RayJob", []), f"no RayJob for {job} in k8s/"


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_validates(path, rayjob_validator):
    docs = _docs(path)
    assert docs, f"{path}: empty"
    configmaps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for n, doc in enumerate(docs):
        where = f"{path.relative_to(REPO)} document {n + 1} ({doc.get('kind')})"
        kind = doc.get("kind")
        if kind == "RayJob":
            errs = _errors(rayjob_validator, doc)
            assert not errs, f"{where} does not match the RayJob CRD:\n" + "\n".join(errs[:20])
            _check_rayjob(doc, configmaps, where)
        elif kind == "ConfigMap":
            _check_configmap(doc, where)
        else:
            pytest.fail(f"{where}: unexpected kind {kind!r} (k8s/ holds RayJobs and their ConfigMaps)")


def _check_rayjob(doc: dict, configmaps: dict, where: str) -> None:
    spec = doc["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes must be true"
    # the TTL is how long the finished job's GPU pods are kept: minutes, not hours
    assert 0 < spec.get("ttlSecondsAfterFinished", 0) <= 600, \
        f"{where}: ttlSecondsAfterFinished must be set, at most 600 s (GPU pods are held that long)"
    assert spec["rayClusterSpec"].get("authOptions", {}).get("mode") == "token", \
        f"{where}: Ray token auth must be on (rayClusterSpec.authOptions.mode: token)"
    job = re.match(r"galaxysae (\w+) --config (\S+)", spec["entrypoint"])
    assert job, f"{where}: entrypoint must run `galaxysae <job> --config FILE`: {spec['entrypoint']}"
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    # a GPU worker group exactly where the job uses GPUs (render's encode and grids run on CPUs)
    has_gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert has_gpu == (job.group(1) != "render"), \
        f"{where}: {'no' if not has_gpu else 'an idle'} GPU worker group for {job.group(1)}"
    mounted = set()
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        # Ray's object store lives in /dev/shm (64 MiB in a pod unless mounted): on the head too,
        # where train's driver puts its split; else Ray falls back to disk
        shm = [volumes.get(m["name"], {}) for c in pod["spec"]["containers"]
               for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and shm[0].get("emptyDir", {}).get("medium") == "Memory", \
            f"{where}: a pod does not mount a memory emptyDir at /dev/shm"
        for c in pod["spec"]["containers"]:
            assert c["image"], f"{where}: container {c['name']} has no image"
            # Credentials come from Secrets only: no literal secret values in a manifest.
            for e in c.get("env", []):
                assert "value" not in e or not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)", e["name"]), \
                    f"{where}: {e['name']} is set literally; use a secretKeyRef"
            assert any("secretRef" in e for e in c.get("envFrom", [])), f"{where}: {c['name']} gets no Secret"
            for m in c.get("volumeMounts", []):
                vol = volumes.get(m["name"])
                assert vol, f"{where}: {c['name']} mounts undefined volume {m['name']}"
                if "configMap" in vol:
                    name = vol["configMap"]["name"]
                    assert name in configmaps, f"{where}: ConfigMap {name} is not defined beside the RayJob"
                    for key in configmaps[name]["data"]:
                        mounted.add(f"{m['mountPath'].rstrip('/')}/{key}")
    assert job.group(2) in mounted, f"{where}: {job.group(2)} is not mounted from a ConfigMap ({sorted(mounted)})"


def _check_configmap(doc: dict, where: str) -> None:
    from galaxysae import config
    from galaxysae.cli import JOBS as CLI_JOBS

    assert doc.get("apiVersion") == "v1", f"{where}: apiVersion must be v1"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}, \
        f"{where}: unknown ConfigMap fields {sorted(set(doc) - {'apiVersion', 'kind', 'metadata', 'data'})}"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), f"{where}: bad name"
    for key, text in doc.get("data", {}).items():
        assert isinstance(text, str), f"{where}: data.{key} must be a string"
        if not key.endswith(".toml"):
            continue
        data = tomllib.loads(text)
        job = key[: -len(".toml")]
        if job not in CLI_JOBS:
            continue
        module = importlib.import_module(CLI_JOBS[job][0])
        try:
            config.from_dict(module.Config, copy.deepcopy(data), source=f"{where} data.{key}")
        except config.ConfigError as exc:
            pytest.fail(f"{where}: data.{key} is not a valid {job} config: {exc}")


def test_misspelt_field_fails(rayjob_validator):
    doc = next(d for d in _docs(K8S / "embed.yaml") if d["kind"] == "RayJob")
    assert not _errors(rayjob_validator, doc)
    cases = {
        "spec": lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),
        "head group": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__(
            "rayStartParam", {}),
        "container": lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
            "containers"][0].__setitem__("imagePullPolicey", "Always"),
        "wrong type": lambda d: d["spec"].__setitem__("ttlSecondsAfterFinished", "an hour"),
        "kind": lambda d: d.__setitem__("kind", "RayJobs"),
    }
    for name, mutate in cases.items():
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert _errors(rayjob_validator, bad), f"a manifest with a bad {name} field validated"


def test_check_jsonschema_cli_agrees(tmp_path, rayjob_validator):
    """The same strict schema through check-jsonschema, as a user would run it."""
    import json
    import subprocess
    import sys

    schema = tmp_path / "rayjob.schema.json"
    schema.write_text(json.dumps(rayjob_validator.schema))
    docs = []
    for path in _manifests():
        for n, doc in enumerate(_docs(path)):
            if doc.get("kind") == "RayJob":
                f = tmp_path / f"{path.stem}-{n}.json"
                f.write_text(json.dumps(doc))
                docs.append(str(f))
    cli = Path(sys.executable).parent / "check-jsonschema"
    ok = subprocess.run([str(cli), "--schemafile", str(schema), *docs], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = json.loads(Path(docs[0]).read_text())
    bad["spec"]["entrypointNumGPUs"] = 1  # real name: entrypointNumGpus
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    fail = subprocess.run([str(cli), "--schemafile", str(schema), str(tmp_path / "bad.json")],
                          capture_output=True, text=True)
    assert fail.returncode != 0 and "entrypointNumGPUs" in fail.stdout + fail.stderr
