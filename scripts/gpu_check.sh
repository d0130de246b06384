#!/usr/bin/env bash
# The one command a GPU session runs (device tool, repo root, python3 = torch 2.11+cu130):
#
#   bash scripts/gpu_check.sh
#   GMOD_GPU_CHECK_STEPS=build,tests,bench bash scripts/gpu_check.sh     # a subset
#
# Steps (in this order): info wgmma_selftest build bench_ops bench_attention tests memcheck racecheck ncu ncu_attn
#   decode_timeline
#   (wgmma_selftest: scripts/wgmma_selftest.cu, nvcc only, ~20 s: each wgmma operand form of the sm_90a
#   kernels on its own against a float64 product; if the wgmma tests fail, it says which form)
#   (tests: pytest -m cuda, the wgmma kernels' own tests apart as tests_wgmma after the rest)
#   (decode_timeline: scripts/decode_timeline.py, ~60 s: the decode's split / combine kernels and the gap
#   between them from profiler timestamps, with GMOD_ATTN_DECODE_STAGES 2 and 3, against the CUDA-event time,
#   with the benchmark's L2 flush and with rotating caches instead)
#   (the benchmarks first: they check every result against a baseline before timing it, and
#   they are the numbers the issues ask for; when the budget runs out, what is left is skipped
#   and a second call on the warm machine names it)
#   aliases: all (default) = every step above; sanitize = memcheck,racecheck; bench = bench_ops,bench_attention
#   extra, only when named: bench_layer bench_model (python -m gmod_ext.bench layer|model, the model with
#   --profile; a second call:
#   GMOD_GPU_CHECK_STEPS=bench_layer,bench_model on the warm machine reuses the build)
#   bench_attention runs with --experiments: gmod-exp rows time the other kernel plans (the mma.sync
#   forward and backward at d = 64 / 128, the decode with three K / V buffers) next to the defaults, in the same
#   process.
#   extra, only when named: bench_attention_det (GMOD_DETERMINISTIC=1), decode_sweep (the decode's split
#   count swept against the wave model, scripts/decode_split_sweep.py), synccheck initcheck
#   (compute-sanitizer tools), ncu_nvtx (the README's NVTX
#   filter: kernels inside gmod.attention of `bench layer --quick`), demo (python -m gmod_ext demo on the GPU,
#   200 fine-tuning steps: does gamma-MoD's first-answer-token accuracy recover with a longer fine-tune?)
# Without build, the library already built in gmod_ext/ (a warm machine keeps it) is used.
# Everything lands in $OUT (logs, bench_*.json, ncu.csv, summary.txt); the console shows short
# tails, then the benchmark tables, then the summary table LAST, ending with the verdicts of
# scripts/gpu_verdicts.py (targets met or not, defaults to flip) (only the last 12,000 characters
# of output come back). A failing step never stops the script; its failure is in the summary.
# Exit status: 0 if every step that ran passed, 1 otherwise.
# Knobs: GMOD_GPU_CHECK_BUDGET_S (default 530 s for the whole script), GMOD_GPU_CHECK_PYTEST_ARGS (default -m cuda),
#        GMOD_BENCH_ARGS (extra args for both benchmarks, e.g. --graph), PYTHON (default python3),
#        GMOD_GPU_DEMO_ARGS (the demo step's options, default --steps 200),
#        GMOD_GPU_CHECK_PACK=1 (at the end, pack $OUT into gpu_check.tgz + summary.txt: the device tool
#        brings back at most 8 files).
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment block above is the help
  sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3-
  exit 0
fi
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GMOD_GPU_CHECK_BUDGET_S:-530}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
STATUS_FILE=$OUT/steps.tsv
: > "$STATUS_FILE"
ANY_FAIL=0

# ------------------------------------------------------------------ which steps
ALL_STEPS="info wgmma_selftest build bench_ops bench_attention tests memcheck racecheck ncu ncu_attn decode_timeline"
req=${GMOD_GPU_CHECK_STEPS:-all}
req=" $(echo "$req" | tr ',' ' ') "
req=${req// all / $ALL_STEPS }
req=${req// sanitize / memcheck racecheck }
req=${req// bench / bench_ops bench_attention }
want() { [[ "$req" == *" $1 "* ]]; }
# A misspelt step would otherwise run nothing and cost a GPU call: refuse it before anything runs.
KNOWN_STEPS="$ALL_STEPS bench_layer bench_model bench_attention_det decode_sweep synccheck initcheck ncu_nvtx demo"
for s in $req; do
  if [[ " $KNOWN_STEPS " != *" $s "* ]]; then
    echo "gpu_check: unknown step '$s' in GMOD_GPU_CHECK_STEPS; steps: $KNOWN_STEPS (aliases: all sanitize bench)" >&2
    exit 2
  fi
done

# ------------------------------------------------------------------ helpers
record() {  # step status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS_FILE"
  case "$2" in ok|skipped*) ;; *) ANY_FAIL=1 ;; esac
}

# run_step NAME LIMIT_S LOG CMD... : runs CMD under timeout (clipped to the remaining budget),
# output to $OUT/LOG; sets RC and DUR. Returns 1 (and records "skipped") when out of time.
run_step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((BUDGET - SECONDS - 12))
  if (( left < 20 )); then
    record "$name" "skipped (time budget)" 0 "${left}s left of ${BUDGET}s"
    RC=124; DUR=0; return 1
  fi
  (( limit > left )) && limit=$left
  echo "=== [$name] $(date +%T) (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$log" 2>&1
  RC=$?
  DUR=$((SECONDS - t0))
  (( RC == 124 || RC == 137 )) && echo "[$name] TIMED OUT after ${DUR}s" >> "$OUT/$log"
  return 0
}

tail_of() { tail -n "${2:-8}" "$OUT/$1" | cut -c1-220; }

# ------------------------------------------------------------------ info
if want info; then
  t0=$SECONDS
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu \
        --format=csv,noheader 2>&1 | head -n 1)
  echo "GPU: $gpu"
  {
    echo "nvidia-smi: $gpu"
    "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1
    (nvcc --version 2>&1 | tail -n 1) || true
    (cmake --version 2>&1 | head -n 1) || true
    for t in compute-sanitizer ncu ninja; do printf '%s: %s\n' "$t" "$(command -v $t || echo missing)"; done
  } > "$OUT/info.log" 2>&1
  cat "$OUT/info.log"
  record info ok $((SECONDS - t0)) "$gpu"
fi

# ------------------------------------------------------------------ build
# Toolchain facts for the crash seen on this machine's first build (an error message that formats an
# integer segfaulted inside std::ostream::_M_insert<long>, instantiated in libgmod_ext.so itself):
# compilers, the weak std:: symbols per object, the libstdc++ the process maps, and a probe that
# raises such an error in a subprocess. Written to $OUT/toolchain.log; one line on the console.
toolchain_facts() {
  local so bdir
  so=$(ls gmod_ext/libgmod_ext*.so 2> /dev/null | head -n 1)
  bdir=$(ls -d build/temp*/cmake* 2> /dev/null | head -n 1)
  {
    echo "c++: $(c++ --version 2>&1 | head -n 1)"
    echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
    "$PY" -c 'import torch, sys; print("python", sys.executable, "torch cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)'
    echo "weak std:: symbols in $so: $(nm -C --defined-only "$so" | grep -c ' W std::')"
    echo "ostream _M_insert instances in $so:"; nm -C --defined-only "$so" | grep '_M_insert<' | head -n 5
    echo "--- objects: weak std:: symbols, _M_insert<long> definitions"
    for o in $(find "$bdir" -name '*.o' 2> /dev/null); do
      echo "$(nm -C --defined-only "$o" | grep -c ' W std::') $(nm -C --defined-only "$o" | grep -c '_M_insert<long>') ${o##*/}"
    done | sort -n | tail -n 25
    echo "--- compile commands (route.cpp, route.cu)"
    (cd "$bdir" && ninja -t commands 2> /dev/null | grep -m 1 'cpu/route.cpp.o -c'; ninja -t commands 2> /dev/null | grep -m 1 'cuda/route.cu.o -c') | cut -c1-2500
    echo "--- libstdc++ mapped by python + torch + gmod_ext"
    "$PY" -c 'import torch, gmod_ext; print(open("/proc/self/maps").read())' | grep -o '/[^ ]*libstdc++[^ ]*' | sort -u
    ldd "$so" | grep -iE 'stdc|gcc_s'
    echo "--- probe: an error message with an integer (gmod.route, num_routed = -1, CPU)"
    "$PY" -c 'import torch, gmod_ext
try:
    torch.ops.gmod.route(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.int8), torch.tensor([2, -1], dtype=torch.int32), 4, None)
except ValueError as e:
    print("raised:", str(e).splitlines()[0])'
    echo "probe rc=$?"
  } > "$OUT/toolchain.log" 2>&1
  echo "toolchain: $(grep -m 1 '^c++:' "$OUT/toolchain.log"); $(grep -m 1 '^weak std' "$OUT/toolchain.log" | sed 's/ in .*:/:/'); $(grep '^probe rc' "$OUT/toolchain.log")"
}

# ------------------------------------------------------------------ wgmma_selftest
if want wgmma_selftest; then
  if run_step wgmma_selftest 120 wgmma_selftest.log bash -c "nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a \
      -I csrc/cuda -I csrc/include scripts/wgmma_selftest.cu -o '$OUT/wgmma_selftest' && '$OUT/wgmma_selftest'"; then
    cut -c1-160 "$OUT/wgmma_selftest.log" | grep -E "PASS|FAIL|cases|error" | head -n 12
    rm -f "$OUT/wgmma_selftest"
    if (( RC == 0 )); then
      record wgmma_selftest ok "$DUR" "$(tail -n 1 "$OUT/wgmma_selftest.log")"
    else
      record wgmma_selftest FAIL "$DUR" "rc=$RC: $(grep -m1 -E 'FAIL|error' "$OUT/wgmma_selftest.log" | cut -c1-120)"
    fi
  fi
fi

if want build; then
  if run_step build 360 build.log "$PY" -m pip install --no-build-isolation --no-deps -e . -q; then
    rc=$RC; dur=$DUR
    if (( rc != 0 && rc != 124 && rc != 137 )) && grep -qiE "externally-managed|permission denied|no module named pip" "$OUT/build.log"; then
      # pip cannot install here: build the library in place instead (PYTHONPATH points at the repo)
      run_step build_inplace 300 build_inplace.log "$PY" setup.py build_ext --inplace
      rc=$RC; dur=$((dur + DUR))
      cat "$OUT/build_inplace.log" >> "$OUT/build.log"
    fi
    "$PY" - > "$OUT/import.log" 2>&1 <<'EOF'
import torch, gmod_ext
print("BUILD_INFO", gmod_ext.BUILD_INFO)
ops = ["router_logits", "router_logits_backward", "route", "gather_rows", "gather_rows_backward", "scatter_merge",
       "scatter_merge_backward", "attention", "attention_backward", "kv_cache_append"]
has = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key("gmod::" + op, "CUDA")]
print("CUDA kernels:", " ".join(has) or "none")
print("no CUDA kernel:", " ".join(op for op in ops if op not in has) or "-")
EOF
    irc=$?
    cat "$OUT/import.log" | cut -c1-300
    toolchain_facts
    # Static main-loop instruction counts of the attention kernels that the benchmarks below time.
    bdir=$(ls -d build/temp*/cmake* 2> /dev/null | head -n 1)
    for f in attention_fwd attention_decode attention_bwd; do
      o=$(find "$bdir" -name "$f.cu.o" 2> /dev/null | head -n 1)
      [[ -n "$o" ]] && "$PY" scripts/sass_loop_stats.py "$o" --kernel 'tc_kernel.*bfloat' 2>&1
    done > "$OUT/sass_stats.txt"
    echo "sass (main loop per warp, fwd d128 prefill): $(grep 'TcFwdTraits<128, 2, 64, false>, __nv_bfloat16, false, false, false' "$OUT/sass_stats.txt" | awk '{print $1" instrs, "$2" HMMA, "$6" spill"}')"
    if (( rc != 0 )); then
      echo "--- build log tail:"; grep -iE "error|fatal" "$OUT/build.log" | head -n 15 | cut -c1-240; tail_of build.log 15
      record build FAIL "$dur" "pip rc=$rc; see build.log"
    elif (( irc != 0 )); then
      tail_of import.log 5
      record build FAIL "$dur" "built, but import failed: $(tail -n 1 "$OUT/import.log" | cut -c1-120)"
    elif grep -q "'cuda': False" "$OUT/import.log"; then
      record build FAIL "$dur" "library built WITHOUT CUDA kernels: $(head -n 1 "$OUT/import.log")"
    else
      record build ok "$dur" "$(grep '^no CUDA kernel' "$OUT/import.log")"
    fi
  fi
fi

# ------------------------------------------------------------------ benchmarks
bench() {  # name limit
  bench_named "$1" "${1#bench_}" "$2"
}
bench_named() {  # name benchmark limit
  local name=$1 which=$2 limit=$3
  # shellcheck disable=SC2086
  if run_step "$name" "$limit" "$name.log" "$PY" -m gmod_ext.bench "$which" --json "$OUT/$name.json" ${GMOD_BENCH_ARGS:-}; then
    local st
    st=$(grep -E "^status:" "$OUT/$name.log" | tail -n 1)
    tail_of "$name.log" 4
    case $RC in
      0) record "$name" ok "$DUR" "$st" ;;
      2) record "$name" MISMATCH "$DUR" "$st; $(grep -m1 -E '^!!!   ' "$OUT/$name.log" | cut -c1-120)" ;;
      *) record "$name" FAIL "$DUR" "rc=$RC ${st:-no status line}; $(grep -m1 -E 'ERRORS|Error' "$OUT/$name.log" | cut -c1-120)" ;;
    esac
  fi
}
want bench_ops && bench bench_ops 150
# --experiments: gmod-exp rows, the other kernel plans timed in the same process (the mma.sync forward
# and backward at d = 64 / 128, the decode with GMOD_ATTN_DECODE_STAGES=3); they decide the defaults.
want bench_attention && GMOD_BENCH_ARGS="--experiments ${GMOD_BENCH_ARGS:-}" bench bench_attention 240
want bench_layer && bench bench_layer 200
want bench_model && GMOD_BENCH_ARGS="--profile ${GMOD_BENCH_ARGS:-}" bench bench_model 420
# Only when named: the attention benchmark with the deterministic backward (separate dQ kernel instead of
# fp32 atomics; GMOD_DETERMINISTIC is read once per process), to compare the two dQ strategies.
if [[ "$req" == *" bench_attention_det "* ]]; then
  GMOD_DETERMINISTIC=1 bench_named bench_attention_det attention 220
fi
# Only when named: the decode's key-split count swept (GMOD_ATTN_DECODE_SPLITS) against the wave model's
# choice, on the decode shapes of bench_attention; the table says how far the model is from the best.
if [[ "$req" == *" decode_sweep "* ]]; then
  if run_step decode_sweep 300 decode_sweep.log "$PY" scripts/decode_split_sweep.py --json "$OUT/decode_sweep.json"; then
    tail_of decode_sweep.log 12
    if (( RC == 0 )); then record decode_sweep ok "$DUR" "model/best per shape in decode_sweep.log"
    else record decode_sweep FAIL "$DUR" "rc=$RC"; fi
  fi
fi
# Only when named: the main job on the GPU (bf16), with a longer fine-tune than the CPU default.
if [[ "$req" == *" demo "* ]]; then
  # shellcheck disable=SC2086
  if run_step demo 240 demo.log "$PY" -m gmod_ext demo --no-progress --out "$OUT/demo" ${GMOD_GPU_DEMO_ARGS:---steps 200}; then
    tail_of demo.log 40
    if (( RC == 0 )); then
      record demo ok "$DUR" "$("$PY" - "$OUT/demo/report.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
h, t = r["heldout"], r["train"]
ratio = t.get("step_time_ratio")
print(f"{r['device']} {r['dtype']}, {t['gmod']['steps']} steps: held-out loss dense {h['dense']['loss']:.3f} / "
      f"gamma-MoD {h['gmod']['loss']:.3f}; first answer token {h['dense']['first_token_accuracy']:.2f} / "
      f"{h['gmod']['first_token_accuracy']:.2f}; FLOPs {r['flops']['ratio']:.3f}; train step "
      + (f"{ratio:.3f}x dense" if ratio else "n/a"))
PYEOF
)"
    else record demo FAIL "$DUR" "rc=$RC; $(grep -m1 -E 'Error|error' "$OUT/demo.log" | cut -c1-120)"; fi
  fi
fi

# ------------------------------------------------------------------ tests
if want tests; then
  # The tests marked cuda (the GPU side of every op test, test_attention_cuda.py, test_cuda_build.py):
  # the CPU tests, the kernel emulation and the wheel build run in CI; here the time goes to the GPU.
  # GMOD_GPU_CHECK_PYTEST_ARGS replaces the selection (e.g. "-m cuda -k decode", or "" for all tests).
  # The wgmma kernels' own tests (the forced wgmma flags) run apart
  # (step tests_wgmma, after the rest): a kernel that hangs there must not take the other tests' results
  # with it when the step's time limit kills pytest. faulthandler_timeout dumps the stacks of a test that
  # runs over 60 s, so a hang names its test in the log.
  pytest_step() {  # name limit selection...
    local name=$1 limit=$2; shift 2
    # shellcheck disable=SC2086
    if run_step "$name" "$limit" "$name.log" "$PY" -m pytest python_tests -q -rfE --durations=10 -p no:cacheprovider \
         -o faulthandler_timeout=60 --ignore=python_tests/test_bench_smoke.py \
         --ignore=python_tests/test_kernel_emulation.py --ignore=python_tests/test_wheel.py "$@"; then
      line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected)|(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$OUT/$name.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
      [[ -z "$line" ]] && line="no pytest summary (rc=$RC)"
      tail_of "$name.log" 12
      # every test skipped means the CUDA kernels were not found: that is a failure here
      if (( RC == 0 )) && [[ "$line" == *" passed"* ]]; then record "$name" ok "$DUR" "$line"
      elif (( RC == 0 )); then record "$name" FAIL "$DUR" "no test passed (no GPU or no CUDA kernels?): $line"
      else record "$name" FAIL "$DUR" "rc=$RC: $line"; fi
    fi
  }
  if [[ -n "${GMOD_GPU_CHECK_PYTEST_ARGS+set}" ]]; then
    # shellcheck disable=SC2086
    pytest_step tests 280 $GMOD_GPU_CHECK_PYTEST_ARGS
  else
    pytest_step tests 220 -m cuda -k "not wgmma"
    pytest_step tests_wgmma 100 -m cuda -k wgmma
  fi
fi

# ------------------------------------------------------------------ compute-sanitizer
sanitize() {  # tool limit extra-args...
  local tool=$1 limit=$2; shift 2
  if ! command -v compute-sanitizer > /dev/null; then record "$tool" "FAIL" 0 "compute-sanitizer not found"; return; fi
  if run_step "$tool" "$limit" "$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
       compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 30 "$@" "$PY" scripts/sanitize_ops.py; then
    local errs summ script
    # memcheck/synccheck/initcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: H hazards
    # displayed (E errors, W warnings)" (warnings are reported in the detail but do not fail the step)
    errs=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$OUT/$tool.log" | tail -n 1 | grep -oE "[0-9]+")
    [[ -z "$errs" ]] && errs=$(grep -oE "RACECHECK SUMMARY: .*\(([0-9]+) error" "$OUT/$tool.log" | tail -n 1 | grep -oE "\([0-9]+" | tr -d '(')
    summ=$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/$tool.log" | tail -n 1 | sed 's/^=* *//')
    script=$(grep -E "^sanitize_ops:" "$OUT/$tool.log" | tail -n 1)
    tail_of "$tool.log" 10
    if [[ $RC -eq 0 && "${errs:-0}" == "0" && "$script" == *" 0 failed"* ]]; then
      record "$tool" ok "$DUR" "${summ}; ${script}"
    else
      record "$tool" FAIL "$DUR" "rc=$RC ${summ:-no sanitizer summary}; ${script:-script did not finish}"
    fi
  fi
}
want memcheck && sanitize memcheck 150 --leak-check no
want racecheck && sanitize racecheck 150 --racecheck-report analysis
want synccheck && sanitize synccheck 150
want initcheck && sanitize initcheck 150

# ------------------------------------------------------------------ ncu
if want ncu; then
  if ! command -v ncu > /dev/null; then
    record ncu FAIL 0 "ncu not found"
  elif run_step ncu 150 ncu.log ncu --clock-control none --kernel-name-base demangled --kernel-name regex:gmod --launch-count 30 \
         --section SpeedOfLight --csv --page details "$PY" scripts/sanitize_ops.py --large; then
    grep -E '^"' "$OUT/ncu.log" > "$OUT/ncu.csv"
    "$PY" scripts/ncu_summary.py "$OUT/ncu.csv" > "$OUT/ncu_summary.txt" 2>&1
    cut -c1-130 "$OUT/ncu_summary.txt"
    n=$(grep -oE "^[0-9]+ kernels profiled" "$OUT/ncu_summary.txt" | grep -oE "^[0-9]+")
    if (( RC == 0 )) && [[ -n "$n" && "$n" != 0 ]]; then
      record ncu ok "$DUR" "$n kernels (ncu_summary.txt)"
    else
      record ncu FAIL "$DUR" "rc=$RC, ${n:-0} kernels: $(grep -m1 -E 'ERR|==ERROR==|WARNING' "$OUT/ncu.log" | cut -c1-120)"
    fi
  fi
fi

# ------------------------------------------------------------------ ncu_attn
# The attention kernels at benchmark shapes: prefill forward + backward (B=4, C=2048, H=32, d=128,
# bf16, causal), GQA decode (B=8, 8192 cached keys; B=1, 4096: the split kernel against the
# combine's time; B=1, 4096 again with three K / V buffers, GMOD_ATTN_DECODE_STAGES=3) and the wgmma forward +
# backward at the prefill shape, with the tensor pipe utilisation and the achieved occupancy.
STALLS=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' barrier long_scoreboard \
  short_scoreboard mio_throttle math_pipe_throttle wait lg_throttle not_selected dispatch_stall no_instruction)
STALLS=${STALLS%,}
if want ncu_attn; then
  if ! command -v ncu > /dev/null; then
    record ncu_attn FAIL 0 "ncu not found"
  else
    : > "$OUT/ncu_attn.csv"; : > "$OUT/ncu_attn.log"
    ok=1; dur_all=0
    # last: the sm_90a wgmma forward and backward (GMOD_ATTN_{FWD,BWD}_IMPL=wgmma) at the same prefill shape
    for args in "--B 4 --C 2048 --bwd" "--B 8 --C 8192 --H 32 --Hk 8 --decode" "--B 1 --C 4096 --H 32 --Hk 8 --decode" \
        "--B 1 --C 4096 --H 32 --Hk 8 --decode --decode-stages 3" "--B 4 --C 2048 --bwd --fwd-impl wgmma --bwd-impl wgmma"; do
      run_step ncu_attn 90 ncu_attn_run.log ncu --clock-control none --kernel-name-base demangled \
        --kernel-name regex:gmod_attn --launch-skip 3 --launch-count 4 --section SpeedOfLight --section Occupancy \
        --section LaunchStats --metrics "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,$STALLS" \
        --csv --page details "$PY" scripts/profile_attention_case.py $args || break
      (( RC == 0 )) || ok=0
      dur_all=$((dur_all + DUR))
      cat "$OUT/ncu_attn_run.log" >> "$OUT/ncu_attn.log"
      grep -E '^"' "$OUT/ncu_attn_run.log" >> "$OUT/ncu_attn.csv"
    done
    "$PY" scripts/ncu_summary.py "$OUT/ncu_attn.csv" > "$OUT/ncu_attn_summary.txt" 2>&1
    cut -c1-130 "$OUT/ncu_attn_summary.txt"
    n=$(grep -oE "^[0-9]+ kernels profiled" "$OUT/ncu_attn_summary.txt" | grep -oE "^[0-9]+")
    if (( ok )) && [[ -n "$n" && "$n" != 0 ]]; then
      record ncu_attn ok "$dur_all" "$n launches (ncu_attn_summary.txt)"
    else
      record ncu_attn FAIL "$dur_all" "rc=$RC, ${n:-0} launches: $(grep -m1 -E 'ERR|==ERROR==' "$OUT/ncu_attn.log" | cut -c1-120)"
    fi
  fi
fi

# ------------------------------------------------------------------ decode_timeline
# Where a batch-1 decode call's time goes (split kernel, gap, combine kernel, outside the kernels), with
# two and three K / V buffers in the key-split decode, after the benchmark's L2 flush and with rotating caches instead:
# the fixed ~15 us per call that keeps batch 1 from the target.
if want decode_timeline; then
  if run_step decode_timeline 150 decode_timeline.log "$PY" scripts/decode_timeline.py --json "$OUT/decode_timeline.json"; then
    tail_of decode_timeline.log 20
    if (( RC == 0 )); then record decode_timeline ok "$DUR" "per-kernel times in decode_timeline.log"
    else record decode_timeline FAIL "$DUR" "rc=$RC: $(tail -n 1 "$OUT/decode_timeline.log" | cut -c1-120)"; fi
  fi
fi

# ------------------------------------------------------------------ ncu_nvtx (only when named)
# The README's NVTX-filtered command: only the gmod_ kernels inside the MoD layer's gmod.attention range.
if [[ "$req" == *" ncu_nvtx "* ]]; then
  if ! command -v ncu > /dev/null; then
    record ncu_nvtx FAIL 0 "ncu not found"
  elif run_step ncu_nvtx 150 ncu_nvtx.log env GMOD_NVTX=1 ncu --clock-control none --nvtx \
         --nvtx-include "gmod.attention/" --kernel-name regex:gmod_ --section SpeedOfLight --launch-count 4 \
         --csv --page details \
         "$PY" -m gmod_ext.bench layer --quick --device cuda --attention gmod; then
    grep -E '^"' "$OUT/ncu_nvtx.log" > "$OUT/ncu_nvtx.csv"
    "$PY" scripts/ncu_summary.py "$OUT/ncu_nvtx.csv" > "$OUT/ncu_nvtx_summary.txt" 2>&1
    cut -c1-120 "$OUT/ncu_nvtx_summary.txt"
    n=$(grep -oE "^[0-9]+ kernels profiled" "$OUT/ncu_nvtx_summary.txt" | grep -oE "^[0-9]+")
    # CSV rows (one per metric) of kernels not named gmod_* (the summary's labels are cut on the left)
    others=$(grep -E '^"[0-9]' "$OUT/ncu_nvtx.csv" | grep -vc 'gmod_')
    # The range also holds the q/k/v projections and RoPE (torch kernels); the name filter keeps ours.
    if (( RC == 0 )) && [[ -n "$n" && "$n" != 0 && "$others" == 0 ]]; then
      record ncu_nvtx ok "$DUR" "$n gmod_ launches in gmod.attention"
    else
      record ncu_nvtx FAIL "$DUR" "rc=$RC, ${n:-0} launches: $(grep -m1 -E 'ERR|==ERROR==|WARNING' "$OUT/ncu_nvtx.log" | cut -c1-120)"
    fi
  fi
fi

# ------------------------------------------------------------------ tables, then the summary LAST
for b in bench_ops bench_attention bench_attention_det bench_layer bench_model; do
  if [[ -f "$OUT/$b.log" ]]; then
    echo; echo "################ $b (full log: $b.log, numbers: $b.json)"
    # the tables only: from the first '== ' line up to the status line
    awk '/^== /{on=1} on{print} /^status:/{exit}' "$OUT/$b.log" | cut -c1-200
  fi
done

"$PY" - "$OUT" "$BUDGET" "$SECONDS" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, os, sys
out, budget, secs = sys.argv[1], sys.argv[2], sys.argv[3]
steps = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "steps.tsv")) if l.strip()]
print("=" * 30 + " gmod_ext GPU check summary " + "=" * 30)
print(f"{'step':<16} {'status':<22} {'s':>4}  detail")
for name, st, s, detail in steps:
    print(f"{name:<16} {st:<22} {s:>4}  {detail[:150]}")
print(f"total {secs} s of a {budget} s budget; logs and JSON in {out}")

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None

def f(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else str(v if v is not None else "-")[:28]

ops = load("bench_ops.json")
if ops:
    secs_ = ops["sections"]
    print(f"-- ops ({ops['status']}): copy {f(ops.get('copy_GBps'), '.0f')} GB/s")
    for r in secs_.get("ops", {}).get("rows", []):
        print(f"   {r['op']:<14}{r['pass']:<4} {f(r.get('gmod_ms'), '.4g'):>10} ms  {f(r.get('GBps'), '.0f'):>6} GB/s "
              f"{f(r.get('pct_copy'), '.0f'):>4}% copy  vs torch {f(r.get('speedup'), '.2f')}  {r.get('check') or ''}"[:150])
    for r in secs_.get("route", {}).get("rows", []):
        print(f"   route {r['shape']:<9} gmod {f(r.get('gmod_ms'), '.4g')} ms, torch {f(r.get('torch_ms'), '.4g')} ms, "
              f"speedup {f(r.get('speedup'), '.2f')}  {r.get('check') or ''}"[:150])
    for r in secs_.get("overhead", {}).get("rows", []):
        print(f"   MoD overhead {r['impl']:<20} {f(r.get('ms'), '.4g')} ms = {f(r.get('x_floor'), '.2f')} x floor "
              f"({f(r.get('floor_ms'), '.4g')} ms)  {r.get('check') or ''}"[:150])
att = load("bench_attention.json")
if att:
    print(f"-- attention ({att['status']}): gmod TFLOP/s and ratio to SDPA flash")
    rows = att["sections"].get("prefill", {}).get("rows", [])
    for r in rows:
        if r["impl"] == "gmod":
            print(f"   {r['pass']} {r['shape']:>7} d{r['d']:<4} gmod {f(r.get('TFLOPs'), '.4g'):>7} TFLOP/s  "
                  f"vs flash {f(r.get('vs_flash'), '.2f'):>5}  {r.get('check') or r.get('ms')}"[:150])
    for r in att["sections"].get("decode", {}).get("rows", []):
        if r["impl"] == "gmod":
            print(f"   decode B{r['B']:<3} L{r['L']:<6} {f(r.get('GBps'), '.0f'):>6} GB/s {f(r.get('pct_copy'), '.0f'):>4}% copy "
                  f"{f(r.get('pct_copy_size'), '.0f'):>4}% same-size copy vs flash {f(r.get('vs_flash'), '.2f'):>5}  {r.get('check') or r.get('ms')}"[:150])
# The tile experiments (bench_attention --experiments): gmod-exp against gmod, row by row.
if att:
    exp_rows = [r for r in att["sections"].get("prefill", {}).get("rows", []) if r["impl"] == "gmod-exp"]
    if exp_rows:
        print("-- kernel experiments (gmod-exp: fwd = GMOD_ATTN_FWD_IMPL=mma, bwd = GMOD_ATTN_BWD_IMPL=mma, "
              "the defaults before 2026-11-26; decode = GMOD_ATTN_DECODE_STAGES=3, opt-in)")
        for r in exp_rows:
            print(f"   {r['pass']} {r['shape']:>7} d{r['d']:<4} {f(r.get('TFLOPs'), '.4g'):>7} TFLOP/s = "
                  f"{f(r.get('vs_default'), '.3f')}x the default  {r.get('check') or r.get('ms')}"[:150])
    for r in att["sections"].get("decode", {}).get("rows", []):
        if r["impl"] == "gmod-exp":  # GMOD_ATTN_DECODE_STAGES=3: three K / V buffers in the key-split decode
            print(f"   decode STAGES=3 B{r['B']:<3} L{r['L']:<6} {f(r.get('pct_copy'), '.0f'):>4}% copy "
                  f"{f(r.get('pct_copy_size'), '.0f'):>4}% same-size = {f(r.get('vs_default'), '.3f')}x the default  "
                  f"{r.get('check') or r.get('ms')}"[:150])
# The layer and model benchmarks (named steps): gamma-MoD against dense, and issue 7's targets.
def inv(x):
    return 1.0 / x if isinstance(x, (int, float)) and x > 0 else None

lay, mod = load("bench_layer.json"), load("bench_model.json")
if lay:
    print(f"-- layer ({lay['status']}): gmod MoD layer vs the dense layer on all tokens / on the kept tokens only")
for r in (lay or {}).get("sections", {}).get("layer", {}).get("rows", []):
    if r["impl"] in ("gmod MoD", "gmod MoD, torch rope"):  # (the second: GMOD_ROPE=torch, to weigh gmod.rope)
        tag = "" if r["impl"] == "gmod MoD" else " (torch rope)"
        print(f"   {r['pass'] + tag:<20} {f(r.get('ms'), '.4g'):>8} ms = {f(r.get('vs_dense'), '.3f')} x dense, "
              f"{f(r.get('vs_kept'), '.3f')} x kept-only  {r.get('check') or ''}"[:150])
if mod:
    print(f"-- model ({mod['status']}): gamma-MoD speed-up over dense (targets: prefill >= 1.7x, train step >= 1.5x)")
    msec = mod.get("sections", {}).get("model", {})
    print(f"   {msec.get('title', '')}"[:200])
    for n in msec.get("notes", []):
        print(f"   note: {n}"[:200])
    peaks = [r.get("peak_GB") for r in msec.get("rows", []) if isinstance(r.get("peak_GB"), (int, float))]
    if peaks:
        print(f"   peak memory {max(peaks):.1f} GB (dense train step; the estimate is in the title)")
for r in (mod or {}).get("sections", {}).get("model", {}).get("rows", []):
    if r["impl"] != "dense":
        print(f"   {r['impl']:<14} {r['pass']:<10} {f(inv(r.get('x_dense')), '.2f'):>5}x  (FLOPs bound {f(inv(r.get('flops')), '.2f')}x)  "
              f"{r.get('info') or ''}  {f(r.get('ms'), '.4g')} ms"[:150])
# --profile: GPU time by kernel group, and the largest matmuls by shape with their TFLOP/s per impl.
prof_rows = (mod or {}).get("sections", {}).get("profile", {}).get("rows", [])
if prof_rows:
    print("   GPU ms by group: " + "; ".join(
        f"{r['impl']} {r['group'][:24]} {f(r.get('ms'), '.1f')}" for r in prof_rows
        if r.get("group") in ("total", "GEMM (cuBLAS)", "torch elementwise", "attention (SDPA)")
        or "gmod_attn" in str(r.get("group")))[:600])
gemm_rows = (mod or {}).get("sections", {}).get("gemm", {}).get("rows", [])
for impl in dict.fromkeys(r["impl"] for r in gemm_rows):
    top = [r for r in gemm_rows if r["impl"] == impl][:5]
    print(f"   GEMMs {impl}: " + "; ".join(f"{r['op']} {r['shape']} x{r['calls']} {f(r.get('ms'), '.1f')} ms "
                                          f"{f(r.get('TFLOPs'), '.0f')} TF/s" for r in top)[:400])
for name, doc in (("ops", ops), ("attention", att), ("layer", lay), ("model", mod)):
    if doc and doc.get("mismatches"):
        print(f"!!! MISMATCH in bench {name}: " + "; ".join(m["bench"] for m in doc["mismatches"]))
EOF
src=$?
# the decisions these numbers settle (flip a default, revert one), one line each
"$PY" scripts/gpu_verdicts.py "$OUT" >> "$OUT/summary.txt" 2>&1
echo
if (( src == 0 )); then cat "$OUT/summary.txt"; else cat "$STATUS_FILE"; tail -n 5 "$OUT/summary.txt"; fi
echo "overall: $([[ $ANY_FAIL == 0 ]] && echo ok || echo FAILURES) ($SECONDS s)"
# GMOD_GPU_CHECK_PACK=1: the device tool brings back at most 8 files from $OUT, so leave two there:
# summary.txt and gpu_check.tgz holding everything (logs, JSON, ncu CSVs).
if [[ "${GMOD_GPU_CHECK_PACK:-0}" == 1 ]]; then
  pack=$(mktemp -d)
  if tar czf "$pack/gpu_check.tgz" -C "$OUT" . ; then
    find "$OUT" -mindepth 1 ! -name summary.txt -delete
    mv "$pack/gpu_check.tgz" "$OUT/" && echo "packed: $OUT/gpu_check.tgz + summary.txt"
  fi
  rmdir "$pack" 2>/dev/null
fi
exit $ANY_FAIL
