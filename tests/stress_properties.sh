#!/usr/bin/env bash
# Run the exactness properties RUNS times in a row (default 200), each with its own
# hypothesis seed, and stop at the first failure: the check that they do not flake.
#
#   tests/stress_properties.sh [RUNS]        # from the repository root, in the test venv
#
# Each run draws SCONV_PROPERTY_EXAMPLES examples per property (default 200; 60 for the
# fully connected ones), so 200 runs are 40,000 conv layers, 40,000 forced lowerings,
# 40,000 ConvTranspose layers and 24,000 Gemm/MatMul layers.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-200}"
tests=(tests/test_conv_rewrite_property.py tests/test_conv_transpose.py tests/test_linear_rewrite.py)
start=$(date +%s)
for seed in $(seq 1 "$runs"); do
    if ! pytest -q -p no:cacheprovider --hypothesis-seed="$seed" -k exact "${tests[@]}" \
            > /tmp/sconv-stress-last.log 2>&1; then
        echo "run $seed of $runs FAILED (hypothesis seed $seed):"
        tail -40 /tmp/sconv-stress-last.log
        exit 1
    fi
    echo "run $seed of $runs passed: $(tail -1 /tmp/sconv-stress-last.log)"
done
echo "all $runs runs passed in $(( $(date +%s) - start )) s"
