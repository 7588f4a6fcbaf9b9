#!/usr/bin/env bash
# Builds container images offline as docker-archive tarballs and imports them into the local
# cluster's containerd (namespace k8s.io), when it runs.
#
#   image.sh pause                    # kord.local/pause:1, a static sleep-until-SIGTERM binary
#   image.sh all                      # kord (kord + kordctl), kord-k8s-sample, kord-operator
#                                     # (each when its release binary exists), tagged <git-sha>
#   image.sh REPO BIN [BIN...]        # any list of binaries; the first is the entrypoint
#
# Environment: KORD_IMAGE_TAG (default: short git sha, "-dirty" when the tree has changes),
# CARGO_TARGET_DIR (default ~/.cache/kord/target), KORD_IMAGE_PROFILE (release or debug: which
# build's binaries; debug info is stripped from the image's copies), KORD_K8S_RUN (cluster run
# dir: its containerd socket is used for the import), KORD_IMAGE_NO_IMPORT=1 to only write tars.
# Prints one "ref tarball" line per image on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run="${KORD_K8S_RUN:-$HOME/.cache/kord/k8s-run}"
sock="$run/containerd/containerd.sock"
out="${KORD_IMAGE_DIR:-$HOME/.cache/kord/images}"
profile="${KORD_IMAGE_PROFILE:-release}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/kord/target}/$profile"
mkdir -p "$out"

log() { printf '[image %s] %s\n' "$(date +%T)" "$*" >&2; }

tag="${KORD_IMAGE_TAG:-}"
if [[ -z "$tag" ]]; then
  tag="$(git -C "$root" rev-parse --short=12 HEAD)"
  git -C "$root" diff --quiet HEAD -- 2>/dev/null || tag="$tag-dirty"
fi

import() {
  local tar="$1"
  if [[ "${KORD_IMAGE_NO_IMPORT:-0}" == 1 ]]; then return 0; fi
  if [[ ! -S "$sock" ]]; then
    log "no containerd at $sock: wrote $tar only"
    return 0
  fi
  ctr -a "$sock" -n k8s.io images import "$tar" >&2
}

build() { # build REF BIN...: the first binary is the entrypoint
  local ref="$1" file stage b bins=()
  shift
  file="$out/$(echo "$ref" | tr '/:' '__').tar"
  # Stripped copies: debug builds carry hundreds of MB of debug info.
  stage="$out/stage/$(echo "$ref" | tr '/:' '__')"
  rm -rf "$stage" && mkdir -p "$stage"
  for b in "$@"; do
    strip --strip-debug -o "$stage/$(basename "$b")" "$b" 2>/dev/null || cp "$b" "$stage/$(basename "$b")"
    chmod 0755 "$stage/$(basename "$b")"
    bins+=("$stage/$(basename "$b")")
  done
  python3 "$here/image.py" --ref "$ref" --out "$file" "${bins[@]}" >&2
  rm -rf "$stage"
  import "$file"
  echo "$ref $file"
}

case "${1:-}" in
  pause)
    bin="$out/pause-bin/pause"
    mkdir -p "$(dirname "$bin")"
    if [[ ! -x "$bin" || "$here/pause.c" -nt "$bin" ]]; then
      cc -static -O2 -o "$bin" "$here/pause.c"
    fi
    build kord.local/pause:1 "$bin"
    ;;
  all)
    # Tarballs of earlier tags are only a cache: drop them, or every commit adds ~150 MB.
    for old in "$out"/kord.local_kord_*.tar "$out"/kord.local_kord-k8s-sample_*.tar \
      "$out"/kord.local_kord-operator_*.tar; do
      if [[ -f "$old" && "$old" != *"_$tag.tar" ]]; then rm -f "$old"; fi
    done
    [[ -x "$target/kord" && -x "$target/kordctl" ]] || {
      log "no $profile binaries in $target: run cargo build --workspace --bins (--release for release)"
      exit 1
    }
    build "kord.local/kord:$tag" "$target/kord" "$target/kordctl"
    if [[ -x "$target/kord-k8s-sample" ]]; then
      build "kord.local/kord-k8s-sample:$tag" "$target/kord-k8s-sample" "$target/kordctl"
    fi
    if [[ -x "$target/kord-operator" ]]; then
      build "kord.local/kord-operator:$tag" "$target/kord-operator"
    else
      log "no kord-operator binary: operator image skipped"
    fi
    ;;
  "" | -h | --help)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
  *)
    ref="$1"
    shift
    [[ "$ref" == *:* ]] || ref="$ref:$tag"
    build "$ref" "$@"
    ;;
esac
