"""Every manifest in k8s/ against the KubeRay RayJob CRD schema, strictly (no cluster here).

The CRD's ``spec.versions[name=v1].schema.openAPIV3Schema`` becomes a JSON Schema in which an
object that lists ``properties`` (and does not say x-kubernetes-preserve-unknown-fields) rejects
any other key, as the API server's structural pruning would silently drop it: a misspelt field
fails here instead of vanishing on the cluster. The CRDs are read from GALAXYSAE_KUBERAY_CRDS
(default: ../shared/kuberay beside the checkout); they are never copied into the repo.
ConfigMaps are checked too: each config they carry must load as its job's typed config, and each
command of a RayJob's entrypoint must pass ``galaxysae <job> --config FILE --check`` with the file
its ConfigMap mounts. An entrypoint reaches the cluster through two shells (KubeRay's submitter
puts it unquoted into a ``ray job submit ... -- ENTRYPOINT ; fi ; ...`` line, and Ray's job
supervisor runs what ``ray job submit`` re-quoted with shlex.join): a chain of jobs must be one
``bash -c "..."``, never a bare ``&&`` that the submitter's shell would take for its own.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = Path(os.environ.get("GALAXYSAE_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay"))
# a RayJob per launcher job: atlas.yaml runs pca, compare, render and atlas in that order
JOBS = ("embed", "train", "sweep", "render", "atlas")
GPU_JOBS = {"embed", "train", "sweep"}  # the rest run on CPUs only


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
    jobs = [(job, path) for job, path, _ in entrypoint_commands(spec["entrypoint"], where)]
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    # a GPU worker group exactly where a job uses GPUs (pca, compare, render, atlas run on CPUs)
    has_gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    names = [job for job, _ in jobs]
    assert has_gpu == bool(GPU_JOBS & set(names)), \
        f"{where}: {'no' if not has_gpu else 'an idle'} GPU worker group for {', '.join(names)}"
    # render's select = "aligned" reads compare's answers: compare first
    if "compare" in names and "render" in names:
        assert names.index("compare") < names.index("render"), f"{where}: render runs before compare"
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
    for job, path in jobs:
        assert path in mounted, f"{where}: {job}'s {path} is not mounted from a ConfigMap ({sorted(mounted)})"


def entrypoint_commands(entrypoint: str, where: str = "entrypoint") -> list[tuple[str, str, list[str]]]:
    """The ``galaxysae <job> --config FILE [--key value ...]`` commands an entrypoint runs, in order,
    as (job, FILE, argv after the job), read as the two shells on its way read it.

    KubeRay's submitter pod runs ``... ray job submit ... -- ENTRYPOINT ; fi ; ray job logs ...``
    in bash, so the entrypoint must be one simple command there; ``ray job submit`` joins the words
    it gets with shlex.join, and Ray's job supervisor runs that with a shell. One job is
    ``galaxysae <job> --config FILE``; a chain is ``bash -c "CMD && CMD ..."`` (stop at the first
    failure)."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    control = [w for w in words if w and set(w) <= set("&|;()<>")]
    assert not control, (f"{where}: the entrypoint has {control} outside quotes: KubeRay's submitter "
                         "shell would run that part in the submitter pod (wrap the chain in bash -c \"...\")")
    # what Ray's job supervisor runs: ray job submit's shlex.join of the submitter's words
    words = shlex.split(shlex.join(words))
    if words[:2] == ["bash", "-c"]:
        assert len(words) == 3, f"{where}: bash -c takes one quoted script: {words}"
        script = words[2]
        assert "||" not in script and ";" not in script, \
            f"{where}: chain the jobs with && only (stop at the first failure): {script}"
        commands = [shlex.split(part) for part in script.split("&&")]
    else:
        commands = [words]
    out = []
    for argv in commands:
        text = shlex.join(argv)
        assert len(argv) >= 4 and argv[0] == "galaxysae" and argv[2] == "--config", \
            f"{where}: each command must be `galaxysae <job> --config FILE [--key value ...]`: {text}"
        out.append((argv[1], argv[3], argv[1:]))
    return out


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


def _rayjobs() -> list[tuple[Path, dict, dict]]:
    """(manifest, RayJob, {mount path/key: text} of the ConfigMaps it mounts)."""
    out = []
    for path in _manifests():
        docs = _docs(path)
        cms = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
        for doc in docs:
            if doc.get("kind") != "RayJob":
                continue
            files = {}
            head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            vols = {v["name"]: v for v in head.get("volumes", [])}
            for c in head["containers"]:
                for m in c.get("volumeMounts", []):
                    cm = vols.get(m["name"], {}).get("configMap")
                    if cm and cm["name"] in cms:
                        for key, text in cms[cm["name"]]["data"].items():
                            files[f"{m['mountPath'].rstrip('/')}/{key}"] = text
            out.append((path, doc, files))
    return out


@pytest.mark.parametrize("path, doc, files", _rayjobs(), ids=lambda v: v.name if isinstance(v, Path) else None)
def test_entrypoint_commands_pass_check(path, doc, files, tmp_path):
    """Every command of the entrypoint, as written, passes `galaxysae <job> ... --check` with the
    config its ConfigMap mounts (copied here, since /etc/galaxysae exists only in the pod)."""
    commands = entrypoint_commands(doc["spec"]["entrypoint"], str(path.relative_to(REPO)))
    for mount, text in files.items():
        local = tmp_path / mount.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        # a config naming another mounted file (sweep.toml's train_config) names its copy here
        for other in files:
            text = text.replace(f'"{other}"', f'"{tmp_path / other.lstrip("/")}"')
        local.write_text(text)
    for job, config_path, argv in commands:
        argv = [str(tmp_path / a.lstrip("/")) if a in files else a for a in argv]
        out = subprocess.run([sys.executable, "-m", "galaxysae", *argv, "--check"], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0 and f"galaxysae {job}: config OK" in out.stdout, \
            f"{path.name}: {job} --config {config_path} does not pass --check:\n{out.stdout}{out.stderr}"
    if path.name == "atlas.yaml":
        assert [job for job, _, _ in commands] == ["pca", "compare", "render", "atlas"]
        assert not {"embed", "train", "sweep"} & {job for job, _, _ in commands}


def test_entrypoint_chain_is_one_submitter_command():
    """A bare && in an entrypoint would split KubeRay's submitter line: refused."""
    ok = entrypoint_commands('bash -c "galaxysae pca --config /a.toml && galaxysae atlas --config /b.toml"')
    assert [(j, p) for j, p, _ in ok] == [("pca", "/a.toml"), ("atlas", "/b.toml")]
    with pytest.raises(AssertionError, match="outside quotes"):
        entrypoint_commands("galaxysae pca --config /a.toml && galaxysae atlas --config /b.toml")
    with pytest.raises(AssertionError, match="galaxysae <job> --config"):
        entrypoint_commands('bash -c "galaxysae pca --config /a.toml && rm -rf /b"')
