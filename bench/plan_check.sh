#!/usr/bin/env bash
# Check `edgellm plan --here` on this machine: calibrate on one quantized file, then compare
# the calibrated decode/prefill estimates with measured speeds for the other files.
#   bench/plan_check.sh DIR CALIBRATION_TYPE TYPE...   (files DIR/*.<TYPE>.gguf, as --sweep names them)
# Example: bench/plan_check.sh sweep Q8_0 Q6_K Q4_K_M Q4_0 Q3_K_M Q2_K
set -euo pipefail
dir=$1; base=$2; shift 2
edgellm=${EDGELLM:-.venv/bin/edgellm}
cal=$(mktemp --suffix=.json)
file() { ls "$dir"/*."$1".gguf | head -1; }
row() {
  python3 -c '
import json, sys
m = json.load(sys.stdin)["measured"]
d, p = m["decode"], m["prefill"]
cells = [sys.argv[1], "%.1f" % d["estimate_tps"], "%.1f" % d["measured_tps"], "%+.1f%%" % (100 * d["error"]),
         "%.0f" % p["estimate_tps"], "%.0f" % p["measured_tps"], "%+.1f%%" % (100 * p["error"])]
print("| " + " | ".join(cells) + " |")' "$1"
}
echo "| type | decode estimate | decode measured | error | prefill estimate | prefill measured | error |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
"$edgellm" plan "$(file "$base")" --here --ctx 512 --threads 2 --json \
  --save-calibration "$cal" 2>/dev/null | row "$base (calibration; default efficiencies)"
for t in "$@"; do
  "$edgellm" plan "$(file "$t")" --here --ctx 512 --threads 2 --json \
    --calibration "$cal" 2>/dev/null | row "$t"
done
echo
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print("machine:", json.dumps(c["machine"]["bandwidth_gbs"]), "GB/s,", c["machine"]["f16_tflops"], "TFLOPS (fp32 GEMM); efficiency:", c["efficiency"])' "$cal"
rm -f "$cal"
