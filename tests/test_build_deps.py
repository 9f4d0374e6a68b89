"""`pip install .` without a build dependency stops with ONE message naming what is missing and
the package that provides it (cmake/PydronDeps.cmake): CMake's configure step is run for real
on this checkout, with one dependency at a time made unfindable, then all of them."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CMAKE = shutil.which("cmake")
PACKAGES = {       # what the message must name for each dependency: Debian, Fedora, conda-forge
    "python": ("Python >= 3.11", "python3-dev", "python3-devel", "python"),
    "pkg-config": ("pkg-config", "pkg-config", "pkgconf-pkg-config", "pkg-config"),
    "libffi": ("libffi", "libffi-dev", "libffi-devel", "libffi"),
    "xxhash": ("xxHash", "libxxhash-dev", "xxhash-devel", "xxhash"),
    "llvm": ("LLVM development files", "llvm-dev", "llvm-devel", "llvmdev"),
}

def configure(build: Path, *defines: str, env: dict | None = None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([CMAKE, "-S", str(REPO), "-B", str(build),
                           f"-DPython_EXECUTABLE={sys.executable}", *defines],
                          env=full_env, capture_output=True, text=True, timeout=300)


def cache_value(build: Path, name: str) -> str:
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not in the cache")


def missing_entries(stderr: str) -> list[str]:
    """The dependencies the one message lists, in order."""
    assert stderr.count("CMake Error") == 1, stderr
    assert stderr.count("pydron cannot be built: missing build dependencies.") == 1, stderr
    found = []
    for key, (what, debian, fedora, conda) in PACKAGES.items():
        entry = re.search(r"- ([^\n]*)\n\s*Debian/Ubuntu:\s*sudo apt-get install (\S+)\n"
                          r"\s*Fedora:\s*sudo dnf install (\S+)\n"
                          r"\s*conda-forge:\s*conda install -c conda-forge (\S+)",
                          stderr[stderr.find(what) - 4:] if what in stderr else "")
        if entry and what in entry.group(1):
            assert entry.groups()[1:] == (debian, fedora, conda), (key, entry.groups())
            found.append(key)
    return found


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """Where this machine's dependencies are (a full configure must pass first: otherwise the
    checks below would prove nothing)."""
    assert CMAKE, "cmake is not on PATH (make setup installs it)"
    build = tmp_path_factory.mktemp("complete")
    out = configure(build)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pydron: LLVM" in out.stdout
    return {"xxhash": cache_value(build, "XXHASH_INCLUDE_DIR"),
            "llvm": cache_value(build, "LLVM_DIR")}


def llvm_ignored(llvm_dir: str) -> str:
    """CMAKE_IGNORE_PATH entries that hide LLVM's CMake package wherever CMake looks for it
    (Debian: /usr/lib/llvm-N/cmake, a link to lib/cmake/llvm, also reached as /lib/... )."""
    paths = {llvm_dir, os.path.realpath(llvm_dir)}
    for n in range(10, 31):
        for root in ("/usr/lib", "/lib", "/usr/local/lib"):
            paths |= {f"{root}/llvm-{n}/cmake", f"{root}/llvm-{n}/lib/cmake/llvm"}
        paths |= {f"/usr/lib/cmake/llvm-{n}", f"/usr/lib64/cmake/llvm{n}"}
    paths |= {"/usr/lib/cmake/llvm", "/usr/lib64/cmake/llvm", "/usr/local/lib/cmake/llvm",
              "/usr/lib/x86_64-linux-gnu/cmake/llvm"}
    return ";".join(sorted(paths))


def test_libffi_missing(tmp_path, found):
    out = configure(tmp_path, env={"PKG_CONFIG_LIBDIR": str(tmp_path / "none"),
                                   "PKG_CONFIG_PATH": ""})
    assert out.returncode != 0
    assert missing_entries(out.stderr) == ["libffi"]


def test_xxhash_missing(tmp_path, found):
    out = configure(tmp_path, f"-DCMAKE_IGNORE_PATH={found['xxhash']}")
    assert out.returncode != 0
    assert missing_entries(out.stderr) == ["xxhash"]


def test_llvm_missing(tmp_path, found):
    out = configure(tmp_path, f"-DCMAKE_IGNORE_PATH={llvm_ignored(found['llvm'])}",
                    "-DLLVM_DIR=/nonexistent/llvm")
    assert out.returncode != 0
    assert missing_entries(out.stderr) == ["llvm"]


def test_pkg_config_missing(tmp_path, found):
    out = configure(tmp_path, "-DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=TRUE")
    assert out.returncode != 0
    assert missing_entries(out.stderr) == ["pkg-config"]


def test_everything_missing_is_one_message(tmp_path, found):
    ignored = f"{found['xxhash']};{llvm_ignored(found['llvm'])}"
    out = configure(tmp_path, f"-DCMAKE_IGNORE_PATH={ignored}",
                    "-DCMAKE_DISABLE_FIND_PACKAGE_Python=TRUE",
                    env={"PKG_CONFIG_LIBDIR": str(tmp_path / "none"), "PKG_CONFIG_PATH": ""})
    assert out.returncode != 0
    assert missing_entries(out.stderr) == ["python", "libffi", "xxhash", "llvm"]
    assert "Install them, then run `pip install .`" in out.stderr
