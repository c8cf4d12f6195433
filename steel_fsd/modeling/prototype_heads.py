"""Prototype ROI head: L2-normalized ROI embeddings classified by their similarity to class prototypes.

Logits (MODEL.PROTOTYPE.LOGIT), tau = exp(log_tau) learnable:
  * "distance" (the paper's form; with EMBED_NORM "" it did not detect in the recipe study, see README):
    logit_c = -tau * ||z - mu_c||^2 for every foreground class c, in one
    softmax with the background logit.
  * "factorized" (default): p(c) = p(fg) * q_c with q = softmax_c(tau * cos(z, mu_c)) and p(fg) = sigmoid(-background
    logit), i.e. logits [log q_c | background logit]. The class softmax sees foreground ROIs only (a
    background ROI's loss does not depend on q), so the foreground/background decision cannot pull the
    class embeddings together, tau only sets how sharp the class decision is, and p(fg) does not change
    when prototypes are swapped for another class set or a class is appended.
Embedding normalization (MODEL.PROTOTYPE.EMBED_NORM):
  * "" (the paper's form): z = normalize(W x + b).
  * "BN" (default): z = normalize(BatchNorm(W x + b)), BatchNorm without affine parameters (batch statistics in
    training, running statistics at inference, saved in checkpoints). Measured: without it the batch-hard
    triplet loss collapses every ROI embedding to one point (loss_triplet stuck at the margin, prototype
    cosines > 0.99) on the synthetic demo set, whatever the logits, so no class can be told apart; centred
    embeddings cannot collapse to a point. At the paper's triplet weight 1.0 the uncollapsed triplet loss still
    dominated a small fixed-backbone run (fg accuracy back to 0), so the prototype configs use TRIPLET_WEIGHT 0.1.
Background (MODEL.PROTOTYPE.BACKGROUND):
  * "logit" (default): a learned background logit, a linear function of the box-head feature. It is
    class-agnostic, so it keeps working when prototypes are swapped for a new class set.
  * "prototype": a learned background prototype (a free vector in the embedding space), whose logit
    has the same form as the classes'. Measured to stall training from scratch: background ROIs embed
    near the class means, so tau is driven to its floor (see README).
Training prototypes (MODEL.PROTOTYPE.SOURCE, ABSENT_CLASSES, TRIPLET_WARMUP_ITERS):
  * "ema" (the paper's): a class present in the batch uses the EMA of the bank and its batch mean; an
    absent class its (stale) bank row, or none with ABSENT_CLASSES "mask" (left out of that batch's softmax).
  * "learned": one parameter vector per class, imprinted (set to the class's batch mean) the first time the
    class is seen, then trained by the classification loss, as a cosine classifier's weights (TFA); the
    EMA bank is still updated, and support prototypes still replace both at inference.
  * the triplet weight can ramp up linearly over the first TRIPLET_WARMUP_ITERS iterations.
Class-specific feature reweighting (MODEL.PROTOTYPE.REWEIGHT_HIDDEN > 0; TL-SDD's reweighting module and
distance-metric classifier): a small MLP turns each class prototype mu_c into channel weights
r_c = 2 * sigmoid(MLP(mu_c)) in (0, 2)^D, and class c is scored on the reweighted pair,
s_c(z) = cos(z * r_c, mu_c * r_c) (as -tau * ||z' - mu'_c||^2 = 2 tau (cos - 1) between the normalized
reweighted vectors under "distance", tau * cos under "factorized"). The weights come from the prototypes, so
support prototypes from K boxes bring their own weights; the MLP's last layer starts at zero (r = 1: the plain
head). TL-SDD reweights the feature map before the box head; here the ROI embedding's channels are reweighted,
which keeps prototype files, checkpoint surgery and the K-box swap unchanged.
Box regression is class-agnostic, so classes never seen in training are still localized.
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
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n

from .losses import batch_hard_triplet_loss


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``-tau * squared Euclidean distance`` between each row of ``z`` (N, D) and each prototype (C, D)."""
    return -tau * (z.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


def cosine_logits(z: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``tau * cos(z_i, mu_c)`` between each row of ``z`` (N, D) and each prototype (C, D); a zero row gives 0."""
    return tau * (F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).t())


def factorized_logits(z: torch.Tensor, prototypes: torch.Tensor, tau: torch.Tensor, bg: torch.Tensor,
                      available: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C+1) logits ``[log softmax_c(tau * cos(z, mu_c)) | bg]``: their softmax is
    ``p(c) = p(fg) * q_c`` with ``p(fg) = sigmoid(-bg)`` and ``q = softmax_c(tau * cos(z, mu_c))``.

    Classes outside ``available`` (bool, C) get -inf; with none available every ROI is background.
    """
    return _factorized(cosine_logits(z, prototypes, tau), bg, available)


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


def classification_accuracy(logits: torch.Tensor, gt_classes: torch.Tensor, num_classes: int) -> dict:
    """Overall and foreground accuracy, under the names Detectron2's softmax head logs."""
    if not len(gt_classes):
        return {}
    pred = logits.argmax(1)
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    out = {"fast_rcnn/cls_accuracy": float((pred == gt_classes).float().mean())}
    if fg.any():
        out["fast_rcnn/fg_cls_accuracy"] = float((pred[fg] == gt_classes[fg]).float().mean())
    return out


def _put_scalars(values: dict) -> None:
    """Log to the trainer's EventStorage (metrics.json, TensorBoard) when one is active."""
    try:
        storage = get_event_storage()
    except AssertionError:  # called outside a trainer (tests, tools)
        return
    for k, v in values.items():
        storage.put_scalar(k, v)


class PrototypeOutputLayers(FastRCNNOutputLayers):
    """Replaces the softmax classifier of :class:`FastRCNNOutputLayers` by prototype logits.

    ``forward`` returns ``(z, deltas)``: the unit-norm embeddings and class-agnostic box deltas.
    Prototypes: an EMA memory bank of class means (buffer ``bank``, saved in checkpoints) during
    training, or prototypes set with :meth:`set_support` (e.g. from ``register_support.py``) for
    inference on any class set.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, embed_dim: int = 256, tau_init: float = 10.0,
                 tau_range: tuple[float, float] = (1.0, 64.0), momentum: float = 0.9, triplet_margin: float = 0.3,
                 triplet_weight: float = 0.1, background: str = "logit", logit: str = "factorized", embed_norm: str = "BN",
                 triplet_warmup_iters: int = 0, source: str = "ema", absent_classes: str = "bank",
                 reweight_hidden: int = 0, **kwargs):
        # Detectron2 after v0.6 (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS) alters the softmax classifier's
        # loss and probabilities, which this head replaces: refuse them rather than ignore them silently.
        unsupported = [k for k in ("use_sigmoid_ce", "use_fed_loss") if kwargs.get(k)]
        if unsupported:
            raise ValueError(f"PrototypeROIHeads classifies by softmax over prototype logits; "
                             f"MODEL.ROI_BOX_HEAD.{'/'.join(k.upper() for k in unsupported)} must be False")
        kwargs["cls_agnostic_bbox_reg"] = True
        super().__init__(input_shape, **kwargs)
        del self.cls_score  # the prototype logits replace it
        in_dim = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        self.embed = torch.nn.Linear(in_dim, embed_dim)
        if embed_norm not in ("", "BN"):
            raise ValueError(f"MODEL.PROTOTYPE.EMBED_NORM must be '' or 'BN', got {embed_norm!r}")
        # no affine shift: a learned common offset would let all embeddings collapse to one point again
        self.embed_norm = torch.nn.BatchNorm1d(embed_dim, affine=False) if embed_norm == "BN" else None
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(tau_init)))
        self.log_tau_range = (math.log(tau_range[0]), math.log(tau_range[1]))
        if background not in ("logit", "prototype"):
            raise ValueError(f"MODEL.PROTOTYPE.BACKGROUND must be 'logit' or 'prototype', got {background!r}")
        if logit not in LOGIT_KINDS:
            raise ValueError(f"MODEL.PROTOTYPE.LOGIT must be 'distance' or 'factorized', got {logit!r}")
        self.background, self.logit = background, logit
        if logit == "distance" and not embed_norm:
            log_first_n(logging.WARNING, PAPER_FORM_WARNING, n=1, key="message")
        if background == "prototype":
            self.bg_prototype = torch.nn.Parameter(torch.zeros(embed_dim))
            if logit == "factorized":  # cosine to a zero vector is undefined (and has no usable gradient)
                torch.nn.init.normal_(self.bg_prototype, std=embed_dim ** -0.5)
        else:
            self.bg_score = torch.nn.Linear(in_dim, 1)
            torch.nn.init.normal_(self.bg_score.weight, std=0.01)
            torch.nn.init.constant_(self.bg_score.bias, 0.0)
        self.register_buffer("bank", torch.zeros(self.num_classes, embed_dim))
        self.register_buffer("bank_filled", torch.zeros(self.num_classes, dtype=torch.bool))
        self.momentum, self.triplet_margin, self.triplet_weight = momentum, triplet_margin, triplet_weight
        self.triplet_warmup_iters = int(triplet_warmup_iters)
        if source not in ("ema", "learned"):
            raise ValueError(f"MODEL.PROTOTYPE.SOURCE must be 'ema' or 'learned', got {source!r}")
        if absent_classes not in ("bank", "mask"):
            raise ValueError(f"MODEL.PROTOTYPE.ABSENT_CLASSES must be 'bank' or 'mask', got {absent_classes!r}")
        self.source, self.absent_classes = source, absent_classes
        if source == "learned":
            self.learned = torch.nn.Parameter(torch.zeros(self.num_classes, embed_dim))
            self.register_buffer("learned_filled", torch.zeros(self.num_classes, dtype=torch.bool))
        self.reweight = None
        if reweight_hidden > 0:
            if background != "logit":
                raise ValueError("MODEL.PROTOTYPE.REWEIGHT_HIDDEN needs MODEL.PROTOTYPE.BACKGROUND 'logit'")
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
                   triplet_margin=p.TRIPLET_MARGIN, triplet_weight=p.TRIPLET_WEIGHT, background=p.BACKGROUND,
                   logit=p.LOGIT, embed_norm=p.EMBED_NORM, triplet_warmup_iters=p.TRIPLET_WARMUP_ITERS,
                   source=p.SOURCE, absent_classes=p.ABSENT_CLASSES, reweight_hidden=p.REWEIGHT_HIDDEN)
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
        """Returns ``(features, deltas)``: ``features`` is ``[z | background logit]`` (N, D+1) with the
        "logit" background, else z (N, D); use :meth:`split` to take it apart."""
        if self.training:  # projected gradient step: keep tau in TAU_RANGE (a collapsing tau flattens all logits)
            with torch.no_grad():
                self.log_tau.clamp_(*self.log_tau_range)
        x = x.flatten(1)
        z = self.embed_features(x)
        if self.background == "logit":
            z = torch.cat([z, self.bg_score(x)], 1)
        return z, self.bbox_pred(x)

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``'s first output -> (z, background logit or None)."""
        if self.background == "logit":
            return features[:, :-1], features[:, -1]
        return features, None

    def set_support(self, prototypes: torch.Tensor | None, class_names: list[str] | None = None) -> None:
        """Use these (C', D) prototypes at inference instead of the training bank (None: back to the bank)."""
        if prototypes is not None and prototypes.shape[1] != self.embed.out_features:
            raise ValueError(f"prototype dim {prototypes.shape[1]} != model embed dim {self.embed.out_features}")
        self.support = None if prototypes is None else prototypes.to(self.bank.device, self.bank.dtype)
        self.support_classes = class_names

    def active_prototypes(self) -> torch.Tensor:
        """Foreground prototypes used at inference: the support set if given, else the learned prototypes
        (SOURCE "learned") or the bank."""
        if self.support is not None:
            return self.support
        return self.learned if self.source == "learned" else self.bank

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
            return cosine_logits(z, fg_prototypes, self.tau)
        return prototype_logits(z, fg_prototypes, self.tau)

    def logits(self, features: torch.Tensor, fg_prototypes: torch.Tensor,
               available: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C+1) logits from ``forward``'s features, background last (Detectron2's convention).

        ``available`` (bool, C): classes that may be predicted; the others get -inf (None: all may).
        """
        z, bg = self.split(features)
        if self.logit == "factorized":
            if bg is None:  # the background prototype's cosine is the background (objectness) logit
                bg = cosine_logits(z, self.bg_prototype.unsqueeze(0), self.tau).squeeze(1)
            return _factorized(self.class_scores(z, fg_prototypes), bg, available)
        if bg is None:
            bg = prototype_logits(z, self.bg_prototype.unsqueeze(0), self.tau).squeeze(1)
        logits = torch.cat([self.class_scores(z, fg_prototypes), bg.unsqueeze(1)], 1)
        if available is not None:
            logits = logits.masked_fill(torch.cat([~available, available.new_zeros(1)]).unsqueeze(0), float("-inf"))
        return logits

    def training_prototypes(self, z: torch.Tensor, gt_classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes for this batch and which classes have one.

        A class present in the batch (foreground ROIs, i.e. matched to a ground truth at the ROI head's
        IoU threshold) uses ``momentum * bank + (1 - momentum) * batch mean`` (the batch mean alone if the
        bank has not seen it yet), with gradient through the batch mean; absent classes use the bank.
        The bank is then updated by the same EMA, without gradient. With SOURCE "learned" the prototypes are
        the ``learned`` parameters instead (a class's row imprinted with its first batch mean); with
        ABSENT_CLASSES "mask" only classes present in the batch are available.
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
        available = self.bank_filled.clone()
        if self.source == "learned":
            with torch.no_grad():  # imprint classes seen for the first time with their batch mean
                new = present & ~self.learned_filled
                self.learned[new] = means[new].detach()
                self.learned_filled |= present
            protos, available = self.learned, self.learned_filled.clone()
        if self.absent_classes == "mask":
            available &= present
        return protos, available

    def triplet_scale(self) -> float:
        """The triplet weight's warm-up factor at the trainer's current iteration (1 outside a trainer)."""
        if self.triplet_warmup_iters <= 0:
            return 1.0
        try:
            it = get_event_storage().iter
        except AssertionError:  # outside a trainer
            return 1.0
        return min(1.0, (it + 1) / self.triplet_warmup_iters)

    @full_precision
    def losses(self, predictions, proposals):
        features, deltas = predictions
        z, _ = self.split(features)
        gt_classes = cat([p.gt_classes for p in proposals], 0) if len(proposals) else torch.empty(0, dtype=torch.long)
        protos, available = self.training_prototypes(z, gt_classes)
        logits = self.logits(features, protos, available)  # never-seen classes cannot be predicted
        if len(proposals):
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], 0)
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], 0)
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=deltas.device)
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        _put_scalars({"prototype/tau": self.tau.item(), "prototype/num_fg_embeddings": int(fg.sum()),
                      **classification_accuracy(logits, gt_classes, self.num_classes)})
        losses = {
            "loss_cls": F.cross_entropy(logits, gt_classes) if len(gt_classes) else features.sum() * 0.0,
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
            "loss_triplet": self.triplet_weight * self.triplet_scale() * batch_hard_triplet_loss(z[fg], gt_classes[fg], self.triplet_margin),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    @full_precision
    def predict_probs(self, predictions, proposals):
        features, _ = predictions
        probs = F.softmax(self.logits(features, self.active_prototypes()), dim=-1)
        return probs.split([len(p) for p in proposals], dim=0)


@ROI_HEADS_REGISTRY.register()
class PrototypeROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose box predictor is :class:`PrototypeOutputLayers`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = PrototypeOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @torch.no_grad()
    def embed_boxes(self, features: dict[str, torch.Tensor], boxes: list[Boxes]) -> torch.Tensor:
        """L2-normalized embeddings (sum of len(boxes), D) of given boxes (e.g. support boxes), one list entry
        per image of the backbone ``features``, in the input image's coordinates."""
        pooled = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        return self.box_predictor.embed_features(self.box_head(pooled))
