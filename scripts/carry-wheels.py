#!/usr/bin/env python3
"""Carry Python wheels to a machine that has no package registry, in calls of a limited size.

    scripts/carry-wheels.py -r benchmarks/gpu-wheels.txt --python 3.12 --out .whl \\
        --also .gpu --link nvidia=/opt/torch/.venv/lib/python3.12/site-packages/nvidia \\
        --then "python3 benchmarks/gpu.py --tokenizer .gpu/tokenizer --out \\$OUT"

Here, it downloads the wheels of the requirements (pinned, ``name==version``; each one's own
needs are not followed: name them too) for that Python and platform, splits a wheel larger than
a call carries into parts, and packs everything into calls (``OUT/call-1``, ``OUT/call-2``, ...)
that each stay under ``--limit`` together with the working tree (the files git tracks or does not
ignore, which travel with every call) and, in the last call, the ``--also`` paths. Then it says
what each call carries and what it runs there: every call but the last copies its files to
``/tmp/w``; the last one joins the parts, installs every wheel at once into ``--site`` (a
``--target`` install, console scripts in ``SITE/bin``), makes the ``--link`` links, exports
``PYTHONPATH`` and ``PATH`` and runs ``--then``. The calls must follow each other while the
machine is still warm (``/tmp/w`` lives as long as it does). docs/carrying-wheels.md says more.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
# pip matches a wheel's platform tag exactly: every manylinux x86-64 tag a wheel is published under
PLATFORMS = [
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
STAGING = "/tmp/w"  # where the calls' files gather on the machine
SPARE = 2 * MIB  # each call's room for what the tree gains before it is sent


@dataclass
class Piece:
    """A file one call carries: a whole wheel, or a part of one (``NAME.part-00``, ...)."""

    path: Path
    size: int
    wheel: str  # the wheel it is, or is a part of


@dataclass
class Call:
    """What one call carries."""

    pieces: list[Piece] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def size_of(text: str) -> int:
    """Bytes of '64MiB', '40 MB', '1.5GiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(i?)B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or e.g. 64MiB, 40MB)")
    number, unit, binary = float(m[1]), m[2].upper(), m[3]
    return int(number * (1024 if binary or not unit else 1000) ** " KMG".index(unit or " "))


def read_requirements(path: Path) -> list[str]:
    """One ``-r`` file's requirements (a ``#`` starts a comment); a line ``-r OTHER`` takes
    OTHER's too, relative to this file, as pip's requirement files do."""
    found = []
    for line in path.read_text().splitlines():
        if not (line := line.split("#", 1)[0].strip()):
            continue
        if line.startswith("-r"):
            found += read_requirements(path.parent / line[2:].strip())
        else:
            found.append(line)
    return found


def requirements(args: argparse.Namespace) -> list[str]:
    """The requirements given, and those of the ``-r`` files."""
    found = list(args.requirement)
    for path in args.r:
        found += read_requirements(Path(path))
    if not found:
        raise SystemExit("carry-wheels: no requirements: name them (mlx==0.32.4) or give a file with -r")
    if loose := [r for r in found if "==" not in r]:
        raise SystemExit(f"carry-wheels: pin every requirement to one version (name==version): {', '.join(loose)}")
    return found


def download(reqs: list[str], folder: Path, python: str, platforms: list[str]) -> list[Path]:
    """The wheels of ``reqs`` for that Python and platform, downloaded into ``folder`` (pip keeps
    what is there already)."""
    folder.mkdir(parents=True, exist_ok=True)
    tags = [x for p in platforms for x in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    pip += ["--python-version", python, "--implementation", "cp", *tags, "-d", str(folder), *reqs]
    if subprocess.run(pip).returncode:
        raise SystemExit(
            "carry-wheels: pip download failed (above): a requirement with no wheel for "
            f"cp{python.replace('.', '')} on {', '.join(platforms)}? Add the --platform it is published for"
        )
    wanted = {_project(r.split("==")[0]) for r in reqs}
    wheels = sorted(w for w in folder.glob("*.whl") if _project(w.name.split("-")[0]) in wanted)
    versions: dict[str, list[str]] = {}
    for w in wheels:
        versions.setdefault(_project(w.name.split("-")[0]), []).append(w.name)
    if twice := [names for names in versions.values() if len(names) > 1]:
        raise SystemExit(f"carry-wheels: two versions of one project in {folder} (remove the old): {twice}")
    return wheels


def _project(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def tree_size(root: Path) -> int:
    """Bytes of the working tree that travels with every call (tracked and not ignored files)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    paths = [root / p for p in out.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def path_size(path: Path) -> int:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())


def pieces_of(wheels: list[Path], room: int, parts: Path) -> list[Piece]:
    """Each wheel whole, or split into parts of at most ``room`` bytes (written into ``parts``)."""
    shutil.rmtree(parts, ignore_errors=True)  # the parts of an earlier run, of another size
    pieces = []
    for w in wheels:
        size = w.stat().st_size
        if size <= room:
            pieces.append(Piece(w, size, w.name))
            continue
        parts.mkdir(parents=True, exist_ok=True)
        with open(w, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(room), b"")):
                part = parts / f"{w.name}.part-{i:02d}"
                part.write_bytes(chunk)
                pieces.append(Piece(part, len(chunk), w.name))
    return pieces


def pack(pieces: list[Piece], room: int, last_room: int) -> list[Call]:
    """The pieces in calls of at most ``room`` bytes, the biggest first; the last call also keeps
    ``room - last_room`` bytes free (for the paths it carries besides)."""
    calls: list[Call] = []
    for piece in sorted(pieces, key=lambda p: -p.size):
        call = next((c for c in calls if c.size + piece.size <= room), None)
        if call is None:
            calls.append(call := Call())
        call.pieces.append(piece)
    if not calls or calls[-1].size > last_room:
        calls.append(Call())  # a call with nothing but the other paths: it installs and runs
    return calls


def place(calls: list[Call], out: Path) -> list[Path]:
    """Each call's pieces in a folder of its own (``out/call-K``); the folders."""
    for old in out.glob("call-*"):
        shutil.rmtree(old)
    folders = []
    for k, call in enumerate(calls, 1):
        folder = out / f"call-{k}"
        folder.mkdir(parents=True)
        for p in call.pieces:
            target = folder / p.path.name
            try:
                os.link(p.path, target)
            except OSError:
                shutil.copy2(p.path, target)
        folders.append(folder)
    return folders


def install_script(folder: Path, calls: list[Call], site: str, links: list[str], python: str) -> str:
    """What the last call sources: gather, join, install, link, export."""
    split = sorted({p.wheel for c in calls for p in c.pieces if p.path.name != p.wheel})
    steps = [f"mkdir -p {STAGING}", f"cp {shlex.quote(str(folder))}/* {STAGING}/"]  # install.sh too, at least
    for wheel in split:
        steps.append(f"cat {STAGING}/{wheel}.part-* > {STAGING}/{wheel} && rm {STAGING}/{wheel}.part-*")
    steps.append(
        f"{python} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target {site} {STAGING}/*.whl"
    )
    for link in links:
        name, target = link.split("=", 1)
        steps.append(f"ln -sfn {shlex.quote(target)} {site}/{name}")
    steps.append(f'export PYTHONPATH={site}:"$PWD" PATH={site}/bin:"$PATH" PYTHONUNBUFFERED=1')
    head = (
        f"# made by scripts/carry-wheels.py; the last call runs `. {folder}/install.sh && COMMAND`\n"
        "# (sourced: the exports stay for the command)\n"
    )
    return head + " &&\n".join(steps) + "\n"


def plan(calls: list[Call], folders: list[Path], tree: int, also: list[str], then: str) -> str:
    """What each call carries and runs, in words."""
    lines = []
    for k, (call, folder) in enumerate(zip(calls, folders), 1):
        last = k == len(calls)
        carry = [str(folder), *(also if last else [])]
        total = call.size + tree + (sum(path_size(Path(a)) for a in also) if last else 0)
        when = "" if k == 1 else ", while the machine is still warm"
        lines.append(f"call {k} of {len(calls)}{when}: carry {carry} ({total / MIB:.1f} MiB with the tree); run")
        if last:
            lines.append(f"    . {folder}/install.sh" + (f" && {then}" if then else ""))
        else:
            lines.append(f"    mkdir -p {STAGING} && cp {folder}/* {STAGING}/")
        for p in sorted(call.pieces, key=lambda p: p.path.name):
            lines.append(f"      {p.path.name}  {p.size / MIB:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("requirement", nargs="*", help="name==version, each wheel to carry")
    p.add_argument("-r", action="append", default=[], metavar="FILE", help="a file of requirements, one a line")
    p.add_argument("--python", default="3.12", help="the machine's Python (default 3.12)")
    p.add_argument("--platform", action="append", default=None, help="a wheel platform tag (default: manylinux x86-64)")
    p.add_argument("--out", type=Path, default=Path(".whl"), help="where the wheels and calls go (default .whl)")
    p.add_argument(
        "--limit", type=size_of, default=64 * MIB, help="what one call carries at most, the tree included (64MiB)"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="PATH",
        help="another path the last call carries (its size counts)",
    )
    p.add_argument("--link", action="append", default=[], metavar="NAME=TARGET", help="ln -s TARGET SITE/NAME there")
    p.add_argument("--site", default="/tmp/site", help="where the machine installs them (default /tmp/site)")
    p.add_argument("--then", default="", help="the command the last call runs once they are installed")
    args = p.parse_args(argv)
    if bad := [link for link in args.link if "=" not in link]:
        p.error(f"--link takes NAME=TARGET, got {bad[0]!r}")

    reqs = requirements(args)
    tree = tree_size(Path.cwd())
    also = sum(path_size(Path(a)) for a in args.also)
    room = args.limit - tree - SPARE
    if room < also + MIB:
        p.error(
            f"--limit {args.limit / MIB:.0f} MiB leaves no room for wheels: the tree takes {tree / MIB:.1f} MiB, "
            f"--also {also / MIB:.1f} MiB and {SPARE / MIB:.0f} MiB are spared; give a larger --limit"
        )
    wheels = download(reqs, args.out / "download", args.python, args.platform or PLATFORMS)
    calls = pack(pieces_of(wheels, room, args.out / "parts"), room, room - also)
    folders = place(calls, args.out)
    (folders[-1] / "install.sh").write_text(install_script(folders[-1], calls, args.site, args.link, "python3"))
    text = plan(calls, folders, tree, args.also, args.then)
    (args.out / "PLAN.txt").write_text(text + "\n")
    print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / MIB:.1f} MiB, in {len(calls)} calls:")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
