"""Offline validation of qsnap's Kubernetes deployment: deploy/, hack/kind/,
the kind scripts and the Containerfile.

No cluster can run here (no Docker engine, no kind), so this module checks
everything that does not need one:

* every YAML file under deploy/ and hack/kind/ parses;
* every Kubernetes object validates, strictly (an unknown field is an
  error), against the OpenAPI schemas of its apiVersion for Kubernetes
  ``KUBERNETES_VERSION``, with the schemas that the maintained
  ``kubernetes-validate`` package bundles;
* custom resources of the external-snapshotter (VolumeSnapshotClass,
  VolumeSnapshot, VolumeSnapshotContent, the group-snapshot kinds) validate
  with ``jsonschema`` against the ``openAPIV3Schema`` of their version in the
  vendored CRDs (deploy/kubernetes/snapshot-controller/crds), made strict the
  way an API server with field validation ``Strict`` treats a structural
  schema (fields the schema does not declare are errors), and their metadata
  validates as ObjectMeta.  The CRDs' CEL rules (``x-kubernetes-validations``)
  are not evaluated: there is no CEL evaluator here;
* KubeVirt and CDI objects (VirtualMachine, VirtualMachineSnapshot,
  VirtualMachineRestore, StorageProfile): no schema for them is available
  offline, so what they embed from core Kubernetes is validated as core
  objects (each DataVolume template's storage spec as a
  PersistentVolumeClaim, their metadata as ObjectMeta), and their references
  (StorageClass, VolumeSnapshotClass, claims, the VM) must resolve;
* the qsnap container's arguments parse with the driver's own flags (the
  parser of ``csidriver.server`` and the names ``python -m csidriver --help``
  lists), and the sidecars' arguments agree with the pod: ``--csi-address``
  is the socket the driver listens on, ``--kubelet-registration-path`` is
  that socket's host path, provisioner and snapshotter run with
  ``--node-deployment`` and ``NODE_NAME``;
* volume group snapshots: csi-snapshotter and snapshot-controller enable the
  ``CSIVolumeGroupSnapshot`` feature gate, RBAC grants both what group
  snapshots need, the group class names the driver, and the group example's
  selector matches exactly its claims, all used by one pod (one node);
* the real driver, started with the DaemonSet's flags, serves what the
  sidecars expect: Probe ready, GetPluginInfo's name equal to the CSIDriver
  object, the StorageClass provisioner and the VolumeSnapshotClass driver,
  the capabilities csi-provisioner, csi-snapshotter and csi-resizer need,
  and the parameters of every StorageClass, VolumeSnapshotClass and
  VolumeGroupSnapshotClass under deploy/ accepted by CreateVolume,
  CreateSnapshot and CreateVolumeGroupSnapshot; the GroupController that
  csi-snapshotter's group gate needs.  NodeGetInfo, and the topology that
  the node-deployment sidecars need from CreateVolume, are checked only when
  the driver serves the CSI Node service; until the Node service lands it
  answers UNIMPLEMENTED and nothing is asserted about them.

What needs a real cluster (image build, scheduling, mounts, the smoke test
of hack/kind-up.sh) is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CRD_DIR = K8S / "snapshot-controller" / "crds"
KIND_DIR = ROOT / "hack" / "kind"
DOCS = ROOT / "docs" / "kubernetes.md"

# The Kubernetes version whose schemas the manifests must satisfy: the one of
# the kind node image hack/kind-up.sh pins.
KUBERNETES_VERSION = "1.37.0"

SNAPSHOT_GROUPS = frozenset({"snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io"})
# The group-snapshot API of the pinned external-snapshotter (v8.5.0): the
# CRDs' storage version, the one snapshot-controller and csi-snapshotter use.
GROUP_API_VERSION = "v1beta2"
# external-snapshotter's feature gate for volume group snapshots, the same
# name for snapshot-controller and csi-snapshotter (pkg/features/features.go);
# off by default in v8.5.0.
GROUP_GATE = "CSIVolumeGroupSnapshot"
# The label by which a --node-deployment csi-snapshotter picks its objects.
MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
KUBEVIRT_GROUPS = frozenset({"kubevirt.io", "snapshot.kubevirt.io", "cdi.kubevirt.io"})
KUSTOMIZE_GROUP = "kustomize.config.k8s.io"
KIND_GROUP = "kind.x-k8s.io"

TOPOLOGY_KEY = "topology.qsnap.csi.dev/node"
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
# A released version: vMAJOR.MINOR.PATCH, never latest or canary.
RELEASE_TAG = re.compile(r"^v\d+\.\d+\.\d+$")


# -- loading -------------------------------------------------------------------

def yaml_files() -> list[Path]:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"),
                    *KIND_DIR.rglob("*.yaml"), *KIND_DIR.rglob("*.yml")])
    assert files, "no YAML under deploy/ or hack/kind/"
    return files


def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


class Manifests:
    """Every object under deploy/ and hack/kind/, with the file it came from."""

    def __init__(self) -> None:
        self.objects: list[tuple[Path, dict[str, Any]]] = []
        for path in yaml_files():
            for doc in load_documents(path):
                assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
                self.objects.append((path, doc))

    def of_kind(self, kind: str, api_group: str | None = None) -> list[dict[str, Any]]:
        return [o for _, o in self.objects
                if o.get("kind") == kind and (api_group is None or group_of(o) == api_group)]

    def one(self, kind: str, name: str | None = None, api_group: str | None = None
            ) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind, api_group)
                 if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def in_file(self, path: Path) -> list[dict[str, Any]]:
        return [o for p, o in self.objects if p == path]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def group_of(obj: dict[str, Any]) -> str:
    api_version = obj.get("apiVersion", "")
    return api_version.rpartition("/")[0] if "/" in api_version else ""


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return Manifests()


# -- parsing and schema validation ------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{rel(path)} holds no document"
    for doc in docs:
        assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, \
            f"{rel(path)}: every document needs apiVersion and kind"


def validate_core(obj: dict[str, Any], where: str) -> None:
    """Strict validation against the bundled Kubernetes schemas.

    :raises AssertionError: with the validator's message and the field path.
    """
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{where}: {obj['kind']} {obj.get('metadata', {}).get('name')}: "
                             f"{path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(f"{where}: {e.message}") from None


def validate_metadata(obj: dict[str, Any], where: str) -> None:
    """Validate a custom resource's metadata as ObjectMeta: by the bundled
    schemas, as the metadata of a core object (a ConfigMap, whose schema
    takes any ObjectMeta)."""
    validate_core({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": obj.get("metadata", {})}, f"{where} (metadata)")


def strict_structural(schema: Any) -> Any:
    """A copy of a CRD's structural schema in which every object that lists
    its properties admits no others, as Strict field validation does (the API
    server would otherwise prune them silently).  ``metadata`` (ObjectMeta,
    checked separately), maps (``additionalProperties``) and
    ``x-kubernetes-preserve-unknown-fields`` stay open."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key != "metadata" or not isinstance(value, dict) or "type" in value:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def crd_documents() -> list[dict[str, Any]]:
    docs = [d for p in sorted(CRD_DIR.glob("*.yaml")) for d in load_documents(p)]
    assert docs, f"no CRDs in {rel(CRD_DIR)}"
    return docs


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str, str], tuple[dict[str, Any], str]]:
    """(group, version, kind) -> (openAPIV3Schema, scope) of every *served*
    version of the vendored CRDs."""
    schemas = {}
    for crd in crd_documents():
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                key = (spec["group"], version["name"], spec["names"]["kind"])
                schemas[key] = (version["schema"]["openAPIV3Schema"], spec["scope"])
    return schemas


def test_every_object_validates(manifests: Manifests,
                                crd_schemas: dict[tuple[str, str, str],
                                                  tuple[dict[str, Any], str]]) -> None:
    checked = 0
    custom_kinds = set()
    for path, obj in manifests.objects:
        where = rel(path)
        group = group_of(obj)
        if group in (KUSTOMIZE_GROUP, KIND_GROUP):
            continue  # tool configuration, checked by their own tests below
        if group in KUBEVIRT_GROUPS:
            continue  # no schema offline; test_kubevirt_example checks what can be
        if group in SNAPSHOT_GROUPS:
            version = obj["apiVersion"].rpartition("/")[2]
            key = (group, version, obj["kind"])
            assert key in crd_schemas, \
                f"{where}: {obj['apiVersion']} {obj['kind']} is not served by the vendored CRDs"
            schema, scope = crd_schemas[key]
            errors = sorted(jsonschema.Draft4Validator(strict_structural(schema))
                            .iter_errors(obj), key=lambda e: list(e.path))
            assert not errors, f"{where}: {obj['kind']}: " + "; ".join(
                f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)
            validate_metadata(obj, where)
            if scope == "Cluster":
                assert "namespace" not in obj["metadata"], \
                    f"{where}: {obj['kind']} is cluster-scoped and takes no namespace"
            custom_kinds.add(obj["kind"])
        else:
            validate_core(obj, where)
        checked += 1
    assert checked >= 20, f"only {checked} objects were schema-checked"
    assert {"VolumeSnapshotClass", "VolumeSnapshot", "VolumeGroupSnapshotClass",
            "VolumeGroupSnapshot"} <= custom_kinds, custom_kinds


def test_strictness_catches_unknown_fields(
        crd_schemas: dict[tuple[str, str, str], tuple[dict[str, Any], str]]) -> None:
    """The validators used above do reject a misspelt field, in core and in
    custom resources alike."""
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
           "spec": {"storageClasName": "qsnap", "accessModes": ["ReadWriteOnce"]}}
    with pytest.raises(AssertionError, match="storageClasName"):
        validate_core(pvc, "probe")
    schema, _ = crd_schemas[("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass")]
    vsc = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "x"}, "driver": "d", "deletionPolicy": "Delete",
           "parameter": {"a": "b"}}
    assert list(jsonschema.Draft4Validator(strict_structural(schema)).iter_errors(vsc))
    vsc["deletionPolicy"] = "Keep"
    del vsc["parameter"]
    assert list(jsonschema.Draft4Validator(strict_structural(schema)).iter_errors(vsc))
    # The group kinds too: a misspelt selector, and a class without driver.
    schema, _ = crd_schemas[("groupsnapshot.storage.k8s.io", GROUP_API_VERSION,
                             "VolumeGroupSnapshot")]
    vgs = {"apiVersion": f"groupsnapshot.storage.k8s.io/{GROUP_API_VERSION}",
           "kind": "VolumeGroupSnapshot", "metadata": {"name": "x"},
           "spec": {"source": {"selectr": {"matchLabels": {"a": "b"}}}}}
    assert list(jsonschema.Draft4Validator(strict_structural(schema)).iter_errors(vgs))
    schema, _ = crd_schemas[("groupsnapshot.storage.k8s.io", GROUP_API_VERSION,
                             "VolumeGroupSnapshotClass")]
    vgsc = {"apiVersion": f"groupsnapshot.storage.k8s.io/{GROUP_API_VERSION}",
            "kind": "VolumeGroupSnapshotClass", "metadata": {"name": "x"},
            "deletionPolicy": "Delete"}
    assert list(jsonschema.Draft4Validator(strict_structural(schema)).iter_errors(vgsc))


# -- the vendored CRDs -------------------------------------------------------------

def test_vendored_crds_name_their_upstream_and_cover_every_kind() -> None:
    kinds = set()
    for path in sorted(CRD_DIR.glob("*.yaml")):
        header = path.read_text(encoding="utf-8").split("\n---\n", 1)[0]
        assert "github.com/kubernetes-csi/external-snapshotter" in header, rel(path)
        assert re.search(r"at commit [0-9a-f]{40}", header), f"{rel(path)}: no upstream commit"
        assert f"client/config/crd/{path.name}" in header, f"{rel(path)}: upstream path differs"
        for crd in load_documents(path):
            assert crd["kind"] == "CustomResourceDefinition"
            storage = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
            assert len(storage) == 1, f"{rel(path)}: exactly one storage version"
            kinds.add(crd["spec"]["names"]["kind"])
    assert kinds == {"VolumeSnapshot", "VolumeSnapshotContent", "VolumeSnapshotClass",
                     "VolumeGroupSnapshot", "VolumeGroupSnapshotContent",
                     "VolumeGroupSnapshotClass"}


# -- kustomize --------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", sorted(DEPLOY.rglob("kustomization.yaml")), ids=rel)
def test_kustomization_lists_exactly_its_manifests(kustomization: Path) -> None:
    """Every resource it names exists, and every manifest beside it (and in
    subdirectories without their own kustomization) is part of it, except
    examples, which are applied step by step."""
    base = kustomization.parent
    listed = {(base / r).resolve() for r in load_documents(kustomization)[0]["resources"]}
    for resource in listed:
        assert resource.is_file(), f"{rel(kustomization)} names missing {resource}"
    expected = set()
    for path in base.rglob("*.yaml"):
        if path == kustomization or "examples" in path.relative_to(base).parts:
            continue
        owner = next(p for p in [path.parent, *path.parents] if (p / "kustomization.yaml").exists())
        if owner == base:
            expected.add(path.resolve())
    assert listed == expected, (f"{rel(kustomization)}: not listed "
                                f"{sorted(map(str, expected - listed))}, listed but not here "
                                f"{sorted(map(str, listed - expected))}")


# -- the DaemonSet and its sidecars ------------------------------------------------

def containers(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def volumes(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}


def flags(container: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (every sidecar here uses that form)."""
    out = {}
    for arg in container.get("args", []):
        assert arg.startswith("-") and "=" in arg, \
            f"{container['name']}: argument {arg!r} is not --flag=value"
        name, _, value = arg.partition("=")
        assert name not in out, f"{container['name']}: {name} given twice"
        out[name.lstrip("-")] = value
    return out


def env_names(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def expand_env(container: dict[str, Any], arg: str, values: dict[str, str]) -> str:
    """Substitute ``$(VAR)`` as the kubelet does; every VAR must be defined
    in the container's env."""
    defined = env_names(container)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in defined, f"{container['name']}: $({name}) is not in its env"
        return values[name]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def host_path_of(ds: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The node path behind ``path`` inside ``container``, through its
    hostPath mounts (longest mount prefix wins)."""
    vols = volumes(ds)
    best = None
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if path == mount or path.startswith(mount + "/"):
            if best is None or len(mount) > len(best[0]):
                best = (mount, vols[m["name"]])
    assert best is not None, f"{container['name']}: {path} is on no mounted volume"
    mount, volume = best
    assert "hostPath" in volume, f"{container['name']}: {path} is not on a hostPath volume"
    return volume["hostPath"]["path"].rstrip("/") + path[len(mount):]


def unix_path(address: str) -> str:
    return address.removeprefix("unix://")


@pytest.fixture(scope="module")
def daemonset(manifests: Manifests) -> dict[str, Any]:
    return manifests.one("DaemonSet", "qsnap-node")


@pytest.fixture(scope="module")
def driver_flags() -> set[str]:
    """The long option names ``python -m csidriver --help`` lists: the
    driver's real command line."""
    done = subprocess.run([sys.executable, "-m", "csidriver", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    names = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", done.stdout))
    assert {"endpoint", "pool", "nodeid", "drivername"} <= names, done.stdout
    return names


def qsnap_args(ds: dict[str, Any]) -> list[str]:
    c = containers(ds)["qsnap"]
    return [expand_env(c, a, {"NODE_NAME": "kind-control-plane"}) for a in c["args"]]


def test_driver_args_parse_with_the_drivers_own_parser(daemonset: dict[str, Any],
                                                       driver_flags: set[str],
                                                       manifests: Manifests) -> None:
    from csidriver import server

    args = qsnap_args(daemonset)
    for arg in args:
        name = arg.split("=", 1)[0]
        # argparse would accept a unique prefix; the manifest must spell flags out.
        assert name.startswith("--") and name[2:] in driver_flags, \
            f"qsnap container: {name} is not a flag of the driver ({sorted(driver_flags)})"
    options = server.parse_args(args)   # exits (fails the test) on a bad value
    c = containers(daemonset)["qsnap"]
    endpoint = server.parse_endpoint(options.endpoint)
    assert endpoint.socket is not None, "the driver must listen on a unix socket"
    assert options.nodeid == "kind-control-plane", "--nodeid must be the node name"
    assert env_names(c)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert options.drivername == manifests.one("CSIDriver")["metadata"]["name"]
    # The pool is a host directory: volumes outlive the pod.
    assert host_path_of(daemonset, c, str(options.pool_root)) == str(options.pool_root)
    # kind nodes run no libvirtd: the driver is told so rather than failing
    # to reach it at every cut (docs/kubernetes.md, --libvirt-uri).
    assert "--libvirt-uri=none" in args
    assert options.libvirt_uri == "", "--libvirt-uri=none must turn libvirt off"


def test_driver_container_is_privileged_with_the_mounts_it_needs(
        daemonset: dict[str, Any]) -> None:
    c = containers(daemonset)["qsnap"]
    assert c["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/lib/kubelet"].get("mountPropagation") == "Bidirectional"
    assert host_path_of(daemonset, c, "/var/lib/kubelet") == "/var/lib/kubelet"
    assert host_path_of(daemonset, c, "/dev") == "/dev"
    assert host_path_of(daemonset, c, "/run/libvirt") == "/run/libvirt"
    assert c["imagePullPolicy"] == "IfNotPresent", "qsnap:dev is loaded, never pulled"


def test_sidecars_talk_to_the_drivers_socket(daemonset: dict[str, Any]) -> None:
    cs = containers(daemonset)
    assert set(cs) == {"qsnap", "node-driver-registrar", "csi-provisioner", "csi-snapshotter",
                       "csi-resizer", "liveness-probe"}
    from csidriver import server
    options = server.parse_args(qsnap_args(daemonset))
    socket_in_pod = str(server.parse_endpoint(options.endpoint).socket)
    socket_on_node = host_path_of(daemonset, cs["qsnap"], socket_in_pod)
    for name, c in cs.items():
        if name == "qsnap":
            continue
        address = flags(c)["csi-address"]
        assert host_path_of(daemonset, c, unix_path(address)) == socket_on_node, \
            f"{name}: --csi-address {address} is not the driver's socket {socket_on_node}"
    registrar = flags(cs["node-driver-registrar"])
    assert registrar["kubelet-registration-path"] == socket_on_node, \
        "the kubelet must find the driver's socket at --kubelet-registration-path"
    assert socket_on_node.startswith("/var/lib/kubelet/plugins/")
    reg_mounts = {m["mountPath"] for m in cs["node-driver-registrar"]["volumeMounts"]}
    assert "/registration" in reg_mounts
    assert host_path_of(daemonset, cs["node-driver-registrar"], "/registration") == \
        "/var/lib/kubelet/plugins_registry"


def test_node_deployment_sidecars(daemonset: dict[str, Any], manifests: Manifests) -> None:
    cs = containers(daemonset)
    for name in ("csi-provisioner", "csi-snapshotter"):
        f = flags(cs[name])
        assert f.get("node-deployment") == "true", f"{name} must run with --node-deployment"
        node = env_names(cs[name]).get("NODE_NAME")
        assert node and node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", \
            f"{name}: node deployment needs NODE_NAME from spec.nodeName"
    assert flags(cs["csi-snapshotter"]).get("leader-election") == "false"
    prov = flags(cs["csi-provisioner"])
    assert prov.get("enable-capacity") == "true"
    assert prov.get("capacity-ownerref-level") == "1", "the DaemonSet owns the capacity objects"
    assert {"NAMESPACE", "POD_NAME"} <= set(env_names(cs["csi-provisioner"]))
    assert prov.get("strict-topology") == "true"
    assert manifests.one("CSIDriver")["spec"]["storageCapacity"] is True
    # The snapshot-controller must mark contents with their node for the
    # node-deployment csi-snapshotter to take them.
    ctrl = manifests.one("Deployment", "snapshot-controller")
    ctrl_args = ctrl["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-distributed-snapshotting=true" in ctrl_args
    # The resizer has no node mode: leader election keeps it to one instance.
    assert flags(cs["csi-resizer"]).get("leader-election") == "true"
    # The liveness probe sidecar serves the driver container's probe port.
    port = {p["name"]: p["containerPort"] for p in cs["qsnap"]["ports"]}["healthz"]
    assert flags(cs["liveness-probe"])["health-port"] == str(port)
    assert cs["qsnap"]["livenessProbe"]["httpGet"]["port"] == "healthz"


def test_images_are_pinned_to_releases(daemonset: dict[str, Any], manifests: Manifests) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    images = {c["name"]: c["image"] for c in containers(daemonset).values()}
    ctrl = manifests.one("Deployment", "snapshot-controller")
    images["snapshot-controller"] = ctrl["spec"]["template"]["spec"]["containers"][0]["image"]
    tags = {}
    for name, image in images.items():
        if name == "qsnap":
            assert image == "qsnap:dev"
            continue
        assert image.startswith(SIDECAR_REGISTRY), f"{name}: {image}"
        repo, _, tag = image.rpartition(":")
        assert RELEASE_TAG.match(tag), f"{name}: {image} is not pinned to a release"
        tags[name] = tag
        assert image in docs, f"docs/kubernetes.md does not state the image {image}"
    # One external-snapshotter release for the controller, the sidecar and the CRDs.
    assert tags["csi-snapshotter"] == tags["snapshot-controller"]


def test_rbac_covers_the_pods(manifests: Manifests, daemonset: dict[str, Any]) -> None:
    accounts = {(o["metadata"].get("namespace"), o["metadata"]["name"])
                for o in manifests.of_kind("ServiceAccount")}
    roles = {("ClusterRole", o["metadata"]["name"]) for o in manifests.of_kind("ClusterRole")}
    roles |= {("Role", o["metadata"]["name"]) for o in manifests.of_kind("Role")}
    for workload in [daemonset, manifests.one("Deployment", "snapshot-controller")]:
        ns = workload["metadata"]["namespace"]
        assert (ns, workload["spec"]["template"]["spec"]["serviceAccountName"]) in accounts
    bound = set()
    for binding in [*manifests.of_kind("ClusterRoleBinding"), *manifests.of_kind("RoleBinding")]:
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles, \
            f"{binding['metadata']['name']} binds a role deploy/ does not define"
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts
            bound.add((subject["name"], binding["roleRef"]["name"]))
    node_roles = {r for sa, r in bound if sa == "qsnap-node"}
    assert {"qsnap-external-provisioner", "qsnap-external-snapshotter",
            "qsnap-external-resizer", "qsnap-external-provisioner-capacity",
            "qsnap-external-resizer-leaderelection"} <= node_roles
    capacity = manifests.one("Role", "qsnap-external-provisioner-capacity")
    assert any("daemonsets" in r["resources"] and "get" in r["verbs"]
               for r in capacity["rules"]), "capacity owner (the DaemonSet) must be readable"


def test_classes_and_driver_name_agree(manifests: Manifests) -> None:
    name = manifests.one("CSIDriver")["metadata"]["name"]
    sc = manifests.one("StorageClass", "qsnap")
    vsc = manifests.one("VolumeSnapshotClass", "qsnap")
    assert sc["provisioner"] == name == vsc["driver"]
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    spec = manifests.one("CSIDriver")["spec"]
    assert spec["attachRequired"] is False and spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["fsGroupPolicy"] == "File"
    assert vsc["metadata"]["annotations"]["snapshot.storage.kubernetes.io/is-default-class"] \
        == "true"


def test_docs_cover_every_class_parameter(manifests: Manifests) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for kind in ("StorageClass", "VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        for obj in manifests.of_kind(kind):
            for key in obj.get("parameters") or {}:
                assert f"`{key}`" in docs, f"docs/kubernetes.md does not document {key}"


# -- volume group snapshots ----------------------------------------------------------

GROUP_EXAMPLE = K8S / "examples" / "group-snapshot"


def feature_gates(value: str, where: str) -> dict[str, bool]:
    """A ``--feature-gates`` value (``A=true,B=false``) as a dict; every
    entry must be well formed, as component-base's map flag demands."""
    gates = {}
    for entry in value.split(","):
        name, sep, setting = entry.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Za-z0-9]*", name) and setting in ("true", "false"), \
            f"{where}: malformed feature gate {entry!r} in --feature-gates={value}"
        assert name not in gates, f"{where}: feature gate {name} given twice"
        gates[name] = setting == "true"
    return gates


def controller_args(manifests: Manifests) -> list[str]:
    ctrl = manifests.one("Deployment", "snapshot-controller")
    return ctrl["spec"]["template"]["spec"]["containers"][0]["args"]


def test_group_snapshot_feature_gates(daemonset: dict[str, Any], manifests: Manifests) -> None:
    """Both external-snapshotter components serve group snapshots: the gate,
    by its exact name, in the --feature-gates flag v8 uses (v7's
    --enable-volume-group-snapshots no longer exists)."""
    sidecar = flags(containers(daemonset)["csi-snapshotter"])
    assert "feature-gates" in sidecar, "csi-snapshotter needs --feature-gates"
    assert feature_gates(sidecar["feature-gates"], "csi-snapshotter") == {GROUP_GATE: True}
    ctrl = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in controller_args(manifests) if "=" in a}
    assert "--feature-gates" in ctrl, "snapshot-controller needs --feature-gates"
    assert feature_gates(ctrl["--feature-gates"], "snapshot-controller") == {GROUP_GATE: True}
    for args in (containers(daemonset)["csi-snapshotter"]["args"], controller_args(manifests)):
        assert not any(a.startswith("--enable-volume-group-snapshots") for a in args), \
            "v7's --enable-volume-group-snapshots flag is gone in v8"
    # The API version the pinned release uses is the vendored CRDs' storage
    # version, and every group object here uses it.
    for crd in crd_documents():
        if crd["spec"]["group"] == "groupsnapshot.storage.k8s.io":
            storage = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
            assert storage == [GROUP_API_VERSION], f"{crd['metadata']['name']}: {storage}"
    for _, obj in manifests.objects:
        if group_of(obj) == "groupsnapshot.storage.k8s.io":
            assert obj["apiVersion"] == f"groupsnapshot.storage.k8s.io/{GROUP_API_VERSION}", \
                f"{obj['kind']} {obj['metadata']['name']}: {obj['apiVersion']}"


def granted(manifests: Manifests, role_kind: str, role_name: str) -> dict[tuple[str, str], set[str]]:
    """(API group, resource) -> verbs that one role grants."""
    role = manifests.one(role_kind, role_name)
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for api_group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((api_group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_covers_group_snapshots(manifests: Manifests) -> None:
    """What each component does with the group-snapshot API (upstream's
    rbac-csi-snapshotter.yaml and rbac-snapshot-controller.yaml)."""
    G, S = "groupsnapshot.storage.k8s.io", "snapshot.storage.k8s.io"
    sidecar = granted(manifests, "ClusterRole", "qsnap-external-snapshotter")
    needs = {
        (G, "volumegroupsnapshotclasses"): {"get", "list", "watch"},
        (G, "volumegroupsnapshotcontents"): {"get", "list", "watch", "update", "patch"},
        (G, "volumegroupsnapshotcontents/status"): {"update", "patch"},
    }
    for key, verbs in needs.items():
        assert verbs <= sidecar.get(key, set()), f"csi-snapshotter: {key} needs {verbs}"
    ctrl = granted(manifests, "ClusterRole", "snapshot-controller-runner")
    needs = {
        (G, "volumegroupsnapshotclasses"): {"get", "list", "watch"},
        (G, "volumegroupsnapshotcontents"): {"create", "get", "list", "watch", "update",
                                             "delete", "patch"},
        (G, "volumegroupsnapshotcontents/status"): {"patch"},
        (G, "volumegroupsnapshots"): {"get", "list", "watch", "update", "patch"},
        (G, "volumegroupsnapshots/status"): {"update", "patch"},
        # The members: one VolumeSnapshot and content per volume of a group.
        (S, "volumesnapshots"): {"create", "get", "list", "watch", "update", "patch", "delete"},
        (S, "volumesnapshots/status"): {"update", "patch"},
        (S, "volumesnapshotcontents"): {"create", "get", "list", "watch", "update", "patch",
                                        "delete"},
        (S, "volumesnapshotcontents/status"): {"patch"},
    }
    for key, verbs in needs.items():
        assert verbs <= ctrl.get(key, set()), f"snapshot-controller: {key} needs {verbs}"


def test_group_snapshot_class_and_example(manifests: Manifests) -> None:
    """The group class names the driver and is its one default; the example
    VolumeGroupSnapshot selects exactly its claims (by matchLabels only:
    snapshot-controller v8.5.0 lists claims by the selector's matchLabels and
    ignores matchExpressions), qsnap claims that one pod uses, so that they
    are created in one node's pool."""
    driver = manifests.one("CSIDriver")["metadata"]["name"]
    classes = {c["metadata"]["name"]: c for c in manifests.of_kind("VolumeGroupSnapshotClass")}
    assert classes, "no VolumeGroupSnapshotClass"
    for c in classes.values():
        assert c["driver"] == driver, f"VolumeGroupSnapshotClass {c['metadata']['name']}"
        # A node label would send every group of every node to one node.
        assert MANAGED_BY not in c["metadata"].get("labels", {}), \
            "a shipped group class must not be pinned to one node"
    defaults = [n for n, c in classes.items()
                if c["metadata"].get("annotations", {}).get(
                    "groupsnapshot.storage.kubernetes.io/is-default-class") == "true"]
    assert defaults == ["qsnap-group"], defaults
    # Neither "k8s.io" spelling nor the VolumeSnapshotClass key marks a group default.
    for c in classes.values():
        for key in c["metadata"].get("annotations", {}):
            assert key in ("groupsnapshot.storage.kubernetes.io/is-default-class",), \
                f"VolumeGroupSnapshotClass {c['metadata']['name']}: unexpected annotation {key}"

    example = [o for p, o in manifests.objects if GROUP_EXAMPLE in p.parents]
    snaps = [o for o in example if o["kind"] == "VolumeGroupSnapshot"]
    assert len(snaps) == 1
    vgs = snaps[0]
    assert vgs["spec"]["volumeGroupSnapshotClassName"] in classes
    selector = vgs["spec"]["source"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"], \
        "snapshot-controller v8.5.0 honours matchLabels only"
    wanted = selector["matchLabels"].items()
    claims = [o for o in example if o["kind"] == "PersistentVolumeClaim"]
    matched = {c["metadata"]["name"] for c in claims
               if wanted <= c["metadata"].get("labels", {}).items()}
    assert len(matched) >= 2, f"the selector matches {sorted(matched)}: a group needs two"
    assert matched == {c["metadata"]["name"] for c in claims}, \
        "every claim of the example belongs to the group"
    for obj in (vgs, *claims):
        assert "namespace" not in obj["metadata"], \
            f"{obj['metadata']['name']}: examples take the namespace they are applied to"
    provisioners = {o["metadata"]["name"]: o["provisioner"] for o in manifests.of_kind("StorageClass")}
    for c in claims:
        assert provisioners[c["spec"]["storageClassName"]] == driver, c["metadata"]["name"]
    pods = [o for o in example if o["kind"] == "Pod"]
    assert any({v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                if "persistentVolumeClaim" in v} >= matched for pod in pods), \
        "one pod must use every member, or the volumes may land on different nodes"
    # The files are applied in order: claims and pod before the snapshot.
    order = sorted(GROUP_EXAMPLE.glob("*.yaml"))
    kinds_in_order = [o["kind"] for path in order for o in load_documents(path)]
    assert kinds_in_order.index("VolumeGroupSnapshot") == len(kinds_in_order) - 1


def test_docs_describe_group_snapshots_and_libvirt() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    assert f"--feature-gates={GROUP_GATE}=true" in docs
    assert MANAGED_BY in docs, "the node-deployment label workaround must be documented"
    assert "--libvirt-uri=none" in docs and "qemu:///system" in docs
    for indication in ("Online", "Offline", "GuestAgent", "NoGuestAgent", "QuiesceFailed",
                       "QuiesceTimeout", "QuiesceDisabled", "Paused", "FilesystemFrozen"):
        assert f"| `{indication}` |" in docs, f"docs/kubernetes.md: indication {indication}"


# -- KubeVirt, CDI, kind, scripts, image ---------------------------------------------

def test_kubevirt_example(manifests: Manifests) -> None:
    """No KubeVirt or CDI schema is available offline: validate the core
    parts (DataVolume storage specs as PersistentVolumeClaims, metadata as
    ObjectMeta) and check that every reference resolves."""
    sc_names = {o["metadata"]["name"] for o in manifests.of_kind("StorageClass")}
    vsc_names = {o["metadata"]["name"] for o in manifests.of_kind("VolumeSnapshotClass")}
    pvc_names = {o["metadata"]["name"] for o in manifests.of_kind("PersistentVolumeClaim")}
    vms = manifests.of_kind("VirtualMachine", "kubevirt.io")
    assert vms, "no KubeVirt VirtualMachine example"
    for vm in vms:
        validate_metadata(vm, "VirtualMachine")
        templates = {}
        for dv in vm["spec"].get("dataVolumeTemplates", []):
            claim_spec = dv["spec"].get("storage") or dv["spec"].get("pvc")
            assert claim_spec, f"DataVolume {dv['metadata']['name']} has no storage/pvc spec"
            validate_core({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": dv["metadata"], "spec": claim_spec},
                          f"VirtualMachine {vm['metadata']['name']} DataVolume")
            assert claim_spec["storageClassName"] in sc_names
            templates[dv["metadata"]["name"]] = dv
        for volume in vm["spec"]["template"]["spec"]["volumes"]:
            if "dataVolume" in volume:
                assert volume["dataVolume"]["name"] in templates
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvc_names
        disks = {d["name"] for d in vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"]}
        assert disks == {v["name"] for v in vm["spec"]["template"]["spec"]["volumes"]}
    vm_names = {vm["metadata"]["name"] for vm in vms}
    snap = manifests.one("VirtualMachineSnapshot", api_group="snapshot.kubevirt.io")
    validate_metadata(snap, "VirtualMachineSnapshot")
    assert snap["spec"]["source"]["name"] in vm_names
    restore = manifests.one("VirtualMachineRestore", api_group="snapshot.kubevirt.io")
    validate_metadata(restore, "VirtualMachineRestore")
    assert restore["spec"]["target"]["name"] in vm_names
    assert restore["spec"]["virtualMachineSnapshotName"] == snap["metadata"]["name"]
    profile = manifests.one("StorageProfile", api_group="cdi.kubevirt.io")
    validate_metadata(profile, "StorageProfile")
    # CDI names a StorageProfile after its StorageClass.
    assert profile["metadata"]["name"] in sc_names
    assert profile["spec"]["snapshotClass"] in vsc_names


def test_kind_config_mounts_the_pool_and_dev(manifests: Manifests,
                                             daemonset: dict[str, Any]) -> None:
    cluster = manifests.one("Cluster", api_group=KIND_GROUP)
    pool = volumes(daemonset)["pool"]["hostPath"]["path"]
    for node in cluster["nodes"]:
        mounts = {m["containerPath"]: m["hostPath"] for m in node.get("extraMounts", [])}
        assert mounts.get(pool) == pool, f"kind node does not mount the pool {pool}"
        assert mounts.get("/dev") == "/dev"


SCRIPTS = [ROOT / "hack" / "kind-up.sh", ROOT / "hack" / "kind-down.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_script_syntax(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_kind_up_uses_the_files_that_exist() -> None:
    text = (ROOT / "hack" / "kind-up.sh").read_text(encoding="utf-8")
    for ref in re.findall(r"\$repo/([A-Za-z0-9_./-]+)", text):
        assert (ROOT / ref).exists(), f"kind-up.sh refers to missing {ref}"
    examples = ROOT / "deploy" / "kubernetes" / "examples" / "snapshot-restore"
    used = set(re.findall(r"\$examples/([A-Za-z0-9_.-]+)", text))
    assert used == {p.name for p in examples.glob("*.yaml")}, \
        "kind-up.sh's smoke test must run every snapshot-restore example step"
    crds = {d["metadata"]["name"] for d in crd_documents()}
    assert set(re.findall(r"crd/([a-z0-9.]+)", text)) == crds, \
        "kind-up.sh must wait for exactly the vendored CRDs"
    assert re.search(r"kindest/node:v" + re.escape(KUBERNETES_VERSION) + r"@sha256:[0-9a-f]{64}",
                     text), "the kind node image must be the validated version, by digest"


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_containerfile() -> None:
    text = (ROOT / "Containerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM debian:12(-slim)?(@sha256:[0-9a-f]{64})?$", text, re.M)
    packages = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", " ".join(
        re.findall(r"apt-get install[^\n]*((?:\n[ \t]+[^\n]*\\?)*)", text))))
    needed = {"python3", "python3-venv", "qemu-utils", "qemu-system-common", "e2fsprogs",
              "xfsprogs", "util-linux", "fuse3", "libvirt0", "kmod"}
    assert needed <= packages, f"Containerfile misses {sorted(needed - packages)}"
    copied = [shlex.split(line)[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    sources = {s for srcs in copied for s in srcs}
    assert {"pyproject.toml", "README.md", "engine", "csidriver"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), f"Containerfile copies missing {source}"
        for pattern in dockerignore_patterns():
            assert not fnmatch.fnmatch(source, pattern.lstrip("/")), \
                f".dockerignore ({pattern}) hides {source} from the build"
    assert 'ENTRYPOINT ["/opt/qsnap/bin/python", "-m", "csidriver"]' in text


# -- the real driver serves what the sidecars expect ----------------------------------

def daemonset_driver_flags(ds: dict[str, Any]) -> list[str]:
    """The DaemonSet's flags for the driver, less the ones the test server
    sets itself (socket, pool and node of the test)."""
    own = ("--endpoint", "--pool", "--nodeid")
    return [a for a in qsnap_args(ds) if not a.startswith(own)]


def test_driver_serves_what_the_sidecars_expect(driver_factory: Any, daemonset: dict[str, Any],
                                                manifests: Manifests) -> None:
    import grpc

    from csidriver.pb import csi_pb2, csi_pb2_grpc

    driver = driver_factory(*daemonset_driver_flags(daemonset))
    probe = driver.identity.Probe(csi_pb2.ProbeRequest())
    assert probe.ready.value is True

    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    csidriver = manifests.one("CSIDriver")
    assert info.name == csidriver["metadata"]["name"] \
        == manifests.one("StorageClass", "qsnap")["provisioner"] \
        == manifests.one("VolumeSnapshotClass", "qsnap")["driver"]

    Service = csi_pb2.PluginCapability.Service
    plugin = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    expansion = [c.volume_expansion.type for c in plugin.capabilities
                 if c.HasField("volume_expansion")]
    # csi-provisioner, csi-snapshotter and csi-resizer talk to the Controller
    # service; csi-resizer also needs a volume expansion plugin capability.
    assert Service.CONTROLLER_SERVICE in services
    assert expansion and expansion[0] != csi_pb2.PluginCapability.VolumeExpansion.UNKNOWN

    RPC = csi_pb2.ControllerServiceCapability.RPC
    ctrl = driver.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    rpcs = {c.rpc.type for c in ctrl.capabilities}
    assert RPC.CREATE_DELETE_VOLUME in rpcs      # csi-provisioner
    assert RPC.GET_CAPACITY in rpcs              # csi-provisioner --enable-capacity
    assert RPC.CREATE_DELETE_SNAPSHOT in rpcs    # csi-snapshotter
    assert RPC.EXPAND_VOLUME in rpcs             # csi-resizer
    # attachRequired: false in the CSIDriver object is only right without
    # ControllerPublishVolume.
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in rpcs

    # The deployed classes' parameters are accepted, as the sidecars send
    # them: the StorageClass's csi.storage.k8s.io/fstype becomes the
    # capability's fs_type (csi-provisioner strips it), --extra-create-metadata
    # adds the PVC/PV and VolumeSnapshot names.
    sc = manifests.one("StorageClass", "qsnap")
    params = dict(sc.get("parameters") or {})
    fs_type = params.pop("csi.storage.k8s.io/fstype", "")
    params.update({"csi.storage.k8s.io/pvc/name": "claim",
                   "csi.storage.k8s.io/pvc/namespace": "default",
                   "csi.storage.k8s.io/pv/name": "pvc-1"})
    Mode = csi_pb2.VolumeCapability.AccessMode
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    node = csi_pb2_grpc.NodeStub(driver.channel)
    try:
        node_info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
        node_info = None
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1", volume_capabilities=[capability], parameters=params,
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30))
    if node_info is not None:
        # With --strict-topology the provisioner asks for the selected node's
        # segment, exactly as NodeGetInfo reported it.
        request.accessibility_requirements.requisite.add().CopyFrom(
            node_info.accessible_topology)
        request.accessibility_requirements.preferred.add().CopyFrom(
            node_info.accessible_topology)
    volume = driver.controller.CreateVolume(request).volume
    vsc = manifests.one("VolumeSnapshotClass", "qsnap")
    snap_params = dict(vsc.get("parameters") or {})
    snap_params.update({"csi.storage.k8s.io/volumesnapshot/name": "snap",
                        "csi.storage.k8s.io/volumesnapshot/namespace": "default",
                        "csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-1"})
    snapshot = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snapshot-1", source_volume_id=volume.volume_id, parameters=snap_params)).snapshot
    assert snapshot.ready_to_use

    if node_info is None:
        return  # No Node service yet: nothing to assert about node info or topology.
    # node-driver-registrar hands NodeGetInfo to the kubelet; the node ID
    # must be the node name (--nodeid=$(NODE_NAME)) and the topology segment
    # the one the StorageClass's volumes are pinned to.
    assert node_info.node_id == driver.nodeid
    assert dict(node_info.accessible_topology.segments) == {TOPOLOGY_KEY: driver.nodeid}
    # The node-deployment sidecars need the volume's node: csi-provisioner
    # writes it into the PV's node affinity, which snapshot-controller
    # (--enable-distributed-snapshotting) reads to pick a node's csi-snapshotter.
    assert Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    assert [dict(t.segments) for t in volume.accessible_topology] == \
        [{TOPOLOGY_KEY: driver.nodeid}]


def test_driver_serves_group_snapshots_and_every_class(driver_factory: Any,
                                                       daemonset: dict[str, Any],
                                                       manifests: Manifests) -> None:
    """With csi-snapshotter's CSIVolumeGroupSnapshot gate on, the sidecar
    asks GroupControllerGetCapabilities for CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT;
    every snapshot and group class under deploy/ (examples included) must
    pass the driver's parameter checks as the sidecar sends them."""
    import grpc

    from csidriver.pb import csi_pb2, csi_pb2_grpc

    driver = driver_factory(*daemonset_driver_flags(daemonset))
    plugin = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in services
    group = csi_pb2_grpc.GroupControllerStub(driver.channel)
    caps = group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    assert csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT \
        in {c.rpc.type for c in caps.capabilities}

    Mode = csi_pb2.VolumeCapability.AccessMode
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    volumes = [driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=f"pvc-{i}", volume_capabilities=[capability],
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30))).volume.volume_id
        for i in range(2)]

    def accepted(what: str, call: Any) -> Any:
        """The call's response; a refusal other than INVALID_ARGUMENT is
        the driver's judgement of the guests (guest-agent required), not of
        the parameters, and passes."""
        try:
            return call()
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {e.details()}"
            return None

    vscs = manifests.of_kind("VolumeSnapshotClass")
    assert {"qsnap", "qsnap-fsfreeze", "qsnap-vm-consistent"} <= \
        {c["metadata"]["name"] for c in vscs}
    for i, vsc in enumerate(vscs):
        params = dict(vsc.get("parameters") or {})
        params.update({"csi.storage.k8s.io/volumesnapshot/name": f"snap-{i}",
                       "csi.storage.k8s.io/volumesnapshot/namespace": "default",
                       "csi.storage.k8s.io/volumesnapshotcontent/name": f"snapcontent-{i}"})
        accepted(f"VolumeSnapshotClass {vsc['metadata']['name']}",
                 lambda: driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                     name=f"snapshot-{i}", source_volume_id=volumes[0], parameters=params)))

    for i, vgsc in enumerate(manifests.of_kind("VolumeGroupSnapshotClass")):
        params = dict(vgsc.get("parameters") or {})
        # csi-snapshotter --extra-create-metadata, for groups.
        params.update({"csi.storage.k8s.io/volumegroupsnapshot/name": f"group-{i}",
                       "csi.storage.k8s.io/volumegroupsnapshot/namespace": "default",
                       "csi.storage.k8s.io/volumegroupsnapshotcontent/name": f"groupcontent-{i}"})
        response = accepted(
            f"VolumeGroupSnapshotClass {vgsc['metadata']['name']}",
            lambda: group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
                name=f"groupsnapshot-{i}", source_volume_ids=volumes, parameters=params)))
        assert response is not None, "the default group class must cut"
        members = response.group_snapshot.snapshots
        assert sorted(m.source_volume_id for m in members) == sorted(volumes)
        assert response.group_snapshot.ready_to_use
        assert all(m.group_snapshot_id == response.group_snapshot.group_snapshot_id
                   for m in members)
