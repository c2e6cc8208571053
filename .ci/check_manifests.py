#!/usr/bin/env python3
"""Asserts what the deployment promises about the rendered Kubernetes manifests.

Usage: check_manifests.py README.md RENDERED.yaml...   (run by .ci/k8s.sh on `kubectl kustomize`
output; needs PyYAML, which the CI venv has through checkov)
       check_manifests.py README.md --self-test RENDERED.yaml   (each breakage in MUTATIONS,
       applied alone to a good render, must fail the checks)

checkov and kubernetes-validate cover generic rules and the schemas; this covers what is
specific to gmail-sync, in every render (base, example overlay, overlay + each component):

- the worker listens on nothing: no container `ports`, no host networking, a NetworkPolicy with
  no ingress rule and no allow-all egress;
- the exec probes `gmail-sync health --live` (startup, liveness) and `--ready` (readiness);
- restricted pod security: runAsNonRoot with a numeric non-root user, seccomp RuntimeDefault,
  no privilege escalation, read-only root filesystem, ALL capabilities dropped and none added;
- no Kubernetes API token (automountServiceAccountToken: false on the pod and the account);
- secrets only as read-only files, never as environment variables; every *_FILE variable points
  into a read-only Secret mount; GMAIL_SYNC_HEALTH_DIR is the writable emptyDir;
- every GMAIL_SYNC_* variable set is one README's variable table documents;
- selectors hold app.kubernetes.io/name only (immutable in a Deployment: nothing that changes);
- terminationGracePeriodSeconds exceeds the worker's stop budget (ARCHITECTURE.md "Tasks and
  shutdown": GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS + 10 s stream flush + 5 s supervisor slack + 5 s
  background tasks); the rollout never lowers capacity (maxUnavailable 0); a PDB exists;
- the image is pinned by digest;
- a KEDA ScaledObject (not covered by the Kubernetes schemas) targets the Deployment, keeps
  at least 2 replicas, scales down through HPA behavior rather than cooldownPeriod (which only
  applies to scaling to zero), and the Deployment then has no `replicas`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

APP = "gmail-sync"
SELECTOR = {"app.kubernetes.io/name": APP}
LIVE = ["gmail-sync", "health", "--live"]
READY = ["gmail-sync", "health", "--ready"]
# ARCHITECTURE.md "Tasks and shutdown": stream flush (10) + supervisor slack (5) + background (5).
STOP_BUDGET_BEYOND_SHUTDOWN_TIMEOUT = 20
DEFAULT_SHUTDOWN_TIMEOUT = 30
DEFAULT_HEALTH_DIR = "/tmp/gmail-sync"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


class Checker:
    def __init__(self, documented: set[str]):
        self.documented = documented
        self.errors: list[str] = []
        self.count = 0
        self.where = ""

    def check(self, ok: bool, what: str) -> bool:
        self.count += 1
        if not ok:
            self.errors.append(f"{self.where}: {what}")
        return ok


def documented_variables(readme: Path) -> set[str]:
    names = set(re.findall(r"^\| `(GMAIL_SYNC_[A-Z0-9_]+)` \|", readme.read_text(), re.M))
    if len(names) < 20:
        sys.exit(f"check_manifests: found only {len(names)} variables in {readme}'s table")
    return names


def selector_ok(c: Checker, what: str, labels: dict | None) -> None:
    c.check(labels == SELECTOR, f"{what} selects {labels!r}; it must be exactly {SELECTOR!r}")


def check_render(c: Checker, docs: list[dict]) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", "?"), []).append(d)

    deployments = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == APP]
    if not c.check(len(deployments) == 1, "exactly one Deployment gmail-sync"):
        return
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]

    # --- no listener, no host namespaces ---
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        c.check(not pod.get(k, False), f"pod {k} must not be set")
    containers = pod.get("containers", [])
    c.check(len(containers) == 1, "one container")
    c.check(not pod.get("initContainers"), "no init containers")
    ctr = containers[0]
    c.check("ports" not in ctr, "the container must declare no ports (the worker listens on nothing)")

    # --- probes ---
    def probe_cmd(name: str):
        return ((ctr.get(name) or {}).get("exec") or {}).get("command")

    c.check(probe_cmd("startupProbe") == LIVE, f"startupProbe must exec {LIVE}")
    c.check(probe_cmd("livenessProbe") == LIVE, f"livenessProbe must exec {LIVE}")
    c.check(probe_cmd("readinessProbe") == READY, f"readinessProbe must exec {READY}")

    # --- restricted pod security ---
    psc = pod.get("securityContext") or {}
    csc = ctr.get("securityContext") or {}
    c.check(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot: true")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    c.check(isinstance(uid, int) and uid > 0, f"a numeric non-root runAsUser (got {uid!r})")
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    c.check(seccomp == "RuntimeDefault", f"seccompProfile RuntimeDefault (got {seccomp!r})")
    c.check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    c.check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
    c.check(not csc.get("privileged", False), "not privileged")
    caps = csc.get("capabilities") or {}
    c.check(caps.get("drop") == ["ALL"], f"capabilities.drop [ALL] (got {caps.get('drop')!r})")
    c.check(not caps.get("add"), "no capabilities added")

    # --- service account token ---
    c.check(pod.get("automountServiceAccountToken") is False, "pod automountServiceAccountToken: false")
    sa_name = pod.get("serviceAccountName")
    sas = [d for d in by_kind.get("ServiceAccount", []) if d["metadata"]["name"] == sa_name]
    if c.check(len(sas) == 1, f"the ServiceAccount {sa_name!r} is part of the render"):
        c.check(sas[0].get("automountServiceAccountToken") is False,
                "ServiceAccount automountServiceAccountToken: false")
        c.check("iam.gke.io/gcp-service-account" in (sas[0]["metadata"].get("annotations") or {}),
                "ServiceAccount annotated iam.gke.io/gcp-service-account (Workload Identity)")

    # --- resources ---
    res = ctr.get("resources") or {}
    for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        c.check(path[1] in (res.get(path[0]) or {}), f"resources.{path[0]}.{path[1]} is set")

    # --- environment: names documented, secrets only as files ---
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in by_kind.get("ConfigMap", [])}
    env: dict[str, str | None] = {}
    for src in ctr.get("envFrom", []):
        c.check("secretRef" not in src, "no envFrom secretRef: secrets are mounted as files")
        ref = (src.get("configMapRef") or {}).get("name")
        if ref is not None and c.check(ref in configmaps, f"envFrom ConfigMap {ref!r} is part of the render"):
            env.update(configmaps[ref])
    for e in ctr.get("env", []):
        vf = e.get("valueFrom") or {}
        c.check("secretKeyRef" not in vf, f"env {e['name']} must not come from a Secret (mount it as a file)")
        env[e["name"]] = e.get("value")
    for name in env:
        if name.startswith("GMAIL_SYNC_"):
            c.check(name in c.documented, f"{name} is not in README's variable table")
    for name in ("GMAIL_SYNC_OAUTH_CLIENT_SECRET", "GMAIL_SYNC_DEV_ACCESS_TOKEN"):
        c.check(name not in env, f"{name} must not be set (a secret in the environment)")
    c.check(not re.search(r"://[^/@]*:[^/@]*@", str(env.get("GMAIL_SYNC_REDIS_URL", ""))),
            "no password in GMAIL_SYNC_REDIS_URL (use GMAIL_SYNC_REDIS_PASSWORD_FILE)")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = ctr.get("volumeMounts", [])

    def mount_of(path: str):
        best = None
        for m in mounts:
            mp = m["mountPath"].rstrip("/")
            if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best["mountPath"])):
                best = m
        return best

    for name, value in env.items():
        if not name.endswith("_FILE") or value is None:
            continue
        m = mount_of(value)
        if not c.check(m is not None, f"{name}={value} is on no volume mount"):
            continue
        vol = volumes.get(m["name"], {})
        c.check(m.get("readOnly") is True, f"{name}: mount {m['mountPath']} must be readOnly")
        c.check("secret" in vol or "projected" in vol, f"{name}: volume {m['name']} must be a Secret")
        items = (vol.get("secret") or {}).get("items")
        if items is not None:
            rel = value[len(m["mountPath"].rstrip("/")) + 1:]
            c.check(rel in [i["path"] for i in items], f"{name}: {rel!r} is not among the Secret's items")
    health = env.get("GMAIL_SYNC_HEALTH_DIR") or DEFAULT_HEALTH_DIR
    m = mount_of(health)
    c.check(m is not None and "emptyDir" in volumes.get(m["name"], {}) and not m.get("readOnly"),
            f"GMAIL_SYNC_HEALTH_DIR {health} must be on a writable emptyDir")
    for v in volumes.values():
        c.check("hostPath" not in v, f"volume {v['name']}: no hostPath")

    # --- stop budget, rollout, disruption ---
    shutdown = int(env.get("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS") or DEFAULT_SHUTDOWN_TIMEOUT)
    budget = shutdown + STOP_BUDGET_BEYOND_SHUTDOWN_TIMEOUT
    grace = pod.get("terminationGracePeriodSeconds", 30)
    c.check(grace > budget, f"terminationGracePeriodSeconds {grace} must exceed the stop budget {budget} s")
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    c.check(ru.get("maxUnavailable") == 0, "rollingUpdate.maxUnavailable: 0")
    selector_ok(c, "the Deployment", (spec.get("selector") or {}).get("matchLabels"))
    c.check(not (spec.get("selector") or {}).get("matchExpressions"), "no matchExpressions in the selector")
    tmpl_labels = spec["template"]["metadata"].get("labels") or {}
    c.check(all(tmpl_labels.get(k) == v for k, v in SELECTOR.items()), "pod labels carry the selector")
    for t in pod.get("topologySpreadConstraints", []):
        selector_ok(c, "a topology spread constraint", (t.get("labelSelector") or {}).get("matchLabels"))
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if c.check(len(pdbs) == 1, "one PodDisruptionBudget"):
        selector_ok(c, "the PDB", (pdbs[0]["spec"].get("selector") or {}).get("matchLabels"))

    # --- image ---
    c.check(bool(DIGEST.search(ctr.get("image", ""))), f"image pinned by digest (got {ctr.get('image')!r})")

    # --- network policy ---
    nps = [n for n in by_kind.get("NetworkPolicy", []) if n["spec"].get("podSelector", {}).get("matchLabels") == SELECTOR]
    if c.check(len(nps) == 1, "one NetworkPolicy selects the worker"):
        np = nps[0]["spec"]
        c.check(sorted(np.get("policyTypes", [])) == ["Egress", "Ingress"], "policyTypes Ingress and Egress")
        c.check(not np.get("ingress"), "no ingress rule at all")
        egress = np.get("egress") or []
        c.check(bool(egress), "egress rules are listed")
        for rule in egress:
            c.check(bool(rule.get("to")) and bool(rule.get("ports")),
                    f"egress rule {rule!r} must name destinations and ports (no allow-all)")
            for peer in rule.get("to", []):
                ps = (peer.get("podSelector") or {}).get("matchLabels") or {}
                c.check("app.kubernetes.io/name" not in ps or "namespaceSelector" not in peer,
                        f"egress peer {peer!r} carries the worker's label (a kustomize selector label?)")

    # --- KEDA ---
    scaled = by_kind.get("ScaledObject", [])
    if scaled:
        so = scaled[0]["spec"]
        c.check(len(scaled) == 1, "one ScaledObject")
        c.check((so.get("scaleTargetRef") or {}).get("name") == APP, "ScaledObject targets the Deployment")
        minimum = so.get("minReplicaCount", 0)
        c.check(minimum >= 2, f"ScaledObject minReplicaCount >= 2 (got {minimum})")
        c.check("cooldownPeriod" not in so,
                "no cooldownPeriod: it only applies when scaling to zero; use HPA behavior")
        behavior = ((so.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior") or {}
        down = behavior.get("scaleDown") or {}
        c.check(down.get("stabilizationWindowSeconds", 0) >= 300 and bool(down.get("policies")),
                "HPA behavior.scaleDown with a stabilization window >= 300 s and policies")
        c.check(so.get("maxReplicaCount", 100) >= minimum, "maxReplicaCount >= minReplicaCount")
        c.check("replicas" not in spec, "the Deployment has no replicas when KEDA owns the count")
        for t in so.get("triggers", []):
            ref = (t.get("authenticationRef") or {}).get("name")
            if ref:
                c.check(ref in [d["metadata"]["name"] for d in by_kind.get("TriggerAuthentication", [])],
                        f"TriggerAuthentication {ref!r} is part of the render")
    else:
        c.check(spec.get("replicas", 1) >= 2, "at least 2 replicas")


def _dep(docs):
    return next(d for d in docs if d.get("kind") == "Deployment")


def _ctr(docs):
    return _dep(docs)["spec"]["template"]["spec"]["containers"][0]


def _env(docs, name, value):
    _ctr(docs).setdefault("env", []).append({"name": name, "value": value})


# Breakages the checks must catch, each applied alone to a good render (--self-test).
MUTATIONS = {
    "a container port": lambda d: _ctr(d).update(ports=[{"containerPort": 8080}]),
    "no readiness probe": lambda d: _ctr(d).pop("readinessProbe"),
    "liveness probe on --ready": lambda d: _ctr(d)["livenessProbe"]["exec"].update(command=READY),
    "root filesystem writable": lambda d: _ctr(d)["securityContext"].update(readOnlyRootFilesystem=False),
    "a capability added": lambda d: _ctr(d)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    "privilege escalation": lambda d: _ctr(d)["securityContext"].pop("allowPrivilegeEscalation"),
    "no seccomp": lambda d: _dep(d)["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile"),
    "runs as root": lambda d: _dep(d)["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
    "token mounted": lambda d: _dep(d)["spec"]["template"]["spec"].update(automountServiceAccountToken=True),
    "secret as env": lambda d: _ctr(d)["envFrom"].append({"secretRef": {"name": "gmail-sync-secrets"}}),
    "undocumented variable": lambda d: _env(d, "GMAIL_SYNC_NO_SUCH_THING", "1"),
    "file outside a mount": lambda d: _env(d, "GMAIL_SYNC_TOKEN_KEY_FILE", "/etc/key"),
    "version in the selector": lambda d: _dep(d)["spec"]["selector"]["matchLabels"].update(
        {"app.kubernetes.io/version": "0.1.0"}),
    "grace below the stop budget": lambda d: _dep(d)["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=45),
    "rollout lowers capacity": lambda d: _dep(d)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
    "image by tag": lambda d: _ctr(d).update(image="gmail-sync:0.1.0"),
    "ingress allowed": lambda d: next(x for x in d if x.get("kind") == "NetworkPolicy")["spec"].update(
        ingress=[{}]),
    "egress to anything": lambda d: next(x for x in d if x.get("kind") == "NetworkPolicy")["spec"][
        "egress"].append({}),
}


def self_test(c: Checker, path: Path) -> None:
    import copy

    good = [d for d in yaml.safe_load_all(path.read_text()) if d]
    c.where = str(path)
    check_render(c, copy.deepcopy(good))
    if c.errors:
        sys.exit(f"check_manifests: self-test: the good render fails: {c.errors}")
    for what, mutate in MUTATIONS.items():
        bad = copy.deepcopy(good)
        mutate(bad)
        c.errors = []
        check_render(c, bad)
        if not c.errors:
            sys.exit(f"check_manifests: self-test: {what!r} was not caught")
    print(f"check_manifests: self-test ok ({len(MUTATIONS)} breakages of {path.name} caught)")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if sys.argv[2] == "--self-test":
        self_test(Checker(documented_variables(Path(sys.argv[1]))), Path(sys.argv[3]))
        return
    c = Checker(documented_variables(Path(sys.argv[1])))
    for f in sys.argv[2:]:
        c.where = f
        docs = [d for d in yaml.safe_load_all(Path(f).read_text()) if d]
        check_render(c, docs)
    for e in c.errors:
        print(f"check_manifests: FAILED {e}", file=sys.stderr)
    if c.errors:
        sys.exit(1)
    print(f"check_manifests: ok ({c.count} assertions over {len(sys.argv) - 2} renders)")


if __name__ == "__main__":
    main()
