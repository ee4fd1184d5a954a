#!/usr/bin/env bash
# The wheel as a user gets it: `maturin build --release` gives one abi3 wheel for CPython >= 3.11;
# it is installed into a fresh venv whose PATH has no cargo or rustc (nothing may compile), and
# the installed package and command are exercised on a tar made here. Usage:
#   scripts/wheel_smoke.sh [WHEEL_DIR]    (default: build into target/wheels-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${1:-target/wheels-smoke}
if [ -z "${1:-}" ]; then
    rm -rf "$out"
    maturin build --release --locked --out "$out" >/dev/null
fi
wheels=("$out"/layerstore-*-cp311-abi3-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "wheel-smoke: expected one abi3 wheel in $out" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
# No Rust toolchain on PATH from here on: the wheel must install and run without one.
clean_path=$(tr ':' '\n' <<<"$PATH" | grep -v -e '\.cargo' -e 'rustup' | paste -sd:)
env PATH="$work/venv/bin:$clean_path" bash -euo pipefail -c '
    ! command -v cargo >/dev/null || { echo "wheel-smoke: cargo is still on PATH" >&2; exit 1; }
    pip install --quiet --disable-pip-version-check "$1"
    cd "$2"
    mkdir -p root/etc && echo "ID=smoke" > root/etc/os-release
    tar -C root -czf layer.tar.gz .
    layerstore --store store import layer.tar.gz >/dev/null
    layerstore --store store tag smoke:1 "$(layerstore --store store --json ls | python -c "import json,sys; print(json.load(sys.stdin)[0][\"id\"])")" >/dev/null
    test "$(layerstore --store store cat smoke:1 /etc/os-release)" = "ID=smoke"
    python -c "import layerstore as ls; s = ls.Store(\"store\"); assert s.get(\"smoke:1\").read_bytes(\"/etc/os-release\") == b\"ID=smoke\\n\""
    python -m layerstore --version
' wheel-smoke "$(realpath "${wheels[0]}")" "$work"
echo "wheel-smoke: ok (${wheels[0]##*/})"
