"""Validate Kubernetes manifests offline, in strict mode, as an operator's pipeline would.

    validate_manifests.py KUBERNETES_VERSION CRD_DIR MANIFEST...

Built-in kinds go to kubernetes-validate (pinned in requirements.txt) with --strict: unknown
fields are errors. Kinds defined by a CustomResourceDefinition in CRD_DIR (vendored, with their
source named in each file) are checked against that CRD's openAPIV3Schema with jsonschema, made
strict the way the API server prunes: an object schema that lists properties and neither allows
additional ones nor preserves unknown fields refuses any other field. A kind that neither knows
is an error, never a warning, except those listed in NOT_VENDORED, which are named as not checked.
Prints one line per document and exits 1 if any failed.
"""

import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml


# KEDA's TriggerAuthentication CRD (about 24 kB of provider-specific fields) is not vendored yet:
# the document is reported as not checked rather than passed.
# Nor is the prometheus-operator's PrometheusRule CRD: tests/prometheus.rs checks that
# manifest's rules with promtool instead.
NOT_VENDORED = {
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def strict(schema):
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas(crd_dir):
    schemas = {}
    for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                key = (f"{group}/{version['name']}", kind)
                schemas[key] = (path.name, strict(version["schema"]["openAPIV3Schema"]))
    return schemas


def main():
    version, crd_dir, *manifests = sys.argv[1:]
    crds = crd_schemas(crd_dir)
    failed = 0
    for manifest in manifests:
        for doc in yaml.safe_load_all(pathlib.Path(manifest).read_text(encoding="utf-8")):
            if doc is None:
                continue
            what = f"{manifest}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            try:
                if key in NOT_VENDORED:
                    print(f"not checked {what} (no vendored CRD)")
                elif key in crds:
                    source, schema = crds[key]
                    jsonschema.validate(doc, schema)
                    print(f"ok {what} (against {source})")
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
                    print(f"ok {what} (Kubernetes {version})")
            except kubernetes_validate.SchemaNotFoundError:
                failed += 1
                print(f"FAILED {what}: no schema for {key[0]} {key[1]} (vendor its CRD)")
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                failed += 1
                print(f"FAILED {what}: {e.message}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
