#!/usr/bin/env python3
"""Turns Kubernetes' OpenAPI v2 document (api/openapi-spec/swagger.json of the
k8s.io/kubernetes module) into the standalone, strict JSON schemas kubeconform
reads offline: one file per group/version/kind, named as kubeconform's
`{{ .ResourceKind }}{{ .KindSuffix }}.json` template expects
(deployment-apps-v1.json, service-v1.json, csidriver-storage-v1.json).

Each file holds the kind's definition plus every definition it references,
with `$ref`s pointing into its own `definitions`. "Strict": objects that list
their properties reject unknown ones, so a misspelt field fails validation.

usage: openapi2jsonschema.py SWAGGER_JSON OUT_DIR
"""
import json
import os
import sys

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
# resource.Quantity is a string in the spec, but YAML often writes `cpu: 1`.
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def ref_name(ref):
    return ref.rsplit("/", 1)[-1]


def convert(node):
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return {"$ref": "#/definitions/" + ref_name(node["$ref"])}
    if node.get("format") == "int-or-string":
        return dict(INT_OR_STRING)
    out = {}
    for key, value in node.items():
        if key.startswith("x-"):
            continue
        if key == "properties":
            # Property names are data here, never keywords ("$ref" is one of
            # JSONSchemaProps' properties).
            out[key] = {name: convert(v) for name, v in value.items()}
        else:
            out[key] = convert(value)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def refs_of(node, found):
    if isinstance(node, list):
        for n in node:
            refs_of(n, found)
    elif isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.add(ref_name(node["$ref"]))
        for key, value in node.items():
            if key == "properties":
                for prop in value.values():
                    refs_of(prop, found)
            else:
                refs_of(value, found)


def main():
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        definitions = json.load(f)["definitions"]
    converted = {name: convert(d) for name, d in definitions.items()}
    converted["io.k8s.apimachinery.pkg.api.resource.Quantity"] = dict(QUANTITY)
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            closure, todo = set(), [name]
            while todo:
                current = todo.pop()
                if current in closure:
                    continue
                closure.add(current)
                found = set()
                refs_of(converted[current], found)
                todo.extend(found - closure)
            schema = dict(converted[name])
            schema["definitions"] = {n: converted[n] for n in sorted(closure)}
            group = gvk["group"].split(".")[0]
            suffix = ("-" + group if group else "") + "-" + gvk["version"]
            path = os.path.join(out_dir, (gvk["kind"] + suffix).lower() + ".json")
            with open(path, "w") as f:
                json.dump(schema, f, separators=(",", ":"), sort_keys=True)
            written += 1
    print(f"wrote {written} schemas to {out_dir}")


if __name__ == "__main__":
    main()
