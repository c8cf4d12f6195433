"""An exponential moving average of the model's weights, evaluated and saved in place of the last step's.

``MODEL_EMA.ENABLED``: after every optimizer step the average is updated as
``ema = d * ema + (1 - d) * weights`` for every floating-point parameter and buffer (integer buffers are
copied), with ``d = min(MODEL_EMA.DECAY, (1 + n) / (10 + n))`` after ``n`` updates, so that early weights do
not dominate a short schedule. At the last iteration the average is copied into the model before the final
checkpoint is written and the final evaluation runs; the average itself is a checkpointable
(``model_ema``), so a resumed run continues it. Evaluations during training (``TEST.EVAL_PERIOD``) see the
raw weights.
"""
from __future__ import annotations

import logging

import torch
from detectron2.engine import HookBase

logger = logging.getLogger("steel_fsd")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """The moving average of ``model``'s state dict (a checkpointable: ``state_dict``/``load_state_dict``)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"MODEL_EMA.DECAY {decay} is outside [0, 1]")
        self.model, self.decay, self.updates = _unwrap(model), float(decay), 0
        self.reset()

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, v in self.model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().to(s.dtype), alpha=1.0 - d)
            else:
                s.copy_(v)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        self.model.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the model's current weights (after MODEL.WEIGHTS were loaded)."""
        self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"model_ema state lacks {len(missing)} entries of the model, e.g. {sorted(missing)[0]}")
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)


class EMAHook(HookBase):
    """Update :class:`ModelEMA` after each step; copy it into the model at the last iteration (placed before
    the checkpointer so that ``model_final.pth`` holds the average)."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def before_train(self):
        if self.ema.updates == 0:  # nothing resumed: average from the loaded weights, not from the initialization
            self.ema.reset()

    def after_step(self):
        self.ema.update()
        if self.trainer.iter + 1 == self.trainer.max_iter:
            self.ema.copy_to_model()
            logger.info("MODEL_EMA: the model now holds the average of its weights (%d updates, decay %.4f)",
                        self.ema.updates, self.ema.current_decay())
