"""The moving average of the weights (MODEL_EMA) against a hand computation, and end to end through train_net
(the final checkpoint holds the average, a resumed run continues it); test-time flip augmentation (TEST.AUG)."""
import json

import numpy as np
import pytest
import torch

from steel_fsd.engine.ema import ModelEMA
from steel_fsd.modeling.checkpoint import read_weights_file
from steel_fsd.synthetic import make_neu_synthetic
from test_training import train_net  # the same tiny train_net.py run



def test_average_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    w0 = model[0].weight.detach().numpy().copy()
    expected, seen = w0.astype(np.float64), []
    for n in range(1, 101):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
            model[1].num_batches_tracked.fill_(n)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # ramp, then the decay
        seen.append(d)
        expected = d * expected + (1 - d) * model[0].weight.detach().numpy()
    assert seen[0] == pytest.approx(2 / 11) and seen[-1] == 0.9 and seen[9] < 0.9
    np.testing.assert_allclose(ema.shadow["0.weight"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(ema.shadow["1.num_batches_tracked"]) == 100  # integer buffers are copied, not averaged
    ema.copy_to_model()
    np.testing.assert_allclose(model[0].weight.detach().numpy(), expected, rtol=1e-5, atol=1e-6)

    restored = ModelEMA(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 100 and torch.equal(restored.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="lacks"):
        ModelEMA(torch.nn.Linear(4, 4), 0.9).load_state_dict(ema.state_dict())


@pytest.mark.slow
def test_ema_training_resume_and_flip_tta(tmp_path):
    make_neu_synthetic(tmp_path / "data" / "neu-synth", n_per_class=5, seed=0)
    out = tmp_path / "run"
    ema = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5", "TEST.EVAL_PERIOD", "0"]
    train_net(tmp_path / "data", out, *ema, "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "DATASETS.TEST", "()")
    mid = read_weights_file(str(out / "model_0000001.pth"))
    final = read_weights_file(str(out / "model_final.pth"))
    assert mid["model_ema"]["updates"] == 2 and final["model_ema"]["updates"] == 4
    # the final checkpoint's weights are the average; an intermediate one holds the raw weights
    for k, v in final["model"].items():
        assert torch.equal(v, final["model_ema"]["shadow"][k]), k
    differs = [k for k, v in mid["model"].items() if v.is_floating_point() and not torch.equal(v, mid["model_ema"]["shadow"][k])]
    assert differs

    log = train_net(tmp_path / "data", out, "--resume", *ema, "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(3,)",
                     "DATASETS.TEST", "()")
    assert "Starting training from iteration 4" in log
    assert read_weights_file(str(out / "model_final.pth"))["model_ema"]["updates"] == 6

    # evaluation with horizontal-flip test-time augmentation runs Detectron2's TTA wrapper on this model
    log = train_net(tmp_path / "data", out, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                     "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(128,)", "TEST.AUG.FLIP", "True")
    assert "TEST.AUG: evaluating with test-time augmentation (sizes (128,), flip True)" in log
    assert (out / "inference" / "neu_synth_test" / "coco_instances_results.json").is_file()
    assert json.loads((out / "inference" / "neu_synth_test" / "prf_results.json").read_text())["f1"] >= 0
