"""Build the binaries (one-file and one-folder, from one PyInstaller run) and the .deb once
per test session.

Building takes a minute or two, so all are session-scoped and every packaging test shares
them. A CI job that already built them can pass them in with
``EDGE_AGENT_BINARY=dist/edge-agent EDGE_AGENT_ONEDIR=dist/edge-agent-onedir`` (and the .deb
with ``EDGE_AGENT_DEB=dist/...deb``); otherwise packaging/build_binary.sh --use-current
builds them into a temp directory with the test interpreter's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import agent
from tests.fixtures.packaging import REPO, require_tool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "packaging: builds the PyInstaller binary and the .deb (slow; CI job 'package')"
    )


# pytest-timeout counts fixture setup: whichever test comes first also waits for the session's
# builds (PyInstaller: 2 to 10 minutes on a loaded 2-core machine; each .deb about one).
# Every step inside has its own subprocess timeout, so nothing can hang for this long.
PACKAGING_TIMEOUT = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.packaging)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(PACKAGING_TIMEOUT))


def _run_build(cmd: list[str], what: str) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise AssertionError(
            f"{what} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
        )


@pytest.fixture(scope="session")
def binary_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path | None]:
    """(path of the one-file binary, PyInstaller work dir or None when given via
    EDGE_AGENT_BINARY). The one-folder build is ``edge-agent-onedir/`` beside the binary."""
    given = os.environ.get("EDGE_AGENT_BINARY")
    if given:
        path = Path(given).resolve()
        assert path.is_file() and os.access(path, os.X_OK), f"EDGE_AGENT_BINARY={given}: no binary"
        return path, None
    out = tmp_path_factory.mktemp("binary")
    _run_build(
        [
            "bash",
            str(REPO / "packaging" / "build_binary.sh"),
            "--use-current",
            "--dist",
            str(out / "dist"),
            "--work",
            str(out / "work"),
        ],
        "packaging/build_binary.sh",
    )
    return out / "dist" / "edge-agent", out / "work"


@pytest.fixture(scope="session")
def edge_agent_binary(binary_build: tuple[Path, Path | None]) -> Path:
    return binary_build[0]


@pytest.fixture(scope="session")
def edge_agent_onedir(binary_build: tuple[Path, Path | None]) -> Path:
    """The one-folder build's executable (``edge-agent-onedir/edge-agent``)."""
    given = os.environ.get("EDGE_AGENT_ONEDIR")
    folder = Path(given).resolve() if given else binary_build[0].parent / "edge-agent-onedir"
    exe = folder / "edge-agent"
    assert os.access(exe, os.X_OK) and (folder / "_internal").is_dir(), f"{folder}: no onedir"
    return exe


@pytest.fixture(params=["one-file", "one-folder"])
def built_exe(request: pytest.FixtureRequest) -> Path:
    """Each form of the built agent in turn: the one-file binary, the one-folder build."""
    name = "edge_agent_binary" if request.param == "one-file" else "edge_agent_onedir"
    return request.getfixturevalue(name)


def build_deb(onedir_exe: Path, out: Path, version: str | None = None) -> Path:
    require_tool("dpkg-deb", "apt-get install dpkg-dev")
    require_tool("fakeroot", "apt-get install fakeroot")
    cmd = ["bash", str(REPO / "packaging" / "build_deb.sh"), "--onedir", str(onedir_exe.parent)]
    if version is not None:
        cmd += ["--version", version]
    _run_build(cmd + ["--out", str(out)], "packaging/build_deb.sh")
    (deb,) = out.glob("edge-agent_*.deb")
    return deb


@pytest.fixture(scope="session")
def edge_agent_deb(edge_agent_onedir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("EDGE_AGENT_DEB")
    if given:
        return Path(given).resolve()
    return build_deb(edge_agent_onedir, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def edge_agent_deb_next(edge_agent_onedir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same build packaged as a newer version (``<version>+next1``): an upgrade."""
    return build_deb(
        edge_agent_onedir, tmp_path_factory.mktemp("deb-next"), f"{agent.__version__}+next1"
    )
