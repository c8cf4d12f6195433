"""Few-shot segmentation of unseen defect classes: support prototypes, similarity maps and a small decoder.

K support images with masks define a class. Each FPN level of the detector's backbone (``p2``-``p4`` by
default) gives support features; a foreground and a background prototype are pooled from them under the
support mask (:func:`masked_average_pool`, or :func:`response_weighted_pool`, which weights each support pixel
by its response to the plain prototype, so atypical pixels at a mask's edge count less). The query's cosine
similarity to both prototypes, per level, upsampled to ``p2`` and stacked with a reduced ``p2`` feature, goes
through a small convolutional decoder to foreground/background logits. ``decoder=False`` is the PANet-style
non-parametric prediction (scaled cosine similarity to the prototypes at ``p2``) on the same features.

Three switches, each off by default and kept only where it wins on validation:

- ``context``: query-context adaptation. The query pixels that respond most to the support's foreground
  (background) prototype are pooled into a query prototype (:func:`context_prototype`, a softmax over the
  query's pixels), and each support prototype is averaged with it before the similarity maps are computed, so
  the prototypes move toward how the defect looks in this query (another line's lighting, another coil).
- ``memory``: a cross-episode memory of the foreground prototypes of past training episodes (``memory`` slots,
  first in first out, with each slot's class). The decoder gets, per level, the query's highest cosine
  similarity to a remembered prototype of *another* class: pixels that look like a known defect of another
  kind. At test time every slot is a base class, so a novel class is never in it.
- attention distillation (``train_episodes(distill=w)``, :func:`distill_loss`): each level's foreground
  similarity map, as a spatial attention (softmax over the query's pixels), learns toward the decoder's own
  (detached) defect map, so the coarse levels attend where the final prediction does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import build_backbone
from torch import nn

__all__ = ["masked_average_pool", "response_weighted_pool", "cosine_map", "context_prototype", "distill_loss",
           "FewShotSegmenter", "POOLINGS"]

POOLINGS = ("response", "average")
PANET_SCALE = 20.0  # PANet's cosine-similarity scale


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, C, H, W) features and (N, H, W) weights in [0, 1] -> (N, C): the mask-weighted mean feature."""
    w = mask.unsqueeze(1).to(feat.dtype)
    return (feat * w).sum((2, 3)) / (w.sum((2, 3)) + eps)


def response_weighted_pool(feat: torch.Tensor, mask: torch.Tensor, temperature: float = 0.1,
                           eps: float = 1e-6) -> torch.Tensor:
    """(N, C, H, W), (N, H, W) -> (N, C): the mean under ``mask`` weighted by each pixel's response
    ``exp(cos(f(x), p) / temperature)`` to the plain masked average ``p`` (softmax over the masked pixels)."""
    plain = masked_average_pool(feat, mask, eps)
    response = F.cosine_similarity(feat, plain[:, :, None, None], dim=1) / temperature  # (N, H, W)
    response = response - response.amax((1, 2), keepdim=True)  # stable exp; the max cancels in the ratio
    return masked_average_pool(feat, mask * response.exp(), eps)


def cosine_map(feat: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) features, (N, C) prototypes -> (N, H, W) cosine similarity."""
    return F.cosine_similarity(feat, proto[:, :, None, None], dim=1)


def context_prototype(feat: torch.Tensor, proto: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """(N, C, H, W) query features, (N, C) prototypes -> (N, C): the query's features averaged with weights
    ``softmax(cos(f(x), p) / temperature)`` over its pixels (the pixels most like the prototype)."""
    w = (cosine_map(feat, proto) / temperature).flatten(1).softmax(1)  # (N, H*W)
    return (feat.flatten(2) * w[:, None]).sum(2)


def distill_loss(level_maps: list[torch.Tensor], final: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over levels of KL(teacher || level) between spatial attentions: the teacher is the softmax over pixels
    of the detached ``final`` defect logit margin (N, H, W); each level map (N, H', W') is a cosine similarity,
    upsampled to the final map's size, softened by ``temperature``."""
    t = final.detach().flatten(1).log_softmax(1)
    losses = []
    for m in level_maps:
        m = F.interpolate(m[:, None], size=final.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        s = (m / temperature).flatten(1).log_softmax(1)
        losses.append(F.kl_div(s, t, log_target=True, reduction="batchmean"))
    return torch.stack(losses).mean()


class FewShotSegmenter(nn.Module):
    """Support images and masks + query images -> query foreground/background logits at input size.

    ``cfg``: a detector config (its backbone is built, e.g. R18-FPN GroupNorm; its weights may come from a
    trained detector). ``levels``: backbone outputs used. ``pooling``: ``"response"`` or ``"average"``.
    ``context`` and ``memory`` (slots; 0 = off): the switches of the module docstring.
    """

    def __init__(self, cfg, levels: tuple[str, ...] = ("p2", "p3", "p4"), pooling: str = "response",
                 reduce_dim: int = 32, hidden: int = 64, context: bool = False, memory: int = 0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: one of {POOLINGS}")
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        missing = [lv for lv in levels if lv not in shapes]
        if missing:
            raise ValueError(f"levels {missing} are not backbone outputs ({sorted(shapes)})")
        self.levels, self.pooling = tuple(levels), pooling
        # what rebuilds this module from a config (written beside the weights by save_segmenter)
        self.arch = {"levels": list(levels), "pooling": pooling, "reduce_dim": reduce_dim, "hidden": hidden,
                     "context": bool(context), "memory": int(memory)}
        self.context, self.memory = bool(context), int(memory)
        norm = cfg.MODEL.FPN.NORM or ""
        c2 = shapes[levels[0]].channels
        self.reduce = Conv2d(c2, reduce_dim, 1, norm=get_norm(norm, reduce_dim), activation=F.relu)
        if self.memory:  # per level: (slots, C) prototypes and their classes (-1: empty), written in order
            for lv in levels:
                self.register_buffer(f"memory_{lv}", torch.zeros(self.memory, shapes[lv].channels))
            self.register_buffer("memory_classes", torch.full((self.memory,), -1, dtype=torch.long))
            self.register_buffer("memory_next", torch.zeros((), dtype=torch.long))
        in_ch = reduce_dim + (3 if self.memory else 2) * len(levels)
        self.decoder = nn.Sequential(
            Conv2d(in_ch, hidden, 3, padding=1, norm=get_norm(norm, hidden), activation=F.relu),
            Conv2d(hidden, hidden, 3, padding=1, norm=get_norm(norm, hidden), activation=F.relu),
            Conv2d(hidden, 2, 1))

    def load_backbone(self, path: str) -> int:
        """Copy the ``backbone.*`` tensors of a detector's weights file (same backbone config) into this
        backbone; returns how many were copied. A missing or mis-shaped backbone tensor raises ``ValueError``."""
        from .checkpoint import read_weights_file

        data = read_weights_file(path)
        state = data.get("model", data) if isinstance(data, dict) else {}
        own = self.backbone.state_dict()
        found = {k[len("backbone."):]: torch.as_tensor(v) for k, v in state.items() if k.startswith("backbone.")}
        bad = [k for k in own if k not in found or tuple(found[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"{path}: {len(bad)} backbone tensors missing or of another shape (first: {bad[0]}); "
                             "give a detector trained with the same backbone config")
        self.backbone.load_state_dict({k: found[k] for k in own})
        return len(own)

    @torch.no_grad()
    def remember(self, protos: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: torch.Tensor) -> None:
        """Write the (B) foreground prototypes of an episode batch, with their classes, into the memory."""
        if not self.memory:
            return
        for b, c in enumerate(classes.tolist()):
            i = int(self.memory_next) % self.memory
            for lv in self.levels:
                getattr(self, f"memory_{lv}")[i] = protos[lv][0][b].detach()
            self.memory_classes[i] = c
            self.memory_next += 1

    def memory_map(self, feat: torch.Tensor, lv: str, classes: torch.Tensor | None) -> torch.Tensor:
        """(N, C, H, W) query features -> (N, H, W): the highest cosine similarity to a remembered prototype whose
        class differs from the query's episode class (``classes``, (N); None: every slot); 0 with none."""
        bank = getattr(self, f"memory_{lv}")
        valid = (self.memory_classes >= 0)[None].expand(len(feat), -1)
        if classes is not None:
            valid = valid & (self.memory_classes[None] != classes[:, None])
        if not bool(valid.any()):
            return feat.new_zeros(len(feat), *feat.shape[-2:])
        sims = torch.einsum("nchw,mc->nmhw", F.normalize(feat, dim=1), F.normalize(bank, dim=1))
        sims = sims.masked_fill(~valid[:, :, None, None], -2.0).amax(1)
        return torch.where(valid.any(1)[:, None, None], sims, torch.zeros_like(sims))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last two dimensions to a multiple of the backbone's size divisibility (FPN: 32)."""
        d = max(int(getattr(self.backbone, "size_divisibility", 1)), 1)
        h, w = x.shape[-2:]
        return F.pad(x, (0, (-w) % d, 0, (-h) % d))

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone features of (N, 3, H, W) images, zero-padded by :meth:`pad` first."""
        return self.backbone(self.pad(images))

    def to_input_size(self, logits: torch.Tensor, size) -> torch.Tensor:
        """Level logits -> logits at the input ``size`` (upsampled to the padded size, the padding cut off)."""
        padded = self.pad(torch.empty(0, 0, *size)).shape[-2:]
        up = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return up[..., : size[0], : size[1]]

    def prototypes(self, feats: dict[str, torch.Tensor], masks: torch.Tensor, shots: int,
                   pooling: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per level: (foreground, background) prototypes (B, C) from (B*K) support features and (B*K, H, W)
        masks, averaged over the K shots."""
        pool = response_weighted_pool if (pooling or self.pooling) == "response" else masked_average_pool
        out = {}
        for lv in self.levels:
            f = feats[lv]
            m = F.interpolate(masks[:, None].float(), size=f.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            fg, bg = pool(f, m), pool(f, 1.0 - m)
            out[lv] = tuple(p.view(-1, shots, p.shape[1]).mean(1) for p in (fg, bg))
        return out

    def forward(self, support: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor,
                decoder: bool = True, pooling: str | None = None, classes: torch.Tensor | None = None,
                aux: dict | None = None) -> torch.Tensor:
        """``support`` (B, K, 3, H, W), ``support_masks`` (B, K, H, W), ``query`` (B, 3, H, W) ->
        logits (B, 2, H, W), channel 1 the defect. ``decoder=False``: PANet-style scaled cosine similarity.
        ``classes`` (B): the episodes' classes during training (the memory leaves them out and remembers
        them); ``aux``: a dict that receives the prototypes and the per-level foreground similarity maps."""
        k = support.shape[1]
        return self.logits(self.features(support.flatten(0, 1)), support_masks.flatten(0, 1), k,
                           self.features(query), query.shape[-2:], decoder, pooling, classes, aux)

    def logits(self, sf: dict[str, torch.Tensor], support_masks: torch.Tensor, shots: int,
               qf: dict[str, torch.Tensor], size, decoder: bool = True, pooling: str | None = None,
               classes: torch.Tensor | None = None, aux: dict | None = None) -> torch.Tensor:
        """:meth:`forward` from precomputed features: (B*K) support features and (B*K, H, W) masks, (B) query
        features, the input ``size``; several methods can then share one backbone pass."""
        protos = support_protos = self.prototypes(sf, self.pad(support_masks.float()), shots, pooling)
        if self.context and decoder:  # (the PANet-style prediction stays the plain baseline)
            protos = {lv: tuple(0.5 * (p + context_prototype(qf[lv], p)) for p in pair) for lv, pair in protos.items()}
        level_size = qf[self.levels[0]].shape[-2:]
        fg_maps = []
        if not decoder:
            fg, bg = protos[self.levels[0]]
            q = qf[self.levels[0]]
            out = PANET_SCALE * torch.stack([cosine_map(q, bg), cosine_map(q, fg)], 1)
        else:
            sims = []
            for lv in self.levels:
                fg, bg = protos[lv]
                maps = [cosine_map(qf[lv], bg), cosine_map(qf[lv], fg)]
                fg_maps.append(maps[1])
                if self.memory:
                    maps.append(self.memory_map(qf[lv], lv, classes))
                sims.append(F.interpolate(torch.stack(maps, 1), size=level_size, mode="bilinear", align_corners=False))
            out = self.decoder(torch.cat([self.reduce(qf[self.levels[0]]), *sims], 1))
        if aux is not None:
            aux.update(prototypes=support_protos, fg_maps=fg_maps)
        return self.to_input_size(out, size)
