#!/usr/bin/env bash
# The device path on a machine with a CUDA GPU, in one short run that needs no network:
# the engine benchmark's rows (extract, task_arithmetic, ties, magnitude_prune against
# their I/O floors) on this machine's CPU (the default streaming executor) and on its
# GPU (--device cuda), a table of both, and the device tests (CPU vs GPU outputs:
# task_arithmetic bit-identical, the others within 1e-6).
#
#   bash benchmarks/gpu_check.sh            # SIZE=0.5 (GB per checkpoint), PY=python3
#
# It needs torch with CUDA, safetensors and blake3 (the engine's only imports) and, for
# the tests, pytest; wheels of missing ones may lie in
# WHEELS (default ./.whl) and are installed from there without any index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SIZE=${SIZE:-0.5}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/taskvec-site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/taskvec-site"
fi
"$PY" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "safetensors", "blake3") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)} (put their wheels in .whl/)")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU")
print(f"gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

WORK=$(mktemp -d /tmp/taskvec-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
OPS="floor2 extract floor4 task_arithmetic ties magnitude_prune"
for device in cpu cuda; do
  flag=(); [ "$device" = cuda ] && flag=(--device cuda)
  "$PY" benchmarks/bench_engine.py --sizes "$SIZE" --ops $OPS --workdir "$WORK/bench" --keep \
    --quiet-wait 0 --retries 0 --json "$WORK/$device.json" "${flag[@]}" | tee "$WORK/$device.log"
done

"$PY" - "$WORK/cpu.json" "$WORK/cuda.json" <<'EOF'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\nmachine: {gpu['machine']}\n")
print("| op | size | CPU wall s | GPU wall s | CPU / GPU | GPU x floor | GPU peak anon MB |")
print("|---|---:|---:|---:|---:|---:|---:|")
rows = {(r["op"], r["size_gb"]): r for r in cpu["rows"] if "wall_s" in r}
for g in gpu["rows"]:
    c = rows.get((g["op"], g["size_gb"]))
    if c is None or "wall_s" not in g or g["op"].startswith("floor"):
        continue
    ratio = f"{g['ratio']:.2f}x" if g.get("ratio") else "-"
    print(f"| {g['op']} | {g['size_gb']:g} GB | {c['wall_s']:.2f} | {g['wall_s']:.2f} | {c['wall_s'] / g['wall_s']:.2f}x | {ratio} | {g['peak_anon_mb']:.0f} |")
EOF

if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
else
  echo "gpu_check: pytest missing: device tests not run"
fi
