"""Model components registered with Detectron2 (importing registers them)."""
from .prototype_heads import PrototypeOutputLayers, PrototypeROIHeads, prototype_logits  # noqa: F401
from .cosine_head import CosineOutputLayers, CosineROIHeads  # noqa: F401
from .mask_head import PartialMaskRCNNHead  # noqa: F401
from .decouple import DecoupledRCNN  # noqa: F401
