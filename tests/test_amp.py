"""Mixed precision on CPU (bfloat16 autocast): the training loop for both heads, the prototype head kept in
float32, losses and evaluation close to float32, and the model-folder key of the protocol."""
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from steel_fsd.engine.setup import build_config, finalize_config
from steel_fsd.utils.amp import amp_dtype, autocast

REPO = Path(__file__).resolve().parents[1]
STOCK = str(REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml")
PROTO = str(REPO / "configs" / "demo" / "proto_R18_FPN_synth_neu.yaml")
TINY = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.HARMONIZE.RESIZE", "96",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
        "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "8", "DATALOADER.EPISODE_CLASSES", "2", "SEED", "0"]


def test_amp_dtype_choices():
    assert amp_dtype("bfloat16", "cpu") == torch.bfloat16
    assert amp_dtype("float16", "cpu") == torch.bfloat16  # CPU autocast is bfloat16
    with pytest.raises(ValueError, match="PRECISION"):
        amp_dtype("int8", "cpu")
    assert build_config(STOCK).SOLVER.AMP.PRECISION == "bfloat16" and not build_config(STOCK).TEST.AMP.ENABLED


@pytest.mark.parametrize("config", [STOCK, PROTO], ids=["stock", "prototype"])
def test_mixed_precision_training_and_evaluation_run_both_heads(tmp_path, config):
    """SOLVER.AMP.ENABLED on CPU: the loop is the mixed-precision one, the backbone runs in bfloat16, the
    prototype head in float32, every logged loss is finite, and TEST.AMP evaluation under autocast works."""
    from detectron2.data import DatasetCatalog

    from steel_fsd.data import register_neu
    from steel_fsd.engine.trainer import MixedPrecisionTrainer, Trainer
    from steel_fsd.synthetic import make_neu_synthetic

    name = "t_amp_" + Path(config).stem
    if f"{name}_train" not in DatasetCatalog.list():
        root = make_neu_synthetic(tmp_path / "neu", n_per_class=5, seed=0)
        register_neu(f"{name}_train", root, split="train")
        register_neu(f"{name}_test", root, split="test")
    cfg = build_config(config, TINY + ["SOLVER.AMP.ENABLED", "True", "TEST.AMP.ENABLED", "True",
                                       "SOLVER.MAX_ITER", "3", "DATASETS.TRAIN", f"('{name}_train',)",
                                       "DATASETS.TEST", f"('{name}_test',)", "OUTPUT_DIR", str(tmp_path / "out")])
    finalize_config(cfg)
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, MixedPrecisionTrainer) and trainer._trainer.dtype == torch.bfloat16
    assert not trainer._trainer.grad_scaler.is_enabled()  # bfloat16: no loss scaling
    dtypes = {}
    model = trainer.model
    def record(name):
        def hook(module, inputs, output):
            while isinstance(output, tuple):  # the prototype head returns ((z, bg), deltas)
                output = output[0]
            dtypes.setdefault(name, output.dtype)
        return hook

    model.backbone.bottom_up.stem.register_forward_hook(record("stem"))
    model.roi_heads.box_predictor.register_forward_hook(record("predictor"))
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert dtypes == {"stem": torch.bfloat16,
                      "predictor": torch.float32 if config == PROTO else torch.bfloat16}
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert "bbox" in results[f"{name}_test"]


def _batch(n=2, size=128):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 60, 40], [70, 60, 120, 120], [20, 80, 60, 120]]))
        inst.gt_classes = torch.tensor([0, 3, 1])
        out.append({"image": torch.randint(0, 255, (3, size, size), generator=g).float(), "instances": inst})
    return out


@pytest.mark.parametrize("config", [STOCK, PROTO], ids=["stock", "prototype"])
def test_bf16_losses_are_close_to_float32(config):
    """The same model, batch and RNG state: every loss under bfloat16 autocast is within 2% (relative, or 0.005
    absolute for small losses) of its float32 value. Measured on these models: at most 0.8% apart (triplet)."""
    cfg = build_config(config, ["MODEL.DEVICE", "cpu", "INPUT.HARMONIZE.NORMALIZE", "False"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def losses(dtype):
        model.load_state_dict(state)  # the prototype bank and BN statistics start equal
        torch.manual_seed(3)  # the RPN and ROI samplers draw the same boxes
        with EventStorage(), torch.no_grad(), autocast("cpu", dtype):
            return {k: float(v) for k, v in model(_batch()).items()}

    ref, bf16 = losses(None), losses(torch.bfloat16)
    assert set(ref) == set(bf16)
    for k in ref:
        assert bf16[k] == pytest.approx(ref[k], rel=0.02, abs=0.005), (k, ref[k], bf16[k])
        assert torch.isfinite(torch.tensor(bf16[k]))


def test_prototype_head_is_float32_inside_autocast():
    """Under autocast the head computes exactly what it computes in float32 on the same (bfloat16-rounded) input:
    embeddings, background logit, deltas, logits and losses."""
    from detectron2.layers import ShapeSpec

    from steel_fsd.modeling.prototype_heads import PrototypeOutputLayers

    cfg = build_config(PROTO, ["MODEL.PROTOTYPE.EMBED_DIM", "16"])
    torch.manual_seed(0)
    head = PrototypeOutputLayers(cfg, ShapeSpec(channels=32)).eval()
    x = torch.randn(9, 32).bfloat16()
    proposals = [Instances((64, 64), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 9, 9]] * 9)))]
    with torch.no_grad():
        with autocast("cpu", torch.bfloat16):
            (z, bg), deltas = head(x)
            probs = head.predict_probs(((z, bg), deltas), proposals)
        (ref_z, ref_bg), ref_deltas = head(x.float())
        ref_probs = head.predict_probs(((ref_z, ref_bg), ref_deltas), proposals)
    assert z.dtype == bg.dtype == deltas.dtype == torch.float32
    assert torch.equal(z, ref_z) and torch.equal(bg, ref_bg) and torch.equal(deltas, ref_deltas)
    assert torch.equal(probs[0], ref_probs[0])


def test_model_folder_key_ignores_keys_that_cannot_change_the_weights():
    from steel_fsd.fewshot.protocol.runner import model_identity

    base = model_identity(build_config(STOCK))
    # the prototype head's keys in a stock model, and mixed-precision choices while it is off
    assert model_identity(build_config(STOCK, ["MODEL.PROTOTYPE.LOGIT", "distance"])) == base
    assert model_identity(build_config(STOCK, ["SOLVER.AMP.PRECISION", "float16"])) == base
    assert model_identity(build_config(STOCK, ["TEST.AMP.ENABLED", "True"])) != base
    assert model_identity(build_config(STOCK, ["SOLVER.BASE_LR", "0.03"])) != base
    amp = model_identity(build_config(STOCK, ["SOLVER.AMP.ENABLED", "True"]))
    assert amp != base and amp != model_identity(build_config(STOCK, ["SOLVER.AMP.ENABLED", "True",
                                                                      "SOLVER.AMP.PRECISION", "float16"]))
    proto = model_identity(build_config(PROTO))
    assert model_identity(build_config(PROTO, ["MODEL.PROTOTYPE.LOGIT", "distance"])) != proto
