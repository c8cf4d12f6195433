#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment.

1. If Detectron2 already imports (e.g. a user's build from source with CUDA ops), use it unchanged
   (``--force`` replaces it).
2. Otherwise fetch the registry's ``pb1-detectron2==0.6`` sdist (Detectron2 v0.6, Python code only),
   verify its sha256, apply the install-time fixes below, and ``pip install`` it without its C++
   extension.  Nothing of Detectron2 is committed to this repository.
3. ``--source DIR`` installs a Detectron2 source tree (e.g. a clone of facebookresearch/detectron2 main)
   the same way, instead of the sdist: its Python code only, no compiler needed.

Install-time fixes (all applied to a temporary copy of the sdist or source tree, each only where needed):
  * build without the extension (``ext_modules=[]``: nothing is compiled, so no compiler or CUDA toolkit);
  * ``Image.LINEAR`` -> ``Image.BILINEAR`` (the name is gone in Pillow >= 10);
  * a ``detectron2/_C.py`` stand-in: modules that import ``_C`` at module level still import, and any
    use of a compiled op raises an error naming the op and how to get it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Detectron2's runtime requirements (v0.6 and main), minus its formatting/caffe2-only pins (black, future,
# pydot); ``packaging`` is imported by main (detectron2.utils.torch_version_utils).
RUNTIME_DEPS = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
    "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1", "hydra-core>=1.1", "packaging",
]

STUB_VERSION = 2  # bump when STUB_SOURCE changes: older stand-ins are then reinstalled
STUB_SOURCE = '''"""Stand-in for Detectron2's compiled extension, written by steel-fsd's installer.

This Detectron2 was installed from Python sources only. Ops that exist only in C++/CUDA
(deformable conv, rotated boxes, fast COCO eval) are unavailable; everything else works.
"""
IS_STUB = True
STUB_VERSION = %(version)d


def get_compiler_version():  # informational, used by detectron2.utils.collect_env
    return "none (Python-only Detectron2: no compiled extension)"


def get_cuda_version():
    return "none (Python-only Detectron2: no compiled extension)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"detectron2._C.{name} is a compiled Detectron2 op, and this Detectron2 was installed "
        "without its C++/CUDA extension (steel-fsd's registry fallback). Build Detectron2 from "
        "source to use it, or avoid the op (e.g. COCOEvaluator(use_fast_impl=False))."
    )
''' % {"version": STUB_VERSION}


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def existing_detectron2(python: str) -> str | None:
    """Return ``'version at path'`` if ``python`` can already import detectron2, else None.

    A registry-fallback install whose ``_C`` stand-in is older than this installer's counts as absent,
    so that it is reinstalled with the current fixes.
    """
    code = ("import detectron2, os\n"
            "try:\n    from detectron2 import _C\nexcept ImportError:\n    _C = None\n"  # a user's build: keep it
            "stub = _C is not None and _C.__dict__.get('IS_STUB', False)\n"
            f"assert not stub or _C.__dict__.get('STUB_VERSION', 1) >= {STUB_VERSION}, 'outdated stand-in'\n"
            "print(detectron2.__version__, os.path.dirname(detectron2.__file__))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def index_url() -> str:
    """The simple-index URL pip is configured with (``pip config``), else pip's default index."""
    res = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    if res.returncode == 0 and res.stdout.strip():
        return res.stdout.strip()
    from pip._internal.models.index import PyPI  # pip's own default, so no host is hard-coded
    return PyPI.simple_url


def download_sdist(dest: Path) -> Path:
    """Download the pinned sdist through the package index's JSON simple API (PEP 691)."""
    url = index_url().rstrip("/") + f"/{SDIST_NAME}/"
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        files = json.load(r)["files"]
    wanted = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    match = [f for f in files if f["filename"] == wanted]
    if not match:
        raise SystemExit(f"{wanted} not found on the package index {url}")
    out = dest / wanted
    log(f"downloading {wanted}")
    urllib.request.urlretrieve(match[0]["url"], out)
    return out


def verify_sha256(path: Path, expected: str = SDIST_SHA256) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {expected}")


def patch_source(src: Path) -> list[str]:
    """Apply the install-time fixes to an extracted sdist tree; return what was changed."""
    changes = []
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    if "ext_modules=get_extensions()" in text:
        setup_py.write_text(text.replace("ext_modules=get_extensions()", "ext_modules=[]"))
        changes.append("setup.py: build without the C++ extension")
    for py in sorted((src / "detectron2").rglob("*.py")):
        text = py.read_text()
        if "Image.LINEAR" in text:
            py.write_text(text.replace("Image.LINEAR", "Image.BILINEAR"))
            changes.append(f"{py.relative_to(src)}: Image.LINEAR -> Image.BILINEAR")
    stub = src / "detectron2" / "_C.py"
    if not stub.exists():
        stub.write_text(STUB_SOURCE)
        changes.append("detectron2/_C.py: stand-in for the compiled extension")
    return changes


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def extract_sdist(sdist: Path | None, tmp: Path) -> Path:
    """The pinned sdist (given, else downloaded), verified and extracted under ``tmp``; its tree."""
    sdist = sdist or download_sdist(tmp)
    verify_sha256(sdist)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / f"{SDIST_NAME}-{SDIST_VERSION}"


# Not copied from a source tree: VCS data and build outputs at its top, compiled files and caches anywhere
# (a stale in-place ``detectron2/_C*.so`` would shadow the stand-in).
SOURCE_TOP_IGNORE = {".git", "build", "dist"}
SOURCE_IGNORE = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.so", "*.pyd")


def copy_source(source: Path, tmp: Path) -> Path:
    """A copy of the Detectron2 source tree ``source`` under ``tmp`` (the fixes never touch the original)."""
    source = source.expanduser().resolve()
    if not (source / "setup.py").is_file() or not (source / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"{source} is not a Detectron2 source tree (expected setup.py and detectron2/__init__.py)")
    dst = tmp / "detectron2-source"

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = SOURCE_TOP_IGNORE.intersection(names) if Path(directory) == source else set()
        return top | SOURCE_IGNORE(directory, names)

    shutil.copytree(source, dst, symlinks=True, ignore=ignore)
    log(f"copied Detectron2 source tree {source}")
    return dst


def install(sdist: Path | None = None, source: Path | None = None) -> None:
    """Install Detectron2's Python code from the pinned sdist, or from the source tree ``source``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        src = copy_source(source, tmp_path) if source else extract_sdist(sdist, tmp_path)
        for change in patch_source(src):
            log(f"patched {change}")
        pip("setuptools<81", "wheel")
        pip(*RUNTIME_DEPS)
        pip("--no-deps", "--no-build-isolation", "--force-reinstall", str(src))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    origin = ap.add_mutually_exclusive_group()
    origin.add_argument("--sdist", type=Path, help="use this local pb1-detectron2-0.6.tar.gz (offline)")
    origin.add_argument("--source", type=Path, metavar="DIR",
                        help="install this Detectron2 source tree (e.g. a clone of main) instead of the sdist, "
                             "with the same fixes and without the C++ extension")
    ap.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = ap.parse_args(argv)
    found = existing_detectron2(sys.executable)
    if found and not args.force:
        log(f"using existing detectron2 {found}")
        if args.sdist or args.source:
            log("pass --force to replace it")
        return 0
    install(args.sdist, args.source)
    found = existing_detectron2(sys.executable)
    if not found:
        raise SystemExit("detectron2 still does not import after installation")
    log(f"installed detectron2 {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
