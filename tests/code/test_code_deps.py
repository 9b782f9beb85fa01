"""Code dependencies are read from the imports: complete, transitive, and no more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.code_deps import code_dependencies
from pipelines.registry import STAGES
from tests.conftest import REPO


def write(root: Path, relative: str, text: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A small ``pipelines`` package with every kind of import the scanner must follow."""
    write(tmp_path, "pipelines/__init__.py")
    write(tmp_path, "pipelines/stages/__init__.py")
    write(tmp_path, "pipelines/shared.py", "from .leaf import X\n")
    write(tmp_path, "pipelines/leaf.py", "X = 1\n")
    write(tmp_path, "pipelines/lazy.py", "Y = 2\n")
    write(tmp_path, "pipelines/typing_only.py", "Z = 3\n")
    write(tmp_path, "pipelines/unused.py", "W = 4\n")
    write(tmp_path, "pipelines/started.py", "V = 5\n")
    write(tmp_path, "pipelines/sub/__init__.py")
    write(tmp_path, "pipelines/sub/mod.py", "import json\n")
    write(tmp_path, "pipelines/app/pyproject.toml", "[project]\n")
    write(tmp_path, "pipelines/app/pkg/apps.py", "from pipelines.leaf import X\n")
    write(
        tmp_path,
        "pipelines/stages/one.py",
        "from __future__ import annotations\n"
        "from pathlib import Path\n"
        "from typing import TYPE_CHECKING\n"
        "from pipelines.shared import X\n"
        "from pipelines.sub import mod\n"
        "if TYPE_CHECKING:\n"
        "    from pipelines.typing_only import Z\n"
        "APP = Path(__file__).resolve().parent.parent / 'app'\n"
        "HOST = ['python', '-m', 'pipelines.started']\n"
        "NOT_A_MODULE = 'pipelines.missing is not run'\n"
        "def run():\n"
        "    from pipelines import lazy\n"
        "    return lazy.Y\n",
    )
    return tmp_path


def test_closure_follows_relative_lazy_package_and_shipped_files(package: Path):
    deps = set(code_dependencies("pipelines/stages/one.py", root=package))
    assert deps == {
        "pipelines/__init__.py",
        "pipelines/stages/__init__.py",
        "pipelines/stages/one.py",
        "pipelines/shared.py",
        "pipelines/leaf.py",  # through shared's relative import
        "pipelines/lazy.py",  # imported inside a function
        "pipelines/sub/__init__.py",
        "pipelines/sub/mod.py",  # `from package import module`
        "pipelines/app/pyproject.toml",  # Path(__file__).parent.parent / "app"
        "pipelines/app/pkg/apps.py",
        "pipelines/started.py",  # python -m pipelines.started
    }  # not typing_only.py (TYPE_CHECKING) nor unused.py


def test_registry_deps_are_the_computed_closure():
    for stage in STAGES:
        code = [d for d in stage.all_deps if d.startswith("pipelines/")]
        assert code == list(code_dependencies(stage.source_file)), stage.name
        assert stage.source_file in code
        assert "pipelines/registry.py" not in code, stage.name


def test_closure_covers_every_pipelines_module_a_stage_import_loads():
    """Importing the stage module for real loads only files the static closure lists."""
    script = (
        "import importlib, json, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "mods = [m for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "print(json.dumps(sorted(m.__file__ for m in mods if m.__name__.startswith('pipelines'))))"
    )
    for stage in STAGES:
        module = stage.entry_point.split(":")[0]
        done = subprocess.run(
            [sys.executable, "-c", script, module], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = {Path(f).resolve().relative_to(REPO).as_posix() for f in json.loads(done.stdout)}
        missing = loaded - set(stage.code_deps)
        assert not missing, (stage.name, missing)


def test_a_module_only_one_stage_imports_is_a_dependency_of_that_stage_only():
    users = {s.name for s in STAGES if "pipelines/quantum/pyfunc_model.py" in s.code_deps}
    assert users == {"register"}
    users = {s.name for s in STAGES if "pipelines/data/sources.py" in s.code_deps}
    assert users == {"ingest"}
    assert all("pipelines/io.py" in s.code_deps for s in STAGES)
