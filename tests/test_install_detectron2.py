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


def test_stub_raises_clear_error_naming_the_op(tmp_path):
    stub = tmp_path / "_C.py"
    stub.write_text(inst.STUB_SOURCE)
    spec = importlib.util.spec_from_file_location("stub_C", stub)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
