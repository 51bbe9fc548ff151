"""Drop bundled executables the GPU machines cannot run from the carried wheels (build_wheelhouse.sh calls this).

PuLP (the solver behind Snakemake's scheduler) bundles a CBC executable for every OS and CPU: 16 MiB, of which the
device's x86-64 Linux needs one. Without the others, wheels and repository fit in the 64 MiB a device call carries.
A slimmed wheel keeps its name, and its RECORD lists exactly the files it still holds, so pip installs it as built.
Running it again changes nothing.

Usage: python scripts/slim_wheels.py [WHEELHOUSE]   (default .whl)
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

# wheel file-name prefix -> the paths inside it that no x86-64 Linux machine runs
FOREIGN = {"pulp-": re.compile(r"^pulp/solverdir/cbc/(win|osx|linux/(arm64|i32))/")}


def slim_wheel(path: Path, foreign: re.Pattern) -> tuple[int, int] | None:
    """Rewrite ``path`` without the members ``foreign`` matches (and their RECORD lines); (bytes before, after), or
    None when it holds none."""
    with zipfile.ZipFile(path) as zf:
        members = zf.infolist()
        kept = [(info, zf.read(info)) for info in members if not foreign.match(info.filename)]
    if len(kept) == len(members):
        return None
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in kept:
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not foreign.match(line)).encode()
            out.writestr(info, data)
    before = path.stat().st_size
    tmp.replace(path)
    return before, path.stat().st_size


def main(argv: list[str]) -> int:
    wheelhouse = Path(argv[0] if argv else ".whl")
    for prefix, foreign in FOREIGN.items():
        for path in sorted(wheelhouse.glob(prefix + "*.whl")):
            sizes = slim_wheel(path, foreign)
            if sizes:
                print(f"{path.name}: foreign executables dropped, {sizes[0] / 2**20:.1f} -> {sizes[1] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
