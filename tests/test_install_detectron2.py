"""The Detectron2 installer's source fixes, on a miniature sdist tree, and the installed stand-in."""
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install_detectron2", ROOT / "tools" / "install_detectron2.py")
inst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inst)


def make_tree(tmp_path: Path) -> Path:
    src = tmp_path / "pb1-detectron2-0.6"
    (src / "detectron2" / "data" / "transforms").mkdir(parents=True)
    (src / "setup.py").write_text("setup(\n    ext_modules=get_extensions(),\n)\n")
    (src / "detectron2" / "data" / "transforms" / "transform.py").write_text(
        "def f(interp=Image.LINEAR):\n    return Image.LINEAR\n")
    (src / "detectron2" / "layers.py").write_text("x = Image.BILINEAR\n")
    return src


def test_patch_source_applies_each_fix_once(tmp_path):
    src = make_tree(tmp_path)
    changes = inst.patch_source(src)
    assert len(changes) == 3
    assert "ext_modules=[]" in (src / "setup.py").read_text()
    text = (src / "detectron2" / "data" / "transforms" / "transform.py").read_text()
    assert "Image.LINEAR" not in text and text.count("Image.BILINEAR") == 2
    assert (src / "detectron2" / "layers.py").read_text() == "x = Image.BILINEAR\n"  # untouched
    assert (src / "detectron2" / "_C.py").read_text() == inst.STUB_SOURCE
    assert inst.patch_source(src) == []  # idempotent


def load_stub(tmp_path: Path):
    """Import the stand-in source as a module."""
    stub = tmp_path / "_C.py"
    stub.write_text(inst.STUB_SOURCE)
    spec = importlib.util.spec_from_file_location(f"stub_C_{tmp_path.name}", stub)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stub_raises_clear_error_naming_the_op(tmp_path):
    mod = load_stub(tmp_path)
    assert mod.IS_STUB is True
    with pytest.raises(RuntimeError, match=r"box_iou_rotated.*without its C\+\+/CUDA extension"):
        mod.box_iou_rotated
    assert not hasattr(mod, "__wrapped__")  # dunder lookups stay AttributeError (pickle/inspect safe)


def test_verify_sha256_rejects_other_bytes(tmp_path):
    f = tmp_path / "x.tar.gz"
    f.write_bytes(b"not the sdist")
    inst.verify_sha256(f, hashlib.sha256(b"not the sdist").hexdigest())
    with pytest.raises(SystemExit, match="does not match"):
        inst.verify_sha256(f)


@pytest.mark.slow
def test_existing_detectron2_is_detected_and_reused():
    found = inst.existing_detectron2(sys.executable)
    assert found is not None and found.split()[0].startswith("0.")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "install_detectron2.py")], capture_output=True,
                         text=True, check=True).stdout
    assert "using existing detectron2" in out


def test_installed_detectron2_imports_modules_that_need_C():
    import detectron2.evaluation.fast_eval_api  # noqa: F401
    import detectron2.layers.deform_conv  # noqa: F401
    import detectron2.layers.roi_align_rotated  # noqa: F401
    import detectron2.layers.rotated_boxes  # noqa: F401
    from detectron2.data.transforms import ExtentTransform
    assert ExtentTransform.__init__.__defaults__[0] is not None  # Image.BILINEAR resolved at import


def fake_detectron2(tmp_path: Path, c_source: str | None) -> Path:
    pkg = tmp_path / "site" / "detectron2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.6'\n")
    if c_source is not None:
        (pkg / "_C.py").write_text(c_source)
    return tmp_path / "site"


@pytest.mark.parametrize("c_source,reused", [
    (None, True),  # a user's build whose _C fails to import is still theirs: never replaced
    ("def nms(): pass\n", True),  # a real extension (here: any module without IS_STUB)
    (inst.STUB_SOURCE, True),  # the current stand-in
    ("IS_STUB = True\ndef __getattr__(n):\n    raise RuntimeError(n)\n", False),  # an outdated stand-in
])
def test_outdated_stand_in_is_reinstalled_but_user_builds_are_kept(tmp_path, monkeypatch, c_source, reused):
    monkeypatch.setenv("PYTHONPATH", str(fake_detectron2(tmp_path, c_source)))
    assert (inst.existing_detectron2(sys.executable) is not None) == reused


def test_stand_in_answers_collect_env_queries(tmp_path):
    mod = load_stub(tmp_path)
    assert mod.STUB_VERSION == inst.STUB_VERSION and mod.has_cuda() is False
    assert "no compiled extension" in mod.get_compiler_version()


def make_source_tree(tmp_path: Path) -> Path:
    """A miniature Detectron2 source checkout (main's layout): setup.py would compile csrc/ if asked to."""
    src = tmp_path / "detectron2-main"
    (src / "detectron2" / "layers").mkdir(parents=True)
    (src / "detectron2" / "__init__.py").write_text("__version__ = '0.6'\n")
    (src / "detectron2" / "layers" / "__init__.py").write_text("from detectron2 import _C\n")
    (src / "csrc").mkdir()
    (src / "csrc" / "vision.cpp").write_text("#error not compiled by steel-fsd's installer\n")
    (src / "setup.py").write_text(
        "from setuptools import find_packages, setup\n"
        "def get_extensions():\n"
        "    raise SystemExit('the installer tried to build the C++ extension')\n"
        "setup(\n    name='detectron2', version='0.6', packages=find_packages(exclude=('tests*',)),\n"
        "    ext_modules=get_extensions(),\n)\n")
    (src / ".git").mkdir()  # a checkout's VCS data and an in-place build: not copied
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / "build").mkdir()
    (src / "detectron2" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stale build")
    return src


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_copy_source_leaves_the_tree_alone_and_drops_build_outputs(tmp_path):
    src = make_source_tree(tmp_path)
    before = snapshot(src)
    work = tmp_path / "work"
    work.mkdir()
    copy = inst.copy_source(src, work)
    assert (copy / "csrc" / "vision.cpp").exists() and (copy / "detectron2" / "layers" / "__init__.py").exists()
    assert not (copy / ".git").exists() and not (copy / "build").exists()
    assert not list(copy.rglob("*.so"))  # a stale in-place _C would shadow the stand-in
    assert len(inst.patch_source(copy)) == 2  # no Image.LINEAR here: only the fixes that are needed
    assert snapshot(src) == before  # the fixes went to the copy


def test_copy_source_rejects_a_directory_that_is_not_detectron2(tmp_path):
    (tmp_path / "setup.py").write_text("")
    with pytest.raises(SystemExit, match="not a Detectron2 source tree"):
        inst.copy_source(tmp_path, tmp_path)


def test_source_option_installs_python_code_with_the_stand_in(tmp_path, monkeypatch):
    """End to end on the miniature tree, offline: into a --target folder instead of this environment."""
    src = make_source_tree(tmp_path)
    site = tmp_path / "site"
    calls = []

    def pip(*args):
        calls.append(args)
        if "--no-deps" in args:  # the Detectron2 install itself; runtime deps are this env's already
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--target", str(site), *args], check=True)

    monkeypatch.setattr(inst, "pip", pip)
    monkeypatch.setattr(inst, "download_sdist", lambda dest: pytest.fail("the source path must not download"))
    inst.install(source=src)
    assert [c for c in calls if "--no-deps" not in c] == [("setuptools<81", "wheel"), tuple(inst.RUNTIME_DEPS)]
    monkeypatch.setenv("PYTHONPATH", str(site))
    assert inst.existing_detectron2(sys.executable) == f"0.6 {site / 'detectron2'}"
    out = subprocess.run([sys.executable, "-c", "import detectron2.layers, detectron2._C as C; print(C.IS_STUB)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    assert not (src / "detectron2" / "_C.py").exists()


@pytest.mark.slow
def test_source_option_keeps_an_existing_detectron2_unless_forced(monkeypatch, capsys, tmp_path):
    installs = []
    monkeypatch.setattr(inst, "install", lambda sdist, source: installs.append((sdist, source)))
    assert inst.main(["--source", str(tmp_path)]) == 0
    assert installs == [] and "pass --force to replace it" in capsys.readouterr().out
    assert inst.main(["--source", str(tmp_path), "--force"]) == 0
    assert installs == [(None, tmp_path)]
    with pytest.raises(SystemExit):
        inst.main(["--source", str(tmp_path), "--sdist", str(tmp_path / "x.tar.gz")])  # one origin at a time
