#!/usr/bin/env python3
"""Turns a directory into a one-layer container image archive in `docker save`
format (manifest.json, config, layer.tar), which `ctr -n k8s.io images import`
accepts, so that a node can run locally built images without a registry or a
container engine.

The output depends only on the directory's contents and the options: entries
are sorted, their times are zero and they belong to root unless --owner says
otherwise (the directory may have been assembled by an unprivileged user).

usage: mkimage.py ROOTFS_DIR NAME:TAG OUT.tar [--entrypoint JSON] [--cmd JSON]
                  [--env K=V ...] [--workdir DIR] [--user U[:G]] [--port N ...]
                  [--owner PATH=UID:GID ...] [--stop-signal SIG]
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile

# What the distroless and Debian base images set, unless --env sets PATH.
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rootfs", help="directory that becomes the image's root")
    p.add_argument("ref", help="image name, e.g. localhost/app:dev (a domain keeps "
                               "containerd from turning it into docker.io/library/...)")
    p.add_argument("out", help="archive to write")
    p.add_argument("--entrypoint", type=json.loads, help="JSON list")
    p.add_argument("--cmd", type=json.loads, help="JSON list")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", default="/")
    p.add_argument("--user", default="")
    p.add_argument("--port", action="append", default=[], type=int)
    p.add_argument("--owner", action="append", default=[], metavar="PATH=UID:GID",
                   help="owner of one path in the image (not recursive)")
    p.add_argument("--stop-signal")
    a = p.parse_args()
    if not os.path.isdir(a.rootfs):
        p.error(f"{a.rootfs} is not a directory")
    for name in ("entrypoint", "cmd"):
        value = getattr(a, name)
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            p.error(f"--{name} must be a JSON list of strings")
    a.owners = {}
    for spec in a.owner:
        path, _, ids = spec.partition("=")
        uid, _, gid = ids.partition(":")
        if not (path and uid.isdigit() and gid.isdigit()):
            p.error(f"--owner {spec!r}: expected PATH=UID:GID")
        a.owners[os.path.normpath(path.lstrip("/"))] = (int(uid), int(gid))
    return a


def write_layer(rootfs, owners, out):
    """Writes the layer tar to the open file `out`; returns its sha256."""
    unused = set(owners)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for root, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in sorted(dirs + files):
                full = os.path.join(root, name)
                arc = os.path.relpath(full, rootfs)
                info = t.gettarinfo(full, arc)
                if info is None:  # sockets and the like have no place in an image
                    continue
                info.mtime = 0
                info.uid, info.gid = owners.get(arc, (0, 0))
                info.uname = info.gname = "root" if info.uid == 0 else ""
                unused.discard(arc)
                if info.isreg():
                    with open(full, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)
    if unused:
        sys.exit(f"mkimage.py: --owner names paths that are not in {rootfs}: "
                 + ", ".join(sorted(unused)))


def sha256_file(f):
    f.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def image_config(a, diff_id):
    env = a.env if any(e.startswith("PATH=") for e in a.env) else [DEFAULT_PATH] + a.env
    config = {"Env": env, "WorkingDir": a.workdir, "User": a.user}
    if a.entrypoint is not None:
        config["Entrypoint"] = a.entrypoint
    if a.cmd is not None:
        config["Cmd"] = a.cmd
    if a.port:
        config["ExposedPorts"] = {f"{port}/tcp": {} for port in a.port}
    if a.stop_signal:
        config["StopSignal"] = a.stop_signal
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": EPOCH, "created_by": "hack/images/mkimage.py"}],
    }


def add_bytes(t, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    t.addfile(info, io.BytesIO(data))


def main():
    a = parse_args()
    out_dir = os.path.dirname(os.path.abspath(a.out))
    # The layer can be hundreds of MB: it goes to a file, not to memory, and
    # the archive is renamed into place so a failed run leaves no half file.
    with tempfile.TemporaryFile(dir=out_dir) as layer:
        write_layer(a.rootfs, a.owners, layer)
        diff_id = "sha256:" + sha256_file(layer)
        config = json.dumps(image_config(a, diff_id), sort_keys=True).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": [a.ref], "Layers": ["layer.tar"]}]
        partial = a.out + ".partial"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as t:
            info = tarfile.TarInfo("layer.tar")
            info.size = layer.seek(0, os.SEEK_END)
            info.mode = 0o644
            layer.seek(0)
            t.addfile(info, layer)
            add_bytes(t, config_name, config)
            add_bytes(t, "manifest.json", json.dumps(manifest).encode())
        os.replace(partial, a.out)


if __name__ == "__main__":
    main()
