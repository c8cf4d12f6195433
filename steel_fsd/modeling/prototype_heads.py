"""Prototype ROI head: box features become L2-normalized embeddings, classified by their similarity to class
prototypes, so that prototypes built from K boxes of a new class replace the trained ones without training.

:class:`PrototypeOutputLayers` replaces the softmax classifier of Detectron2's ``FastRCNNOutputLayers``:
* embedding ``z = normalize(BN(W x + b))`` (``MODEL.PROTOTYPE.EMBED_NORM`` "BN", BatchNorm without affine
  parameters; "" is the paper's form without it);
* a class-agnostic background logit, a linear function of the box feature;
* class logits (``MODEL.PROTOTYPE.LOGIT``): "factorized", ``p(c) = p(fg) * softmax_c(tau * cos(z, mu_c))`` with
  ``p(fg) = sigmoid(-background logit)``, so swapping the class set leaves p(fg) unchanged; or "distance" (the
  paper's), ``-tau * ||z - mu_c||^2`` in one softmax with the background logit; tau is learned in TAU_RANGE;
* prototypes: an EMA bank of class means during training (saved in checkpoints), the bank or the prototypes set
  with :meth:`~PrototypeOutputLayers.set_support` at inference;
* losses: Detectron2's classification and box losses on these logits, plus a batch-hard triplet loss on the
  foreground embeddings (``TRIPLET_WEIGHT``);
* optional class-specific channel reweighting of the embedding (TL-SDD, ``REWEIGHT_HIDDEN`` > 0): channel
  weights ``r_c = 2 * sigmoid(MLP(mu_c))`` score class c on ``cos(z * r_c, mu_c * r_c)``.
Box regression is class-agnostic, so classes never seen in training are localized too. What each choice
measured is in the README ("The prototype head and few-shot adaptation").
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n

from .cosine_head import cosine_scores
from .losses import batch_hard_triplet_loss
from .roi_heads import BoxPredictorROIHeads


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``-tau * squared Euclidean distance`` between each row of ``z`` (N, D) and each prototype (C, D)."""
    return -tau * (z.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


def factorized_logits(z: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor, bg: torch.Tensor,
                      available: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C+1) logits ``[log softmax_c(tau * cos(z, mu_c)) | bg]``: their softmax is
    ``p(c) = p(fg) * q_c`` with ``p(fg) = sigmoid(-bg)`` and ``q = softmax_c(tau * cos(z, mu_c))``.

    Classes outside ``available`` (bool, C) get -inf; with none available every ROI is background.
    """
    return _factorized(cosine_scores(z, prototypes, tau), bg, available)


def _factorized(scores: torch.Tensor, bg: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
    """:func:`factorized_logits` from the class scores (N, C)."""
    if available is not None:
        if not bool(available.any()):
            return torch.cat([torch.full_like(scores, float("-inf")), bg.unsqueeze(1)], 1)
        scores = scores.masked_fill(~available.unsqueeze(0), float("-inf"))
    return torch.cat([F.log_softmax(scores, dim=1), bg.unsqueeze(1)], 1)


def reweighted_cosines(z: torch.Tensor, prototypes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, C) ``cos(z_i * r_c, mu_c * r_c)`` for embeddings ``z`` (N, D), prototypes (C, D) and channel weights
    ``r`` (C, D); a zero row gives 0."""
    zr = F.normalize(z.unsqueeze(1) * weights.unsqueeze(0), dim=2)  # (N, C, D)
    mr = F.normalize(prototypes * weights, dim=1)  # (C, D)
    return (zr * mr.unsqueeze(0)).sum(2)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(method):
    """Run a head method in float32 with autocast off (mixed precision): normalization, cosine / distance logits
    with tau up to 64 and triplet distances lose too much in bfloat16 or float16. Half-precision tensor arguments
    are cast to the head's own dtype; the head's few small layers cost next to nothing in float32."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args = [a.to(self.log_tau.dtype) if torch.is_tensor(a) and a.dtype in HALF_DTYPES else a for a in args]
        with torch.autocast(device_type=self.log_tau.device.type, enabled=False):
            return method(self, *args, **kwargs)
    return wrapper


LOGIT_KINDS = ("distance", "factorized")
PAPER_FORM_WARNING = (
    "MODEL.PROTOTYPE.LOGIT 'distance' with EMBED_NORM '' is the paper's head: trained from scratch in the recipe "
    "study it collapsed its embeddings and scored no detection >= 0.5 (F1 0); the default head (LOGIT "
    "'factorized', EMBED_NORM 'BN', TRIPLET_WEIGHT 0.1) is the one measured to work (see README)")


class PrototypeOutputLayers(FastRCNNOutputLayers):
    """Replaces the softmax classifier of :class:`FastRCNNOutputLayers` by prototype logits (module docstring).

    ``forward`` returns ``((z, bg), deltas)``: unit-norm embeddings (N, D), background logits (N,) and
    class-agnostic box deltas; Detectron2's box prediction reads only the deltas.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, embed_dim: int = 256, tau_init: float = 10.0,
                 tau_range: tuple[float, float] = (1.0, 64.0), momentum: float = 0.9, triplet_margin: float = 0.3,
                 triplet_weight: float = 0.1, logit: str = "factorized", embed_norm: str = "BN",
                 reweight_hidden: int = 0, **kwargs):
        # Detectron2 after v0.6 (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS) alters the softmax classifier's
        # loss and probabilities, which this head replaces: refuse them rather than ignore them silently.
        unsupported = [k for k in ("use_sigmoid_ce", "use_fed_loss") if kwargs.get(k)]
        if unsupported:
            raise ValueError(f"PrototypeROIHeads classifies by softmax over prototype logits; "
                             f"MODEL.ROI_BOX_HEAD.{'/'.join(k.upper() for k in unsupported)} must be False")
        if logit not in LOGIT_KINDS:
            raise ValueError(f"MODEL.PROTOTYPE.LOGIT must be 'distance' or 'factorized', got {logit!r}")
        if embed_norm not in ("", "BN"):
            raise ValueError(f"MODEL.PROTOTYPE.EMBED_NORM must be '' or 'BN', got {embed_norm!r}")
        if logit == "distance" and not embed_norm:
            log_first_n(logging.WARNING, PAPER_FORM_WARNING, n=1, key="message")
        kwargs["cls_agnostic_bbox_reg"] = True
        super().__init__(input_shape, **kwargs)
        del self.cls_score  # the prototype logits replace it
        in_dim = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        self.embed = torch.nn.Linear(in_dim, embed_dim)
        # no affine shift: a learned common offset would let all embeddings collapse to one point again
        self.embed_norm = torch.nn.BatchNorm1d(embed_dim, affine=False) if embed_norm == "BN" else None
        self.bg_score = torch.nn.Linear(in_dim, 1)
        torch.nn.init.normal_(self.bg_score.weight, std=0.01)
        torch.nn.init.constant_(self.bg_score.bias, 0.0)
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(tau_init)))
        self.log_tau_range = (math.log(tau_range[0]), math.log(tau_range[1]))
        self.logit = logit
        self.register_buffer("bank", torch.zeros(self.num_classes, embed_dim))
        self.register_buffer("bank_filled", torch.zeros(self.num_classes, dtype=torch.bool))
        self.momentum, self.triplet_margin, self.triplet_weight = momentum, triplet_margin, triplet_weight
        self.reweight = None
        if reweight_hidden > 0:
            self.reweight = torch.nn.Sequential(torch.nn.Linear(embed_dim, reweight_hidden), torch.nn.ReLU(),
                                                torch.nn.Linear(reweight_hidden, embed_dim))
            torch.nn.init.zeros_(self.reweight[2].weight)  # r = 1 at the start: the plain head
            torch.nn.init.zeros_(self.reweight[2].bias)
        self.support: torch.Tensor | None = None  # (C', D), not part of the state dict
        self.support_classes: list[str] | None = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        p = cfg.MODEL.PROTOTYPE
        ret.update(embed_dim=p.EMBED_DIM, tau_init=p.TAU_INIT, tau_range=tuple(p.TAU_RANGE), momentum=p.MOMENTUM,
                   triplet_margin=p.TRIPLET_MARGIN, triplet_weight=p.TRIPLET_WEIGHT, logit=p.LOGIT,
                   embed_norm=p.EMBED_NORM, reweight_hidden=p.REWEIGHT_HIDDEN)
        return ret

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    @full_precision
    def embed_features(self, x: torch.Tensor) -> torch.Tensor:
        """Box-head features (N, ...) -> unit-norm embeddings (N, D)."""
        v = self.embed(x.flatten(1))
        if self.embed_norm is not None:
            n = self.embed_norm
            if self.training and len(v) < 2:  # one row has no batch statistics: use the running ones
                v = F.batch_norm(v, n.running_mean, n.running_var, training=False, eps=n.eps)
            else:
                v = n(v)
        return F.normalize(v, dim=1)

    @full_precision
    def forward(self, x):
        """Returns ``((z, bg), deltas)``."""
        if self.training:  # projected gradient step: keep tau in TAU_RANGE (a collapsing tau flattens all logits)
            with torch.no_grad():
                self.log_tau.clamp_(*self.log_tau_range)
        x = x.flatten(1)
        return (self.embed_features(x), self.bg_score(x).squeeze(1)), self.bbox_pred(x)

    def set_support(self, prototypes: torch.Tensor | None, class_names: list[str] | None = None) -> None:
        """Use these (C', D) prototypes at inference instead of the training bank (None: back to the bank)."""
        if prototypes is not None and prototypes.shape[1] != self.embed.out_features:
            raise ValueError(f"prototype dim {prototypes.shape[1]} != model embed dim {self.embed.out_features}")
        self.support = None if prototypes is None else prototypes.to(self.bank.device, self.bank.dtype)
        self.support_classes = class_names

    def active_prototypes(self) -> torch.Tensor:
        """Foreground prototypes used at inference: the support set if given, else the bank."""
        return self.support if self.support is not None else self.bank

    def channel_weights(self, prototypes: torch.Tensor) -> torch.Tensor:
        """Per-class channel weights (C, D) in (0, 2) from the prototypes (REWEIGHT_HIDDEN > 0)."""
        return 2 * torch.sigmoid(self.reweight(prototypes))

    def class_scores(self, z: torch.Tensor, fg_prototypes: torch.Tensor) -> torch.Tensor:
        """(N, C) foreground class logits before the background: ``-tau * ||z - mu_c||^2`` ("distance") or
        ``tau * cos(z, mu_c)`` ("factorized"), on the reweighted pairs with REWEIGHT_HIDDEN > 0."""
        if self.reweight is not None:
            cos = reweighted_cosines(z, fg_prototypes, self.channel_weights(fg_prototypes))
            return self.tau * (cos if self.logit == "factorized" else 2 * (cos - 1))
        if self.logit == "factorized":
            return cosine_scores(z, fg_prototypes, self.tau)
        return prototype_logits(z, fg_prototypes, self.tau)

    def logits(self, z: torch.Tensor, bg: torch.Tensor, fg_prototypes: torch.Tensor,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C+1) logits, background last (Detectron2's convention). ``available`` (bool, C): classes that may
        be predicted; the others get -inf (None: all may)."""
        scores = self.class_scores(z, fg_prototypes)
        if self.logit == "factorized":
            return _factorized(scores, bg, available)
        logits = torch.cat([scores, bg.unsqueeze(1)], 1)
        if available is not None:
            logits = logits.masked_fill(torch.cat([~available, available.new_zeros(1)]).unsqueeze(0), float("-inf"))
        return logits

    def training_prototypes(self, z: torch.Tensor, gt_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes for this batch and which classes have one (the classes the bank has seen).

        A class present in the batch (foreground ROIs, i.e. matched to a ground truth at the ROI head's
        IoU threshold) uses ``momentum * bank + (1 - momentum) * batch mean`` (the batch mean alone if the
        bank has not seen it yet), with gradient through the batch mean; absent classes use the bank.
        The bank is then updated by the same EMA, without gradient.
        """
        C = self.num_classes
        fg = (gt_classes >= 0) & (gt_classes < C)
        onehot = F.one_hot(gt_classes[fg], C).to(z.dtype)  # (n_fg, C)
        counts = onehot.sum(0)
        present = counts > 0
        means = (onehot.t() @ z[fg]) / counts.clamp_min(1).unsqueeze(1)
        bank, filled = self.bank.detach().clone(), self.bank_filled.clone()
        mix = torch.where(filled.unsqueeze(1), self.momentum * bank + (1 - self.momentum) * means, means)
        protos = torch.where(present.unsqueeze(1), mix, bank)
        with torch.no_grad():
            self.bank.copy_(torch.where(present.unsqueeze(1), mix.detach(), bank))
            self.bank_filled |= present
        return protos, self.bank_filled.clone()

    @full_precision
    def losses(self, predictions, proposals):
        """Detectron2's losses (and classification statistics) on the prototype logits, plus ``loss_triplet``."""
        (z, bg), deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals], 0) if len(proposals) else torch.empty(0, dtype=torch.long)
        protos, available = self.training_prototypes(z, gt_classes)
        logits = self.logits(z, bg, protos, available)  # never-seen classes cannot be predicted
        losses = super().losses((logits, deltas), proposals)
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        get_event_storage().put_scalars(**{"prototype/tau": self.tau.item(), "prototype/num_fg_embeddings": int(fg.sum())})
        triplet = batch_hard_triplet_loss(z[fg], gt_classes[fg], self.triplet_margin)
        losses["loss_triplet"] = self.triplet_weight * triplet * self.loss_weight.get("loss_triplet", 1.0)
        return losses

    @full_precision
    def predict_probs(self, predictions, proposals):
        (z, bg), _ = predictions
        probs = F.softmax(self.logits(z, bg, self.active_prototypes()), dim=-1)
        return probs.split([len(p) for p in proposals], dim=0)


@ROI_HEADS_REGISTRY.register()
class PrototypeROIHeads(BoxPredictorROIHeads):
    """:class:`StandardROIHeads` whose box predictor is :class:`PrototypeOutputLayers`."""

    box_predictor_class = PrototypeOutputLayers

    @torch.no_grad()
    def embed_boxes(self, features: dict[str, torch.Tensor], boxes: list[Boxes]) -> torch.Tensor:
        """L2-normalized embeddings (sum of len(boxes), D) of given boxes (e.g. support boxes), one list entry
        per image of the backbone ``features``, in the input image's coordinates."""
        pooled = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        return self.box_predictor.embed_features(self.box_head(pooled))
