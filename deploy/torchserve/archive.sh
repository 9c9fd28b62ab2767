#!/usr/bin/env bash
# Archives a model package (models/<name>/<version>/) as a TorchServe .mar whose handler is
# saliency_service/protocol/torchserve.py:  deploy/torchserve/archive.sh models/demo/1 [export-dir]
set -euo pipefail
package=${1:?usage: archive.sh <package dir> [export dir]}
export_dir=${2:-deploy/torchserve/model-store}
archiver=${TORCH_MODEL_ARCHIVER:-torch-model-archiver}
here=$(cd "$(dirname "$0")/../.." && pwd)
read -r name version < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["name"], m["version"])' "$package/manifest.json")
extra="$package/manifest.json"
[ -f "$package/model.pt2" ] && extra="$extra,$package/model.pt2"
mkdir -p "$export_dir"
"$archiver" --model-name "$name" --version "$version" \
  --handler "$here/saliency_service/protocol/torchserve.py" \
  --serialized-file "$package/model.onnx" --extra-files "$extra" \
  --export-path "$export_dir" --force
echo "wrote $export_dir/$name.mar"
