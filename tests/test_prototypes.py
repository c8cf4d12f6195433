"""Prototype files: bit-exact round trip, safe loading, clear mismatch errors, sampling, appending."""
import pickle

import pytest
import torch

from steel_fsd.fewshot.support import sample_support
from steel_fsd.fewshot.prototypes import PrototypeFileError, PrototypeSet, append_class, load_prototypes, save_prototypes
from steel_fsd.fewshot.prototypes import check_prototypes


def make_set(names=("a", "b", "c", "d"), dim=8, sha="ab" * 32, seed=0) -> PrototypeSet:
    g = torch.Generator().manual_seed(seed)
    return PrototypeSet(list(names), torch.randn(len(names), dim, generator=g), shots=5, seed=3,
                        support=[{"class": "a", "image_key": "img_1", "file_name": "/x/img_1.jpg", "bbox": [1.0, 2, 3, 4]}],
                        weights_sha256=sha, config={"MODEL.PROTOTYPE.EMBED_DIM": dim, "DATASETS.TRAIN": ["neu_train"]},
                        created="2026-01-01T00:00:00+00:00")


def test_round_trip_is_bit_exact(tmp_path):
    ps = make_set()
    save_prototypes(ps, tmp_path / "p.pt")
    back = load_prototypes(tmp_path / "p.pt")
    assert back.prototypes.dtype == torch.float32
    assert torch.equal(back.prototypes.view(torch.int32), ps.prototypes.view(torch.int32))
    assert (back.class_names, back.shots, back.seed, back.support, back.weights_sha256, back.config, back.created) == \
        (ps.class_names, ps.shots, ps.seed, ps.support, ps.weights_sha256, ps.config, ps.created)
    save_prototypes(back, tmp_path / "q.pt")
    assert torch.equal(load_prototypes(tmp_path / "q.pt").prototypes, ps.prototypes)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "steel_fsd.prototypes", "payload": Evil()}, path)
    with pytest.raises(PrototypeFileError, match="pickled objects"):
        load_prototypes(path)
    path.write_bytes(pickle.dumps({"format": "steel_fsd.prototypes"}))
    with pytest.raises(PrototypeFileError):
        load_prototypes(path)


def test_wrong_format_version_and_shape_are_clear(tmp_path):
    torch.save({"prototypes": torch.zeros(2, 2)}, tmp_path / "x.pt")
    with pytest.raises(PrototypeFileError, match="not a steel-fsd prototype file"):
        load_prototypes(tmp_path / "x.pt")
    ps = make_set()
    save_prototypes(ps, tmp_path / "p.pt")
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v.pt")
    with pytest.raises(PrototypeFileError, match="version 99"):
        load_prototypes(tmp_path / "v.pt")
    payload["version"], payload["class_names"] = 1, ["a", "b"]
    torch.save(payload, tmp_path / "s.pt")
    with pytest.raises(PrototypeFileError, match="do not match 2 classes"):
        load_prototypes(tmp_path / "s.pt")


def test_mismatched_dim_classes_and_weights_fail_clearly(tmp_path):
    ps = make_set()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    with pytest.raises(PrototypeFileError, match="embed dim 8 but the model"):
        check_prototypes(ps, "p.pt", 256, str(weights))
    with pytest.raises(PrototypeFileError, match="made with weights sha256"):
        check_prototypes(ps, "p.pt", 8, str(weights))
    with pytest.raises(PrototypeFileError, match=r"missing prototypes: \['e'\].*not in the dataset: \['d'\]"):
        ps.reordered(["a", "b", "c", "e"])
    re = ps.reordered(["d", "c", "b", "a"])
    assert torch.equal(re.prototypes, ps.prototypes.flip(0))


def test_append_class_keeps_existing_prototypes():
    base, rare = make_set(), make_set(names=("rare",), seed=1)
    both = append_class(base, rare)
    assert both.class_names == ["a", "b", "c", "d", "rare"]
    assert torch.equal(both.prototypes[:4], base.prototypes) and torch.equal(both.prototypes[4], rare.prototypes[0])
    with pytest.raises(PrototypeFileError, match="already have prototypes"):
        append_class(both, rare)
    with pytest.raises(PrototypeFileError, match="different model weights"):
        append_class(base, make_set(names=("x",), sha="cd" * 32))


def dicts_with(counts_per_image):
    out = []
    for i, classes in enumerate(counts_per_image):
        out.append({"image_id": i + 1, "image_key": f"img_{i:03d}", "file_name": f"/d/{i}.jpg", "height": 10, "width": 10,
                    "annotations": [{"bbox": [0, 0, 5, 5], "bbox_mode": 0, "category_id": c} for c in classes]})
    return out


def test_sample_support_counts_instances_and_is_seeded():
    dicts = dicts_with([[0, 0, 1], [1], [0], [2, 2], [1, 0], [2]])
    picks = sample_support(dicts, 3, shots=2, seed=5)
    labels = [d["annotations"][i]["category_id"] for d, i in picks]
    assert labels == [0, 0, 1, 1, 2, 2]
    assert sample_support(list(reversed(dicts)), 3, 2, 5) == picks  # input order does not matter
    seeds = {tuple((d["image_key"], i) for d, i in sample_support(dicts, 3, 2, s)) for s in range(10)}
    assert len(seeds) > 1
    assert len(sample_support(dicts, 3, shots=10, seed=0)) == 4 + 3 + 3  # all there is
    with pytest.raises(ValueError, match="class 3 has no annotated instance"):
        sample_support(dicts, 4, 1, 0)
