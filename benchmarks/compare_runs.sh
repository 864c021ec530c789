#!/usr/bin/env bash
# Train and predict cifar-10-tiny (holdout; 3 folds with and without flip TTA) and the dog sample (3 folds, frozen
# Lite0) with a checkout's code; copy metrics.csv, oof.csv, cv.json and the submissions
# into OUT, with a digest of every member's kept weights (weights.json), so two checkouts can be compared file by
# file (benchmarks/compare_outputs.py).
# usage: benchmarks/compare_runs.sh CHECKOUT OUT   (run from anywhere; python from $PY)
set -euo pipefail
src=$(cd "$1" && pwd); out=$2; shared=${SHARED:-$src/../shared}
[ -d "$shared/data" ] || shared=/work/shared
py=${PY:-python}
tmp=$(mktemp -d); mkdir -p "$out"
cd "$src"
p() { OMP_NUM_THREADS=2 PYTHONPATH="$src" "$py" -m pipeline -q "$@"; }
p reorg cifar-10 "$shared/data/cifar-10-tiny" "$tmp/cw" --folds 3
p train cifar-10 "$tmp/cw" "$tmp/ch" --model resnet18_cifar --epochs 2 --batch-size 64 --lr 0.05 --device cpu
p train cifar-10 "$tmp/cw" "$tmp/cf" --model fastnet_s --epochs 2 --batch-size 64 --folds 3 --tta flip --device cpu
p train cifar-10 "$tmp/cw" "$tmp/cn" --model fastnet_s --epochs 2 --batch-size 64 --folds 3 --device cpu
p predict cifar-10 "$tmp/cw" "$tmp/ch" "$tmp/c_holdout.csv" --device cpu
p predict cifar-10 "$tmp/cw" "$tmp/cf" "$tmp/c_folds.csv" --device cpu --tta flip
p reorg dog-breed-identification "$shared/data/dog-breed-identification" "$tmp/dw" --folds 3
p train dog-breed-identification "$tmp/dw" "$tmp/df" --model timm:tf_efficientnet_lite0 \
  --weights "$shared/weights/tf_efficientnet_lite0.mlillustrated_in1k.safetensors" \
  --freeze-backbone --head mlp --epochs 3 --batch-size 32 --folds 3 --device cpu
p predict dog-breed-identification "$tmp/dw" "$tmp/df" "$tmp/d_folds.csv" --device cpu
for r in ch cf cn df; do
  for f in $(cd "$tmp/$r" && find . -name metrics.csv -o -name oof.csv -o -name cv.json | sort); do
    mkdir -p "$out/$r/$(dirname "$f")"; cp "$tmp/$r/$f" "$out/$r/$f"
  done
done
cp "$tmp"/*.csv "$out/"
# the kept weights of every member, as a digest of each tensor's bytes (checkpoint files also hold timings)
PYTHONPATH="$src" "$py" - "$tmp" "$out/weights.json" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
import torch
root, digests = Path(sys.argv[1]), {}
for path in sorted(root.rglob("best.pt")):
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].cpu().contiguous().numpy().tobytes())
    digests[str(path.relative_to(root))] = digest.hexdigest()
Path(sys.argv[2]).write_text(json.dumps(digests, indent=1))
PYEOF
rm -rf "$tmp"
echo "wrote $out"
