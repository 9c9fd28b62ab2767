#!/usr/bin/env bash
# Archives a model package (models/<name>/<version>/) as a TorchServe .mar whose handler is
# saliency_service/protocol/torchserve.py:  deploy/torchserve/archive.sh models/demo/1 [export-dir]
# The .mar holds model.onnx, manifest.json and the external-data files the manifest lists; a
# model.pt2 that older exports wrote is left out (it is never read).
set -euo pipefail
package=${1:?usage: archive.sh <package dir> [export dir]}
export_dir=${2:-deploy/torchserve/model-store}
archiver=${TORCH_MODEL_ARCHIVER:-torch-model-archiver}
here=$(cd "$(dirname "$0")/../.." && pwd)
read -r name version < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["name"], m["version"])' "$package/manifest.json")
# Listed files other than model.onnx and model.pt2, by their top folder (the archiver keeps
# a folder's layout, and places files at the archive's root).
extra="$package/manifest.json"
while IFS= read -r entry; do
  extra="$extra,$package/$entry"
done < <(python3 -c '
import json, sys
files = json.load(open(sys.argv[1])).get("files", {})
tops = {name.split("/")[0] for name in files if name not in ("model.onnx", "model.pt2")}
print("\n".join(sorted(tops)))' "$package/manifest.json" | sed '/^$/d')
mkdir -p "$export_dir"
"$archiver" --model-name "$name" --version "$version" \
  --handler "$here/saliency_service/protocol/torchserve.py" \
  --serialized-file "$package/model.onnx" --extra-files "$extra" \
  --export-path "$export_dir" --force
echo "wrote $export_dir/$name.mar"
