"""Make ``compose_serve`` importable from a folder of symlinks, without building or installing it.

    python benchmarks/gpu/package_view.py /tmp/site      # then: PYTHONPATH=/tmp/site python -P ...

The device machine has no network and its Python is not ours, so ``run.sh`` does not install the
package: ``pyproject.toml`` maps top-level folders into it (``package-dir``: ``kernels/`` is
``compose_serve.kernels``, ``deployments/`` is ``compose_serve.deployments``), and this builds
``TARGET/compose_serve/`` to match: a real folder holding a link to every entry of
``compose_serve/`` plus one link per mapped subpackage. Imports then resolve to the working tree's
own files, so tracebacks and Triton's source lookups show them. (Needs Python >= 3.11: tomllib.)

The repository root must not come before ``TARGET`` on ``sys.path``: its ``compose_serve/`` lacks
the mapped subpackages and would shadow the view. Scripts under ``benchmarks/`` are fine (their
own folder comes first); run pytest as ``python -P -m pytest --import-mode=append``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SKIP = {"__pycache__"}


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``tool.setuptools.package-dir`` of ``pyproject.toml``: package name -> folder in the repo."""
    with (root / "pyproject.toml").open("rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {package: root / folder for package, folder in mapping.items()}


def build_view(target: Path, root: Path = ROOT) -> dict[str, Path]:
    """Build (or rebuild) the view of every top-level package under ``target``; returns
    package -> the path that now provides it."""
    mapping = package_dirs(root)
    made: dict[str, Path] = {}
    for package in sorted(mapping, key=lambda name: name.count(".")):  # parents first
        source, view = mapping[package], target / package.replace(".", "/")
        if "." not in package:  # a top-level package: a real folder of links
            if view.is_symlink() or view.is_file():
                view.unlink()
            elif view.exists():
                shutil.rmtree(view)
            view.mkdir(parents=True)
            mapped = {name.rsplit(".", 1)[1] for name in mapping if name.startswith(package + ".")}
            for entry in sorted(source.iterdir()):
                if entry.name not in SKIP and entry.name not in mapped:
                    (view / entry.name).symlink_to(entry)
        elif not (view.parent / "__init__.py").exists():
            raise SystemExit(f"{package}: its parent package has no view (no __init__.py)")
        else:
            if view.is_symlink() or view.exists():
                view.unlink()
            view.symlink_to(source, target_is_directory=True)
        made[package] = view
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder to put on PYTHONPATH (created if missing)")
    args = parser.parse_args(argv)
    args.target.mkdir(parents=True, exist_ok=True)
    for package, view in build_view(args.target.resolve()).items():
        print(f"{package} -> {view}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
