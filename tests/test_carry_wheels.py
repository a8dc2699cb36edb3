"""scripts/carry-wheels.py's requirement lists: what `benchmarks/gpu.py prepare [--cpu]` carries."""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def carry_wheels():
    spec = importlib.util.spec_from_file_location("carry_wheels", ROOT / "scripts" / "carry-wheels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_each_list_takes_in_the_shared_one_and_has_one_mlx_backend():
    cw = carry_wheels()
    shared = cw.read_requirements(ROOT / "benchmarks" / "lent-wheels.txt")
    assert "ipyparallel==9.2.0" in shared and "openai==3.63.0" in shared
    for name, backend in (("gpu-wheels.txt", "mlx-cuda-13"), ("cpu-wheels.txt", "mlx-cpu")):
        found = cw.requirements(argparse.Namespace(requirement=[], r=[str(ROOT / "benchmarks" / name)]))
        names = [r.split("==")[0].lower() for r in found]
        assert len(names) == len(set(names)), f"{name}: a package listed twice stops pip's install"
        assert set(shared) <= set(found)
        backends = [n for n in names if n.startswith("mlx-c")]
        assert backends == [backend], name


def test_an_include_line_is_read_relative_to_its_file(tmp_path):
    cw = carry_wheels()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("b==2  # a comment\n\n")
    (tmp_path / "top.txt").write_text("# the list\na==1\n-r sub/more.txt\n")
    assert cw.read_requirements(tmp_path / "top.txt") == ["a==1", "b==2"]
