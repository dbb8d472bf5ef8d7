#!/usr/bin/env bash
# arm64 check: the phone chat app, run under qemu-aarch64 on an arm64 Debian userland with NumPy's aarch64 wheel
# (NumPy backend, pure-Python tokenizer: what Termux runs), must give the same greedy token ids as the x86 run
# of the same bundles.
#
#   bash android_demo/arm64_check.sh            # tiny int4 + int8 bundles, a few minutes (fetches cached)
#   ARM64_FULL=1 bash android_demo/arm64_check.sh   # also SmolLM2-135M int4 (slow under qemu)
#   bash android_demo/arm64_check.sh prepare        # only fetch and unpack the arm64 userland
#
# Everything fetched lives in cache/arm64/ and is reused: Debian's arm64 packages (apt-get download, unpacked
# with dpkg -x into a folder; no root filesystem image), qemu-user-static from Debian, aarch64 wheels from PyPI.
# Root is needed only once, for `dpkg --add-architecture arm64` + `apt-get update`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
CACHE=$REPO/cache/arm64
BUILD=$REPO/build/arm64
ROOTFS=$CACHE/root
SITE=$CACHE/site
QEMU=$ROOTFS/usr/bin/qemu-aarch64-static
PYV=""   # the arm64 Python's version (3.11 on Debian 12), recorded with the downloaded packages

# Debian's arm64 Python and the shared libraries its standard library loads (ctypes, ssl, sqlite, ...). A name
# with a t64 twin (Debian 13 renamed several libraries) is resolved by resolve_debs.
LIBS=(libc6 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libgcc-s1 libstdc++6 libcrypt1 libuuid1
      libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libdb5.3 libnsl2 libtirpc3)
WHEELS=(numpy jinja2 markupsafe)   # what Termux gets from `pkg install python-numpy` + pip
SCRIPT=$REPO/android_demo/arm64_script.txt
MAX_NEW=${ARM64_MAX_NEW:-20}

say() { printf '[arm64-check] %s\n' "$*" >&2; }
die() { printf '[arm64-check] FAILED: %s\n' "$*" >&2; exit 1; }

# -- fetch (each step leaves a stamp when complete, so an interrupted run redoes only that step) --------------

ensure_arch() {
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "enabling Debian's arm64 architecture (dpkg --add-architecture arm64)"
    dpkg --add-architecture arm64 || die "dpkg --add-architecture arm64 needs root"
    apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
  fi
}

known() { apt-cache show "$1" >/dev/null 2>&1; }

pick() {  # pick NAME...: the first of these package names apt knows (nothing if none)
  local name
  for name in "$@"; do known "$name" && { echo "$name"; return; }; done
}

resolve_debs() {  # sets PYV and DEBS from what this Debian release calls them
  local v lib name
  for v in 3.11 3.12 3.13; do known "python$v-minimal:arm64" && { PYV=$v; break; }; done
  [[ -n $PYV ]] || die "apt knows no python3.1x-minimal:arm64 (apt-get update after dpkg --add-architecture arm64?)"
  name=$(pick qemu-user-static qemu-user)
  [[ -n $name ]] || die "apt knows neither qemu-user-static nor qemu-user"
  DEBS=("$name" "python$PYV-minimal:arm64" "libpython$PYV-minimal:arm64" "libpython$PYV-stdlib:arm64" media-types)
  for lib in "${LIBS[@]}"; do
    name=$(pick "$lib:arm64" "${lib}t64:arm64")
    [[ -n $name ]] || die "apt knows no $lib:arm64"
    DEBS+=("$name")
  done
}

apt_download() { (cd "$1" && apt-get download -q -o APT::Sandbox::User=root "${DEBS[@]}" >/dev/null); }

fetch_debs() {
  local dir=$CACHE/debs
  if [[ -f $dir/.complete && -f $dir/python-version ]]; then PYV=$(<"$dir/python-version"); return; fi
  ensure_arch
  resolve_debs
  rm -rf "$dir" "$ROOTFS" "$CACHE/wheels" "$SITE" && mkdir -p "$dir"  # what was built from older packages too
  say "downloading ${#DEBS[@]} Debian packages (python$PYV for arm64, qemu) into $dir"
  if ! apt_download "$dir"; then
    say "apt-get download failed; refreshing the package lists once and retrying"
    apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
    resolve_debs
    apt_download "$dir" || die "apt-get download ${DEBS[*]} failed (see the apt messages above)"
  fi
  echo "$PYV" >"$dir/python-version"
  touch "$dir/.complete"
}

unpack_root() {
  [[ -f $ROOTFS/.complete ]] && return
  rm -rf "$ROOTFS" && mkdir -p "$ROOTFS"
  say "unpacking the arm64 userland into $ROOTFS"
  local deb
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$ROOTFS" || die "dpkg -x $deb failed"; done
  # qemu-user-static ships every target: keep aarch64 only (saves ~400 MB).
  find "$ROOTFS/usr/bin" -name 'qemu-*-static' ! -name qemu-aarch64-static -delete
  # qemu -L falls back to the host's file when the folder lacks one: shadow the host's x86 site-packages.
  mkdir -p "$ROOTFS/usr/lib/python3/dist-packages" "$ROOTFS/usr/local/lib/python$PYV/dist-packages"
  [[ -x $QEMU ]] || ln -s qemu-aarch64 "$QEMU" 2>/dev/null || true  # qemu-user names it without -static
  [[ -x $QEMU ]] || die "no qemu-aarch64(-static) in the qemu package"
  touch "$ROOTFS/.complete"
}

fetch_wheels() {
  local dir=$CACHE/wheels
  [[ -f $dir/.complete ]] && return
  rm -rf "$dir" "$SITE" && mkdir -p "$dir" "$SITE"
  say "downloading aarch64 wheels: ${WHEELS[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_aarch64 \
      --python-version "$PYV" --implementation cp -d "$dir" "${WHEELS[@]}" \
    || die "pip download of the aarch64 wheels failed (is PyPI reachable?)"
  local whl
  for whl in "$dir"/*.whl; do "$PY" -m zipfile -e "$whl" "$SITE" || die "cannot unpack $whl"; done
  touch "$dir/.complete"
}

arm_python() {  # run the arm64 interpreter under qemu in a clean environment
  env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8 PYTHONPATH="$SITE" PYTHONDONTWRITEBYTECODE=1 \
      OPENBLAS_CORETYPE=ARMV8 EDGE_RUNTIME_TOKENIZER=python \
      "$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python$PYV" "$@"
}

# -- bundles -----------------------------------------------------------------------------------------------

export_bundle() {  # export_bundle SOURCE QUANT OUT: skipped when OUT already holds a bundle
  local source=$1 quant=$2 out=$3
  [[ -f $out/manifest.json ]] && return
  say "exporting $source ($quant) to $out"
  OMP_NUM_THREADS=1 "$PY" -m export.cli "$source" --quant "$quant" --out "$out" --quiet >&2 \
    || die "export of $source failed"
}

# -- the comparison ----------------------------------------------------------------------------------------

chat_args() {  # the same settings on both sides: greedy, one thread (no reduction-order differences)
  printf '%s\n' "$1" --backend numpy --greedy --threads 1 --print-ids --max-new-tokens "$MAX_NEW" --no-verify
}

compare() {  # compare NAME BUNDLE: x86 transcript vs arm64 transcript (stdout: messages, answers, ids)
  local name=$1 bundle=$2 out=$BUILD/$1
  mkdir -p "$out"
  mapfile -t args < <(chat_args "$bundle")
  "$PY" android_demo/chat.py "${args[@]}" <"$SCRIPT" >"$out/x86.txt" 2>"$out/x86.log" \
    || die "x86 chat run failed on $name (see $out/x86.log)"
  local t0=$SECONDS
  arm_python android_demo/chat.py "${args[@]}" <"$SCRIPT" >"$out/arm64.txt" 2>"$out/arm64.log" \
    || die "arm64 chat run failed on $name (see $out/arm64.log)"
  grep -q '^ids: [0-9]' "$out/x86.txt" || die "no token ids in the x86 transcript of $name"
  grep -q 'tokenizer python' "$out/arm64.log" || die "the arm64 run did not use the pure-Python tokenizer"
  if ! diff -u "$out/x86.txt" "$out/arm64.txt" >"$out/diff.txt"; then
    cat "$out/diff.txt" >&2
    die "$name: arm64 transcript differs from x86 (diff above; logs in $out)"
  fi
  say "$name: $(grep -c '^ids:' "$out/x86.txt") answers, token ids identical on x86 and arm64" \
      "(arm64 run $((SECONDS - t0)) s under qemu)"
}

main() {
  mkdir -p "$CACHE" "$BUILD"
  command -v apt-get >/dev/null || die "needs a Debian-based host (apt-get, dpkg)"
  [[ -x $PY ]] || die "no Python at $PY (run make venv first)"
  fetch_debs
  unpack_root
  fetch_wheels
  arm_python -c "import platform, numpy, jinja2; assert platform.machine() == 'aarch64', platform.machine()" \
    || die "the arm64 Python cannot import numpy/jinja2 under qemu"
  say "arm64 userland ready: $(arm_python -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)')"
  [[ ${1:-} == prepare ]] && return
  export_bundle tiny:llama int4 "$BUILD/tiny-int4"
  export_bundle tiny:llama int8 "$BUILD/tiny-int8"
  compare tiny-int4 "$BUILD/tiny-int4"
  compare tiny-int8 "$BUILD/tiny-int8"
  if [[ ${ARM64_FULL:-0} == 1 ]]; then
    local model=$REPO/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [[ -f $model ]] || die "ARM64_FULL=1 needs $model (make model)"
    export_bundle "$model" int4 "$REPO/build/android/smollm2-int4"
    MAX_NEW=${ARM64_FULL_MAX_NEW:-8} SCRIPT=$REPO/android_demo/arm64_script_full.txt \
      compare smollm2-int4 "$REPO/build/android/smollm2-int4"
  fi
  say "passed"
}

main "$@"
