#!/usr/bin/env python3
"""Writes a container image offline as a docker-archive tarball.

The image has one layer: the given binaries under /usr/local/bin, every shared library `ldd`
lists for them (at the path ldd names, symlinks resolved), the dynamic loader, /tmp and a
writable /data. No registry, no daemon: `ctr images import` and `docker load` both read it.

Usage: image.py --ref kord.local/kord:TAG --out kord.tar [--entrypoint NAME] BIN [BIN...]
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary):
    """Absolute paths ldd prints for a binary (empty for a static one)."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if "not a dynamic executable" in text or "statically linked" in text:
            return []
        sys.exit(f"image.py: ldd {binary} failed: {text.strip()}")
    paths = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            sys.exit(f"image.py: {binary}: missing library: {line.strip()}")
        match = LDD_LINE.match(line)
        if match:
            paths.append(match.group(1))
    return paths


def add_dir(tar, path, mode=0o755):
    info = tarfile.TarInfo(path.lstrip("/"))
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 0
    tar.addfile(info)


def add_file(tar, src, dest, mode=None):
    """Adds src's content (symlinks followed) at dest, with deterministic metadata."""
    real = os.path.realpath(src)
    st = os.stat(real)
    info = tarfile.TarInfo(dest.lstrip("/"))
    info.size = st.st_size
    info.mode = mode if mode is not None else (st.st_mode & 0o7777)
    info.mtime = 0
    with open(real, "rb") as handle:
        tar.addfile(info, handle)


def layer_bytes(binaries):
    """The layer tarball: directories first, then binaries and libraries, each path once."""
    files = {}
    for binary in binaries:
        files[f"/usr/local/bin/{os.path.basename(binary)}"] = (binary, 0o755)
        for lib in shared_libraries(binary):
            files.setdefault(lib, (lib, 0o755))
    dirs = {"/tmp": 0o1777, "/data": 0o777, "/etc": 0o755}
    for dest in files:
        parent = os.path.dirname(dest)
        while parent not in ("/", ""):
            dirs.setdefault(parent, 0o755)
            parent = os.path.dirname(parent)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(dirs):
            add_dir(tar, path, dirs[path])
        for dest in sorted(files):
            src, mode = files[dest]
            add_file(tar, src, dest, mode)
        # Name lookups of programs that ask for a user or hosts file find an empty one.
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/false\n"),
                           ("etc/group", "root:x:0:\n"),
                           ("etc/nsswitch.conf", "hosts: files dns\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="image reference, e.g. kord.local/kord:abc123")
    parser.add_argument("--out", required=True, help="output tarball")
    parser.add_argument("--entrypoint", help="binary name to run (default: the first)")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    for binary in args.binaries:
        if not os.access(binary, os.X_OK):
            sys.exit(f"image.py: not an executable file: {binary}")
    entry = args.entrypoint or os.path.basename(args.binaries[0])
    if entry not in {os.path.basename(b) for b in args.binaries}:
        sys.exit(f"image.py: --entrypoint {entry} is not one of the binaries")

    layer = layer_bytes(args.binaries)
    layer_digest = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
        "config": {
            "Entrypoint": [f"/usr/local/bin/{entry}"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/data",
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": "scripts/k8s/image.py " + " ".join(
            os.path.basename(b) for b in args.binaries)}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{
        "Config": config_name,
        "RepoTags": [args.ref],
        "Layers": [f"{layer_digest}/layer.tar"],
    }]
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w") as out:
        for name, data in ((f"{layer_digest}/layer.tar", layer),
                           (config_name, config_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            out.addfile(info, io.BytesIO(data))
    os.replace(tmp, args.out)
    print(f"{args.ref} -> {args.out} ({len(layer) // 1024} KiB layer)")


if __name__ == "__main__":
    main()
