"""The distribution: ``aiohttp-resilient`` builds (sdist, and a wheel from the sdist),
installs into a fresh virtual environment and imports as ``resilient``.

Offline: ``python -m build --no-isolation`` uses the hatchling of this environment (the
``test`` extra declares it), the wheel is installed with ``--no-index --no-deps``, and the
fresh environment reads its dependencies (aiohttp, limits, ...) from this one's
site-packages through a ``.pth`` line, which adds that folder to ``sys.path`` without
running its ``.pth`` files (so this checkout's editable install stays out of it).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import resilient

ROOT = Path(__file__).resolve().parent.parent
DIST = "aiohttp-resilient"

pytestmark = pytest.mark.timeout(180)


def run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) of this checkout; the wheel is built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_the_distribution_is_named_aiohttp_resilient_with_the_package_version(built):
    sdist, wheel = built
    version = resilient.__version__
    assert sdist.name == f"aiohttp_resilient-{version}.tar.gz"
    assert wheel.name == f"aiohttp_resilient-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"aiohttp_resilient-{version}.dist-info/METADATA").decode()
    assert f"Name: {DIST}\n" in metadata
    assert f"Version: {version}\n" in metadata


def test_the_wheel_holds_the_package_its_type_marker_and_lua_scripts_only(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"resilient", f"aiohttp_resilient-{resilient.__version__}.dist-info"}
    assert "resilient/py.typed" in names
    assert "resilient/ratelimit/pause.lua" in names
    assert "resilient/testing/pytest_plugin.py" in names


def test_the_sdist_holds_sources_tests_and_docs_but_no_local_state(built):
    sdist, _ = built
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    assert "pyproject.toml" in names
    assert "README.md" in names
    assert "mkdocs.yml" in names
    assert "resilient/breaker/breaker.lua" in names
    assert any(n.startswith("tests/") for n in names)
    assert any(n.startswith("docs/") for n in names)
    for local in (".venv/", ".hypothesis/", "benchmarks/results/latest/", "site/", ".git/"):
        assert not any(n.startswith(local) for n in names), local


def test_the_wheel_installs_into_a_fresh_venv_and_imports_as_resilient(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        wheel,
        cwd=tmp_path,
    )
    fresh_site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
        ).strip()
    )
    (fresh_site / "_deps_from_the_test_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = textwrap.dedent(
        """
        import importlib.metadata, pathlib, sys
        import resilient, resilient.sage, resilient.storage, resilient.testing
        print(pathlib.Path(resilient.__file__).resolve())
        print(resilient.__version__, importlib.metadata.version("aiohttp-resilient"))
        print(all(hasattr(resilient, name) for name in resilient.__all__))
        """
    )
    where, versions, exported = run(python, "-c", probe, cwd=tmp_path).splitlines()
    assert Path(where).is_relative_to(venv.resolve())  # the wheel's copy, not this checkout
    assert versions == f"{resilient.__version__} {resilient.__version__}"
    assert exported == "True"
