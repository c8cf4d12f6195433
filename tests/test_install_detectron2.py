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
