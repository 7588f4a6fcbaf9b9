#!/usr/bin/env bash
# Makes sure the build's system dependencies are present: a Rust toolchain, a C/C++ compiler
# (RocksDB is C++) and libclang (bindgen generates RocksDB's Rust bindings). protoc is not
# needed: it comes from the protoc-bin-vendored crate. Installs what is missing with apt-get
# when it can; otherwise says what to install and stops.
set -euo pipefail

missing=()
command -v cargo >/dev/null 2>&1 || {
  echo "kord: cargo not found. Install Rust (https://rustup.rs), then run this again." >&2
  exit 1
}
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
# libclang itself, not libclang-cpp (which some toolchains install alone, and bindgen cannot use).
if [ -z "${LIBCLANG_PATH:-}" ] && ! compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
  && ! compgen -G '/usr/lib/*-linux-gnu/libclang.so*' >/dev/null \
  && ! compgen -G '/usr/lib/*-linux-gnu/libclang-[0-9]*.so*' >/dev/null; then
  missing+=(libclang-dev clang)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "kord: installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "kord: installing ${missing[*]} with sudo apt-get" >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "kord: missing build dependencies: ${missing[*]}" >&2
  echo "      install them (Debian/Ubuntu: apt-get install ${missing[*]}; Fedora: dnf install clang-devel gcc-c++ make)" >&2
  echo "      or set LIBCLANG_PATH to the directory holding libclang.so, then run this again." >&2
  exit 1
fi
