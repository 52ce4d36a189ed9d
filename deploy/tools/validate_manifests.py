"""Validate rendered Kubernetes manifests offline against the API schemas.

Usage: helm template ... | python validate_manifests.py 1.33.0 -
       python validate_manifests.py 1.33.0 rendered.yaml [more.yaml ...]

kubernetes-validate alone exits 0 when it has no schema for a kind, which hides
removed APIs (policy/v1beta1, autoscaling/v2beta2). Here a missing schema fails,
except for the CRD groups listed in CRD_GROUPS (Prometheus Operator objects).
Exit status: 0 when every object validates, 1 otherwise.
"""

import sys

import kubernetes_validate as kv
import yaml

CRD_GROUPS = ("monitoring.coreos.com/",)  # ServiceMonitor, PodMonitor, PrometheusRule


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    version, paths = argv[0], argv[1:]
    docs = []
    for path in paths:
        if path == "-":
            docs.extend(d for d in yaml.safe_load_all(sys.stdin) if d)
        else:
            with open(path, encoding="utf-8") as f:
                docs.extend(d for d in yaml.safe_load_all(f) if d)
    bad = skipped = 0
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} ({doc.get('apiVersion')})"
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            if doc.get("apiVersion", "").startswith(CRD_GROUPS):
                print("SKIP", name, "CRD")
                skipped += 1
                continue
            print("FAIL", name, "no schema (removed or unknown API)")
            bad += 1
        except kv.ValidationError as e:
            print("FAIL", name, e.message, "at", ".".join(map(str, e.path)))
            bad += 1
        else:
            print("PASS", name)
    print(f"{len(docs) - bad - skipped} passed, {skipped} skipped (CRD), {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
