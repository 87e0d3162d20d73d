#!/usr/bin/env bash
# The GPU measurement of issue 38 in one call on a lent device machine (bench/README.md,
# "GPU runs"): installs what the image lacks from the wheels carried in .whl/ (offline),
# checks the configurations on a tiny model first, then runs them one by one, each with
# its floor side by side, writing JSON, a log and a cProfile of one lmprobe run per
# configuration under $OUT. A configuration that fails (out of memory, say) is logged and
# the next one runs; every row measured is already written.
#
#   CONFIGS  configurations, in order (default below, most wanted first; all: gpu llama1b
#            llama1b-tokens llama8b llama8b-tokens)
#   DOCS_8B  documents for llama8b (default 1024: 4,096 x 512 tokens of an 8B model take
#            about 4 x 80 s per case on an H100, past one call's 10 minutes)
#   REPEATS  timed rounds after the warm-up (default 1)
#   WHEELS   the wheel folder (default .whl, git-ignored; carry it: carry=[".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/lmprobe-gpu}
WHEELS=${WHEELS:-.whl}
PY=${PY:-python3}
CONFIGS=${CONFIGS:-"llama1b llama1b-tokens llama8b gpu"}
DOCS_8B=${DOCS_8B:-1024}
REPEATS=${REPEATS:-1}
mkdir -p "$OUT"

# import name -> requirement (pyproject.toml's); torch and transformers are in the image
needed=(
  "nnsight:nnsight>=0.8,<0.9" "lightning:lightning>=2.4" "sklearn:scikit-learn>=1.5"
  "scipy:scipy>=1.10" "safetensors:safetensors>=0.4" "torchmetrics:torchmetrics>=1.4"
  "pandas:pandas>=2.1" "matplotlib:matplotlib>=3.8" "omegaconf:omegaconf>=2.3"
  "hydra:hydra-core>=1.3.2"
)
missing=()
for pair in "${needed[@]}"; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  echo "installing from $WHEELS: ${missing[*]}"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" ||
    { echo "offline install failed: download the wheels it names (bench/README.md)"; exit 3; }
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, transformers, nnsight, sklearn; print('torch', torch.__version__,
'transformers', transformers.__version__, 'nnsight', nnsight.__version__, 'sklearn',
sklearn.__version__)"; nproc; } | tee "$OUT/machine.txt"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# seconds on a tiny model: a configuration that cannot run fails here, not after minutes
"$PY" bench/bench_overhead.py --config gpu llama1b llama1b-tokens --smoke --device cuda \
  --repeats 1 --out "$OUT/smoke.json" >"$OUT/smoke.log" 2>&1 ||
  { tail -30 "$OUT/smoke.log"; exit 4; }

for config in $CONFIGS; do
  docs=()
  [[ $config == llama8b ]] && docs=(--docs "$DOCS_8B")
  echo "== $config $(date -u +%T)"
  "$PY" bench/bench_overhead.py --config "$config" "${docs[@]}" --repeats "$REPEATS" \
    --out "$OUT/$config.json" --profile "$OUT/$config.profile.txt" 2>&1 |
    grep -v "^\[transformers\]" | tee "$OUT/$config.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || echo "$config failed (its rows so far: $OUT/$config.json)"
done
