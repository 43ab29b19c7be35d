#!/usr/bin/env python3
"""Fetch public release pairs for Convoy's delta benchmark, and unpack them.

Each pair is two releases of one package from a public registry (npm, PyPI,
crates.io): the kind of upgrade a fleet rolls out. Archives are checked
against the digest the registry publishes, cached, and unpacked into

    CACHE/trees/NAME/OLD/  and  CACHE/trees/NAME/NEW/

where CACHE is $CONVOY_PAIRS_CACHE, else $XDG_CACHE_HOME/convoy/pairs, else
~/.cache/convoy/pairs. Nothing is written inside the repository. A second
run downloads nothing. Prints one line per pair: NAME OLD_DIR NEW_DIR.

    scripts/fetch-pairs.py            # all pairs
    scripts/fetch-pairs.py --list     # names, registries and versions only
"""

import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

# (name, registry, package, old version, new version, why it is here)
PAIRS = [
    ("typescript", "npm", "typescript", "5.6.2", "5.6.3",
     "a patch release of big generated JavaScript files"),
    ("react-dom", "npm", "react-dom", "18.2.0", "18.3.1",
     "a minor release of minified bundles"),
    ("esbuild-linux-x64", "npm", "@esbuild/linux-x64", "0.24.0", "0.24.2",
     "a statically linked Go executable"),
    ("numpy", "pypi", "numpy", "2.1.2", "2.1.3",
     "a wheel with compiled extensions (cp311, manylinux x86_64)"),
    ("django", "pypi", "Django", "5.1.2", "5.1.3",
     "a wheel of many small Python files"),
    ("tokio", "crates", "tokio", "1.41.0", "1.41.1",
     "a Rust crate's source"),
]

WHEEL_TAG = ("cp311-cp311-manylinux_2_17_x86_64", "py3-none-any")


def cache_dir() -> Path:
    if os.environ.get("CONVOY_PAIRS_CACHE"):
        return Path(os.environ["CONVOY_PAIRS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convoy" / "pairs"


def get(url: str, accept: str = "*/*") -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "convoy-fetch-pairs/1", "Accept": accept})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def locate(registry: str, package: str, version: str):
    """The archive's URL, digest algorithm and expected digest."""
    if registry == "npm":
        meta = json.loads(get(f"https://registry.npmjs.org/{package.replace('/', '%2F')}/{version}"))
        return meta["dist"]["tarball"], "sha1", meta["dist"]["shasum"]
    if registry == "pypi":
        index = json.loads(get(f"https://pypi.org/simple/{package.lower()}/",
                               accept="application/vnd.pypi.simple.v1+json"))
        for tag in WHEEL_TAG:
            for f in index["files"]:
                if f["filename"].startswith(f"{package}-{version}-") and tag in f["filename"] \
                        and f["filename"].endswith(".whl"):
                    return f["url"], "sha256", f["hashes"]["sha256"]
        raise SystemExit(f"{package} {version}: no wheel tagged {' or '.join(WHEEL_TAG)} on PyPI")
    if registry == "crates":
        name = package.lower()
        prefix = {1: "1", 2: "2", 3: f"3/{name[0]}"}.get(len(name), f"{name[:2]}/{name[2:4]}")
        for line in get(f"https://index.crates.io/{prefix}/{name}").decode().splitlines():
            entry = json.loads(line)
            if entry["vers"] == version:
                return (f"https://static.crates.io/crates/{name}/{name}-{version}.crate",
                        "sha256", entry["cksum"])
        raise SystemExit(f"{package} {version}: not in the crates.io index")
    raise SystemExit(f"unknown registry {registry}")


def fetch(cache: Path, registry: str, package: str, version: str) -> Path:
    archives = cache / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    path = archives / f"{registry}-{package.replace('/', '_')}-{version}"
    if path.exists():
        return path
    url, algo, digest = locate(registry, package, version)
    body = get(url)
    got = hashlib.new(algo, body).hexdigest()
    if got != digest:
        raise SystemExit(f"{url}: {algo} {got}, but the registry publishes {digest}")
    tmp = path.with_suffix(".part")
    tmp.write_bytes(body)
    tmp.rename(path)
    return path


def safe_members(names, dest: Path):
    for name in names:
        target = (dest / name).resolve()
        if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
            raise SystemExit(f"archive member {name!r} leaves {dest}")


def unpack(archive: Path, dest: Path):
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".part")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    data = archive.read_bytes()
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            safe_members(z.namelist(), tmp)
            z.extractall(tmp)
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
            members = [m for m in t.getmembers() if m.isfile() or m.isdir()]
            safe_members([m.name for m in members], tmp)
            t.extractall(tmp, members=members, filter="data")
    # npm tarballs hold `package/`, crates `NAME-VERSION/`: the release is
    # what is inside, so that paths match between versions.
    inner = list(tmp.iterdir())
    if len(inner) == 1 and inner[0].is_dir():
        inner[0].rename(dest)
        tmp.rmdir()
        return
    tmp.rename(dest)


def main():
    if "--list" in sys.argv[1:]:
        for name, registry, package, old, new, why in PAIRS:
            print(f"{name}\t{registry}\t{package}\t{old} -> {new}\t{why}")
        return
    cache = cache_dir()
    for name, registry, package, old, new, _ in PAIRS:
        dirs = []
        for version in (old, new):
            dest = cache / "trees" / name / version
            unpack(fetch(cache, registry, package, version), dest)
            dirs.append(str(dest))
        print(name, *dirs)


if __name__ == "__main__":
    main()
