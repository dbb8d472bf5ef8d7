#!/usr/bin/env bash
# Set up edge-runtime in Termux on an Android phone: NumPy from Termux's own packages, this package without its
# compiled dependencies (no ONNX Runtime or `tokenizers` wheel exists for Termux), Jinja2 for chat templates.
#
#   bash android_demo/setup_termux.sh [BUNDLE_DIR]
#
# Run from the root of an unpacked edge-runtime source tree. BUNDLE_DIR (optional) is a bundle pushed to the
# phone's shared storage, e.g. ~/storage/downloads/smollm2-int4; it is copied to ~/bundles/ (app storage:
# faster to memory-map than shared storage, and safe from media scanners).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${PKG:-pkg}            # overridable so the script can be exercised off-device
PYTHON=${PYTHON:-python}
BUNDLES=${BUNDLES:-$HOME/bundles}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }

[[ -n ${TERMUX_VERSION:-} || $PKG != pkg ]] || say "warning: this does not look like Termux (TERMUX_VERSION unset)"
[[ -f pyproject.toml && -d edge_runtime ]] || die "run me from an edge-runtime source tree"

say "installing Python and NumPy from Termux's packages"
"$PKG" install -y python python-pip python-numpy || die "pkg install failed (try: pkg update)"

say "installing edge-runtime without its compiled dependencies (the NumPy backend and pure-Python tokenizer)"
"$PYTHON" -m pip install --no-deps . || die "pip install --no-deps . failed"
# MarkupSafe builds its optional C speedup when clang is present and falls back to pure Python otherwise.
"$PYTHON" -m pip install jinja2 markupsafe || die "pip install jinja2 markupsafe failed"

say "checking the runtime imports"
"$PYTHON" -c "import edge_runtime, numpy, jinja2; print('edge-runtime', edge_runtime.__version__, \
'numpy', numpy.__version__)" || die "edge_runtime does not import"

if [[ $# -ge 1 ]]; then
  src=${1%/}
  [[ -f $src/manifest.json ]] || die "$src is not a bundle (no manifest.json); run termux-setup-storage first?"
  mkdir -p "$BUNDLES"
  say "copying $src to $BUNDLES/"
  cp -r "$src" "$BUNDLES/" || die "copy failed"
  say "ready: $PYTHON android_demo/chat.py $BUNDLES/$(basename "$src") --profile phone-3gb"
else
  say "ready: push a bundle (see android_demo/README.md), then: $PYTHON android_demo/chat.py BUNDLE"
fi
