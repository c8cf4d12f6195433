"""Dataset mapper: Detectron2's ``DatasetMapper`` with steel-fsd image reading and augmentation."""
from __future__ import annotations

import copy

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from .images import read_dataset_image
from .objectness import OBJECTNESS_KEY
from .transforms import build_augmentations

__all__ = ["SteelDatasetMapper", "masks_all_or_none", "polygons_to_rle", "add_objectness_instances"]


class SteelDatasetMapper(DatasetMapper):
    """``DatasetMapper`` that reads images with :func:`read_dataset_image` and uses
    :func:`build_augmentations`.

    Reading by content applies the dict's ``crop_box`` (tiles), reads PNG data behind ``.jpg``
    names, and raises :class:`~steel_fsd.data.errors.DatasetError` naming the file for a missing,
    corrupt or truncated image. Annotations go through the parent's transformation: boxes follow
    every transform, are clipped to the image, and instances with empty boxes are dropped; at test
    time annotations are removed. Semantic-segmentation files are not supported.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        ret = super().from_config(cfg, is_train)
        augs = build_augmentations(cfg, is_train)
        ret["augmentations"] = augs
        # Cropped/rotated boxes are loose; with masks, recompute tight boxes from them.
        geometric = any(isinstance(a, (T.RandomCrop, T.RandomRotation)) for a in augs)
        ret["recompute_boxes"] = bool(is_train and cfg.MODEL.MASK_ON and geometric)
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        """The parent's, with tight boxes recomputed from masks only for an image that has them (a box-only
        image in a mask model's batch keeps its transformed boxes)."""
        recompute = self.recompute_boxes
        self.recompute_boxes = recompute and _has_masks(dataset_dict["annotations"])
        try:
            super()._transform_annotations(dataset_dict, transforms, image_shape)
        finally:
            self.recompute_boxes = recompute

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one dataset dict to the model's input format (``image`` CHW uint8, ``instances``)."""
        dataset_dict = copy.deepcopy(dataset_dict)
        aug_input = T.AugInput(read_dataset_image(dataset_dict, self.image_format))
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        if image.ndim == 2:  # cv2 drops a single channel (format "L")
            image = image[:, :, None]
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            if self.use_instance_mask:
                dataset_dict["annotations"] = masks_all_or_none(dataset_dict["annotations"])
                if self.instance_mask_format == "bitmask":  # transforms then act on pixels (crop needs no shapely)
                    h, w = dataset_dict["height"], dataset_dict["width"]
                    dataset_dict["annotations"] = [dict(a, segmentation=polygons_to_rle(a["segmentation"], h, w))
                                                   if isinstance(a.get("segmentation"), list) and a["segmentation"]
                                                   else a for a in dataset_dict["annotations"]]
            self._transform_annotations(dataset_dict, transforms, image_shape)
        if dataset_dict.get(OBJECTNESS_KEY) is not None:
            add_objectness_instances(dataset_dict, transforms, image_shape)
        return dataset_dict


def add_objectness_instances(dataset_dict: dict, transforms, image_shape) -> None:
    """Append the dict's objectness-only boxes (``objectness_boxes``, XYXY_ABS; see ``objectness.py``), moved by
    ``transforms`` and clipped to the image, to its instances as class -1 (empty boxes dropped, as Detectron2
    drops empty class boxes)."""
    raw = np.asarray(dataset_dict.pop(OBJECTNESS_KEY), dtype=np.float64).reshape(-1, 4)
    boxes = Boxes(torch.as_tensor(transforms.apply_box(raw) if len(raw) else raw, dtype=torch.float32))
    boxes.clip(image_shape)
    boxes = boxes[boxes.nonempty()]
    inst = dataset_dict.get("instances")
    if inst is None:
        inst = Instances(image_shape, gt_boxes=Boxes(torch.zeros((0, 4))), gt_classes=torch.zeros(0, dtype=torch.int64))
    if inst.has("gt_masks"):
        raise ValueError(f"{dataset_dict.get('file_name')}: objectness-only boxes beside instance masks in one image "
                         "are not supported")
    extra = Instances(image_shape, gt_boxes=boxes, gt_classes=torch.full((len(boxes),), -1, dtype=torch.int64))
    dataset_dict["instances"] = Instances.cat([inst, extra])


def _has_masks(annotations: list[dict]) -> bool:
    return bool(annotations) and all(a.get("segmentation") for a in annotations)


def polygons_to_rle(polygons: list, height: int, width: int) -> dict:
    """COCO polygons (flat x, y lists in pixel-edge coordinates) as one COCO RLE, by pycocotools."""
    from pycocotools import mask as mask_util

    return mask_util.merge(mask_util.frPyObjects([list(map(float, p)) for p in polygons], height, width))


def masks_all_or_none(annotations: list[dict]) -> list[dict]:
    """An image whose boxes have masks trains the mask head; one where only some boxes have masks is used as a
    box-only image (its masks dropped: a partial set of masks would teach that the other defects are background)."""
    if any(a.get("segmentation") for a in annotations) and not _has_masks(annotations):
        return [{k: v for k, v in a.items() if k != "segmentation"} for a in annotations]
    return annotations
