"""Pretrain a detector config's ResNet on steel pixels: SimCLR, NNCLR, image-level labels (multi-label), or image
labels and SimCLR together, from one or several datasets at once (:mod:`.sources`: one classifier per labelled
dataset, no held-out image, no novel class).

The encoder is exactly the ResNet the config builds (``backbone.bottom_up`` of an FPN model): its weights
are exported under the model's own names, so ``MODEL.WEIGHTS`` loads them into every Faster R-CNN and
prototype config of the same backbone. Images get the config's test-time harmonization (CLAHE, resize) and
pixel statistics, then augmentations suited to grayscale steel: resized crops, flips, 90-degree rotations,
brightness/contrast, blur and noise (no hue). A projection head (and NNCLR's predictor) is dropped at export.
On a GPU (``device="cuda"``) the images and their augmentation stay on the device and the steps run under
bfloat16 autocast (``amp``); ``shard_mib`` writes the backbone in pieces of at most that size, which
:func:`~steel_fsd.modeling.checkpoint.read_weights_file` joins again.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T2

from ..utils.errors import UserError
from ..utils.io import write_json
from .contrastive import SupportQueue, nnclr_loss, nt_xent
from ..data.splits import image_classes
from .sources import SOURCE_KEY, label_targets, source_masks

logger = logging.getLogger("steel_fsd")
METHODS = ("simclr", "nnclr", "supervised", "supervised+simclr")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def folder_dicts(folders: list[str]) -> list[dict]:
    """Dataset-dict stubs (``file_name`` only) of every image under ``folders``, recursively, sorted; labels ignored."""
    files = sorted({str(p) for f in folders for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES})
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folders}")
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def steel_augment(size: int) -> T2.Compose:
    """Two-view augmentation for grayscale steel: CHW float tensors in [0, 1] (torchvision clamps float images
    to [0, 1] in its colour transforms, so [0, 255] input would come out as a blank image); see :func:`augmented_views`."""
    return T2.Compose([
        T2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        T2.RandomHorizontalFlip(), T2.RandomVerticalFlip(),
        T2.RandomChoice([T2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
        T2.RandomApply([T2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        T2.RandomApply([T2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.5),
    ])


def augmented_views(images: torch.Tensor, aug: T2.Compose) -> torch.Tensor:
    """One augmented view (float, [0, 255]) of each uint8 or [0, 255] image of ``images`` (N, C, H, W), plus
    Gaussian noise of a per-image strength up to 1% of 255."""
    x = torch.stack([aug(im.float() / 255.0) * 255.0 for im in images])
    return x + torch.randn_like(x) * 2.55 * torch.rand(len(x), 1, 1, 1)


class Encoder(nn.Module):
    """The config's ResNet, global-average-pooled, with a projection head (and a predictor for NNCLR, or a
    linear classifier per labelled source for image labels: ``labels = {source: number of classes}``)."""

    def __init__(self, resnet: nn.Module, method: str, labels: dict[str, int] | None = None, dim: int = 128):
        super().__init__()
        self.resnet = resnet
        self.top = resnet._out_features[-1]
        width = resnet.output_shape()[self.top].channels
        # SimCLR's projection head, BatchNorm included: it centres the pooled features across the batch. Measured
        # on real NEU-DET (40 steps of 32): without it the NT-Xent loss stayed at chance, log(2N - 1), under
        # the full augmentation; with it, it fell (3.5 after 40 steps).
        self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                  nn.Linear(width, dim))
        self.predictor = (nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
                          if method == "nnclr" else None)
        # ModuleDict keys cannot be empty or hold dots: source i is "s<i>" (order of ``labels``)
        self.sources = list(labels or {}) if method.startswith("supervised") else []
        self.classifiers = nn.ModuleDict({f"s{i}": nn.Linear(width, n) for i, n in enumerate((labels or {}).values())}) \
            if self.sources else None

    def classifier(self, source: str) -> nn.Module:
        return self.classifiers[f"s{self.sources.index(source)}"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)[self.top].mean(dim=(2, 3))


def single_labels(dicts: list[dict]) -> torch.Tensor | None:
    """Each image's class when it holds boxes or image labels of exactly one class (NEU-DET, X-SDD: all of
    them), else -1; None when no image has a label (folders)."""
    y = torch.tensor([next(iter(c)) if len(c := image_classes(d)) == 1 else -1 for d in dicts])
    return y if (y >= 0).any() else None


@torch.no_grad()
def linear_probe(features: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 200) -> float:
    """Accuracy (%) of a linear classifier on frozen ``features``: trained on a seeded 70% of the labelled
    images (full-batch Adam on standardized features), scored on the other 30%."""
    keep = labels >= 0
    x, y = features[keep], labels[keep]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(0.7 * len(y)))
    tr, te = perm[:cut], perm[cut:] if cut < len(y) else perm[:cut]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = (x - mu) / sd
    lin = nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(lin(x[tr]), y[tr])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float((lin(x[te]).argmax(1) == y[te]).float().mean() * 100)


def _prepare(cfg, dicts: list[dict]) -> torch.Tensor:
    """All images, harmonized as the detector sees them at test time, as one uint8 tensor (N, C, S, S)."""
    from ..data.mapper import SteelDatasetMapper

    mapper = SteelDatasetMapper(cfg, is_train=False)
    size = cfg.INPUT.HARMONIZE.RESIZE
    out = []
    for d in dicts:
        img = mapper(dict(d))["image"]
        if img.shape[1:] != (size, size):  # native-size configs: square crops of the harmonized image
            img = T2.functional.resize(img, [size, size], antialias=True)
        out.append(img)
    return torch.stack(out)


def pretrain(cfg, dicts: list[dict], method: str, epochs: int, out: str, batch: int = 32, lr: float = 0.05,
             temperature: float = 0.1, queue_size: int = 4096, label_classes: list[int] | None = None,
             seed: int = 0, progress: bool = True, crop: int = 0, label_spaces: dict[str, list[int]] | None = None,
             probes: dict[str, list[dict]] | None = None, device: str = "cpu", amp: bool = False,
             shard_mib: float = 0, max_minutes: float = 0) -> dict:
    """Pretrain ``cfg``'s ResNet on ``dicts`` and export it to ``out`` (``{"model": {name: tensor}}``).

    Labels (``supervised`` and ``supervised+simclr``): ``label_spaces`` = ``{source: class ids}`` (the images'
    ``pretrain_source``; one classifier each), or ``label_classes`` for images of one source. ``probes``:
    ``{name: dicts}`` of held-out labelled images: the linear-probe accuracy of the backbone on each, before
    training and after every epoch. ``crop``: side of the augmented views in pixels (0: the config's image size);
    smaller views cost quadratically less per step, and the backbone is fully convolutional, so the weights
    serve any input size. ``device``/``amp``: where to train, and bfloat16 autocast. ``shard_mib``: write the
    backbone in pieces of at most this many MiB (0: one file). ``max_minutes``: stop after the first epoch that
    ends past this wall time (0: run every epoch); the record says so (``stopped_early``).
    Resumable: ``out + ".state.pth"`` holds the encoder, optimizer and epoch after each epoch. Returns the run
    record (also ``out + ".json"``): method, images per source, epochs, per-epoch loss, probes and seconds.
    """
    from detectron2.modeling import build_backbone

    from ..modeling.checkpoint import atomic_save, read_weights_file, save_sharded
    from ..pretrain.convert import backbone_prefix

    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose from {METHODS}")
    supervised, contrastive = method.startswith("supervised"), method != "supervised"
    sources = sorted({d.get(SOURCE_KEY, "") for d in dicts})
    if supervised:
        if label_spaces is None and label_classes and len(sources) == 1:
            label_spaces = {sources[0]: list(label_classes)}
        if not label_spaces:
            raise ValueError("supervised pretraining needs the classes whose image labels to learn"
                             + (" per source (label_spaces)" if len(sources) > 1 else ""))
        unknown = sorted(set(label_spaces) - set(sources))
        if unknown:
            raise ValueError(f"label_spaces name sources without images: {unknown} (sources: {sources})")
    else:
        label_spaces = {}
    torch.manual_seed(seed)
    backbone = build_backbone(cfg)
    resnet = getattr(backbone, "bottom_up", backbone)
    prefix = backbone_prefix(f"backbone.{k}" for k in backbone.state_dict())
    targets = {s: y.to(device) for s, y in label_targets(dicts, label_spaces).items()}
    masks = {s: m.to(device) for s, m in source_masks(dicts, label_spaces).items()}
    model = Encoder(resnet, method, {s: len(c) for s, c in label_spaces.items()}).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    images = _prepare(cfg, dicts).to(device)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(1, -1, 1, 1)
    if crop < 0 or crop > images.shape[-1]:
        raise ValueError(f"crop {crop}: give 1 to the image size {images.shape[-1]} (0: the image size)")
    aug = steel_augment(crop or images.shape[-1])
    queue = SupportQueue(queue_size, model.head[-1].out_features) if method == "nnclr" else None
    state_path, record_path = out + ".state.pth", out + ".json"
    record = {"method": method, "images": len(dicts), "epochs": epochs, "batch": batch, "lr": lr,
              "crop": crop or images.shape[-1], "device": str(device), "amp": bool(amp),
              "sources": {s: sum(d.get(SOURCE_KEY, "") == s for d in dicts) for s in sources},
              "label_spaces": {s: len(c) for s, c in label_spaces.items()}, "history": []}
    # probes: the training images' own classes (one source only: class ids of several sources collide), and
    # the held-out sets given
    probe_sets = {name: (_prepare(cfg, ds).to(device), single_labels(ds)) for name, ds in (probes or {}).items()}
    if len(sources) == 1 and (train_labels := single_labels(dicts)) is not None:
        probe_sets = {"train": (images, train_labels), **probe_sets}
    probe_sets = {k: v for k, v in probe_sets.items() if v[1] is not None}
    start_epoch = 0
    if os.path.isfile(state_path):
        st = read_weights_file(state_path)
        saved = st.get("method") if isinstance(st, dict) else None
        if not isinstance(st, dict) or "encoder" not in st or (saved is not None and saved != method):
            raise UserError(f"{state_path} is the resumable state of " + (f"a {saved} pretraining" if saved else
                            "another run") + f", not of this {method} one", "",
                            "pass the same --method to resume it, or another --out for a new run")
        try:
            model.load_state_dict(st["encoder"])
        except RuntimeError as e:
            raise UserError(f"{state_path} does not fit this {method} encoder ({str(e).splitlines()[0]})", "",
                            "pass the settings it was started with, or another --out for a new run") from None
        opt.load_state_dict(st["optimizer"])
        start_epoch, record["history"] = int(st["epoch"]), list(st["history"])
        record["probe_init"] = st.get("probe_init") or {}
        logger.info("pretrain: resuming %s after epoch %d", state_path, start_epoch)

    def autocast():
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(amp))

    def view(x: torch.Tensor) -> torch.Tensor:
        return (augmented_views(x, aug) - mean) / std

    def probe() -> dict[str, float]:
        """Linear-probe accuracy of the current backbone on each probe set (a cheap quality signal)."""
        model.eval()
        accs = {}
        with torch.no_grad(), autocast():
            for name, (imgs, labels) in probe_sets.items():
                feats = torch.cat([model.features((imgs[i:i + 64].float() - mean) / std).float()
                                   for i in range(0, len(imgs), 64)]).cpu()
                accs[name] = round(linear_probe(feats, labels, seed), 2)
        model.train()
        return accs

    def supervised_loss(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean over the batch's labelled images of the BCE of their own source's classifier."""
        total, count = feats.new_zeros(()), 0
        for s in label_spaces:
            m = masks[s][idx]
            if m.any():
                logits = model.classifier(s)(feats[m]).float()
                total = total + F.binary_cross_entropy_with_logits(logits, targets[s][idx][m], reduction="none").mean(1).sum()
                count += int(m.sum())
        return total / max(count, 1)

    if probe_sets and start_epoch == 0:  # the same probes on the initial weights: the reference
        record["probe_init"] = probe()
        logger.info("pretrain: linear probe of the initial backbone %s", record["probe_init"])

    model.train()
    run_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if max_minutes and time.perf_counter() - run_start > max_minutes * 60:
            record["stopped_early"] = {"after_epoch": epoch, "max_minutes": max_minutes}
            logger.info("pretrain: %.1f-minute budget spent after epoch %d of %d", max_minutes, epoch, epochs)
            break
        t0, total, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
        steps = range(0, max(len(order) - batch + 1, 1), batch)  # full batches (one short one if few images)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc=f"pretrain {method} epoch {epoch + 1}/{epochs}", unit="batch")
        for i in steps:
            idx = order[i:i + batch]
            with autocast():
                f1 = model.features(view(images[idx]))
                loss = supervised_loss(f1, idx) if supervised else f1.new_zeros(())
                if contrastive:
                    z1, z2 = model.head(f1).float(), model.head(model.features(view(images[idx]))).float()
                    loss = loss + (nt_xent(z1, z2, temperature) if method != "nnclr" else
                                   nnclr_loss(z1, z2, model.predictor(z1), model.predictor(z2), queue, temperature))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
            if progress:
                steps.set_postfix(loss=f"{float(loss.detach()):.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        entry = {"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": round(time.perf_counter() - t0, 1)}
        if probe_sets:
            entry["probe"] = probe()
        chance = math.log(2 * min(batch, len(images)) - 1)  # NT-Xent when every view is equally similar
        if method == "simclr" and entry["loss"] > 0.99 * chance:
            logger.warning("pretrain simclr epoch %d: the NT-Xent loss %.3f is at chance (log(2N - 1) = %.3f): "
                           "the views carry no instance information yet (augmentation too strong, or LR)",
                           epoch + 1, entry["loss"], chance)
        record["history"].append(entry)
        logger.info("pretrain %s epoch %d/%d: loss %.4f%s (%.0f s)", method, epoch + 1, epochs, entry["loss"],
                    f", linear probe {entry['probe']}" if "probe" in entry else "", entry["seconds"])
        atomic_save({"encoder": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "method": method,
                     "history": record["history"], "probe_init": record.get("probe_init")}, state_path)
    weights = {f"{prefix}{k}": v.detach().cpu() for k, v in resnet.state_dict().items()}
    if shard_mib:
        record["shards"] = save_sharded(weights, out, int(shard_mib * 2**20))
    else:
        atomic_save({"model": weights}, out)
    write_json(record_path, record, indent=2)
    _plot(record, out + ".png")
    return record


def _plot(record: dict, path: str) -> None:
    """Loss and (when measured) linear-probe accuracy per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = record["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["epoch"] for e in h], [e["loss"] for e in h], marker="o", color="tab:blue")
    ax.set(xlabel="epoch", ylabel=f"{record['method']} loss")
    names = list(record.get("probe_init") or {}) or list(dict.fromkeys(k for e in h for k in e.get("probe", {})))
    if names:
        ax2 = ax.twinx()
        for name, marker in zip(names, "so^vD<>p*h"):
            pts = ([(0, record["probe_init"][name])] if name in (record.get("probe_init") or {}) else []) + \
                [(e["epoch"], e["probe"][name]) for e in h if name in e.get("probe", {})]
            ax2.plot([e for e, _ in pts], [a for _, a in pts], marker=marker, label=f"probe: {name}")
        ax2.set_ylabel("linear probe accuracy (%)")
        ax2.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
