#!/usr/bin/env bash
# Builds the host part of the native extension (csrc/*.cpp, no CUDA) with AddressSanitizer and
# UndefinedBehaviorSanitizer in a copy of the working tree, and runs the extension's tests against
# that build. Any sanitizer report fails the check. Python and torch are not instrumented, so the
# sanitizer runtime is preloaded into the interpreter (see ASAN_OPTIONS below for what that needs).
#
#   bash .ci/sanitize_check.sh        # about 3-4 minutes on 2 cores; MAX_JOBS defaults to 2
# SAM_KERNELS_SANITIZE_KEEP=1 keeps the copy (its path is printed) to rerun a test by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
export SAM_KERNELS_NO_CUDA=1 SAM_KERNELS_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-2}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py="${PYTHON:-python}"
work="$(mktemp -d)"
if [ "${SAM_KERNELS_SANITIZE_KEEP:-0}" = 1 ]; then echo "keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
src="$work/src"

# The tracked and untracked-but-not-ignored files (so no _C*.so or build/ from the checkout).
mkdir -p "$src"
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$src"

# How the flags get in: torch's BuildExtension (ninja) compiles with $CXX, putting the environment's
# CFLAGS *before* setup.py's extra_compile_args, whose -O3 would then win over our -O1; setuptools
# links a C++ extension with LDCXXSHARED ("g++ -shared" from sysconfig) plus LDFLAGS. So compile and
# link both go through a g++ wrapper that appends the sanitizer flags last (the last -O wins); its
# name contains "g++", which torch's compiler check accepts. setup.py is not touched.
san_flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -O1 -g"
real_cxx="$(command -v "${CXX:-g++}")"
mkdir -p "$work/bin"
cat > "$work/bin/g++-sanitize" <<EOF
#!/bin/sh
exec "$real_cxx" "\$@" $san_flags
EOF
chmod +x "$work/bin/g++-sanitize"
export CXX="$work/bin/g++-sanitize" LDCXXSHARED="$work/bin/g++-sanitize -shared" LDSHARED="$work/bin/g++-sanitize -shared"

echo "== build: host extension with -fsanitize=address,undefined (MAX_JOBS=$MAX_JOBS)"
t0=$SECONDS
(cd "$src" && "$py" setup.py -q build_ext --inplace)
build_s=$((SECONDS - t0))
# The module must really be instrumented (a build that silently dropped the flags would pass anything).
so="$(ls "$src"/sam_kernels/_C*.so)"
syms="$(nm -D --undefined-only "$so")"  # (not nm | grep -q: grep's early exit fails nm under pipefail)
[[ "$syms" == *__asan_report_load* ]] || { echo "FAIL: $so has no ASan instrumentation"; exit 1; }
[[ "$syms" == *__ubsan_handle_* ]] || { echo "FAIL: $so has no UBSan instrumentation"; exit 1; }

# Runtime: python and torch are not instrumented, so the ASan runtime is preloaded (it must be the
# first library in the process; a sanitized module dlopen()ed into a plain python is refused
# otherwise, hence no need for verify_asan_link_order=0). libstdc++ is preloaded with it: ASan
# intercepts __cxa_throw and binds the real one when it starts, and without libstdc++ already loaded
# then, the first C++ exception torch throws (every TORCH_CHECK a test provokes on purpose) dies with
# "AddressSanitizer: CHECK failed: ... real___cxa_throw != 0". Only the python processes (and what
# they start) get the preload, through san_py below, not tee/grep.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# detect_leaks=0   CPython and torch keep allocations alive until exit by design (interned objects,
#                  caches, registries), and the preload reaches the shells and compilers python
#                  starts: LeakSanitizer reports those at every exit, none of it ours.
# abort_on_error=1, halt_on_error=1   the first report kills the process, so pytest fails with it.
# Nothing else is needed on this code (checked): torch's posix_memalign/free and new/delete pairs
# raise no alloc_dealloc_mismatch, ODR checking (detect_odr_violation, on by default) finds nothing,
# and protect_shadow_gap is only for CUDA/driver mappings, which a host-only build never makes.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# The copy's package, not the checkout's editable install (which maps sam_kernels to the checkout).
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
san_py=(env LD_PRELOAD="$preload" "$py")

# --capture=sys: pytest's default capture (fd) would hold the sanitizer's report, which is written to
# file descriptor 2, in a temporary file, and abort_on_error kills the process before pytest shows
# it; capturing sys.stdout/stderr only lets the report through to the log.
tests=(tests/test_native_extension.py tests/test_step_plan.py tests/test_backend_parity.py tests/test_weight_guarantees.py
       tests/test_backend_registry.py)
[ -f "$src/tests/test_properties.py" ] && tests+=(tests/test_properties.py)

echo "== tests against the sanitized build: ${tests[*]}"
log="$work/pytest.log"
t0=$SECONDS
status=0
(cd "$src" && "${san_py[@]}" -c "import os, sam_kernels._C as C; f = os.path.realpath(C.__file__); \
assert f.startswith(os.path.realpath('$src') + os.sep), f; print('sam_kernels._C:', f)" \
  && "${san_py[@]}" -m pytest -p no:cacheprovider -q --capture=sys "${tests[@]}" -k "cpp or plan or native") 2>&1 | tee "$log" \
  || status=$?
test_s=$((SECONDS - t0))

echo "== build ${build_s}s, tests ${test_s}s"
if grep -qE "ERROR: AddressSanitizer|ERROR: LeakSanitizer|Sanitizer: CHECK failed|runtime error:" "$log"; then
  echo "FAIL: sanitizer report in the test output (above)"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "FAIL: tests exited with status $status"
  exit "$status"
fi
echo "OK: no sanitizer reports"
