#!/usr/bin/env bash
# Everything a session lent the GPU machine has to check, prepared to fit its device time (15 minutes in all,
# starting the machine included; 10 minutes a call). Run it in two device calls, each leaving its files in $OUT:
#
#   bash bench/gpu_session.sh test     # the venv over the machine's CUDA torch, then make test (about 5 min)
#   bash bench/gpu_session.sh bench    # the GPU bench: state path at the first GIB, runtime, calibration, the rest
#
# Before the first call, here: make gpu-wheels, and carry wheels/ (git-ignored). Each step's output is in
# $OUT/<step>.log, the card and torch in $OUT/gpu.txt, what ran and how it ended in $OUT/session.log, the bench's
# table in $OUT/results.md, the calibration's data in $OUT/calibration-gpu.json (goes to bench/data/). The machine's start counts against the session's device time too: before the second
# call, read budget_left_s from `status` and give the bench a limit under it (BENCH_S=..., and the call's timeout_s
# a little above).
set -u
case "${1:-}" in
    test|bench) ;;
    *) echo "usage: bash bench/gpu_session.sh test|bench" >&2; exit 2 ;;
esac
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
t0=$SECONDS
note() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$OUT/session.log"; }

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, report
    local name=$1 limit=$2
    shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    note "$name: exit $rc$([ $rc = 124 ] && echo " (over its $limit s)")"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
    return $rc
}

# a machine without make: the one make gpu-wheels unpacked into wheels/make
command -v make > /dev/null || export PATH="$PWD/wheels/make/usr/bin:$PATH"
command -v make > /dev/null || { note "no make here, and none in wheels/make (make gpu-wheels on a Debian host)"
                                 exit 1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; nproc; } \
    > "$OUT/gpu.txt" 2>/dev/null
step venv 180 make .venv/.installed OFFLINE=1 || exit 1
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$OUT/session.log"

if [ "$1" = test ]; then
    # one line per test as it ends (make test's -q and two -v): a run cut short by its limit still says which passed
    PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -v -v" step test "${TEST_S:-420}" make test OFFLINE=1 WORKERS="${WORKERS:-6}"
else
    # straight into $OUT: if the device call's own limit (the session's device time left) kills everything, the
    # benches that finished are already there
    step bench "${BENCH_S:-480}" make gpu-bench GIB="${GIB:-1 8}" GPU_RESULTS="$(realpath -m "$OUT")/results.md"
    # the calibration's predicted-vs-measured data, for bench/data/ (notebooks/calibration.ipynb plots every run)
    cp out/bench-calibrate/validate.json "$OUT/calibration-gpu.json" 2>/dev/null && note "calibration data kept"
fi
