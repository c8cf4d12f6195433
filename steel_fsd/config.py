"""Config keys added by steel-fsd (``add_steel_fsd_config``), in the style of Detectron2 projects."""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_steel_fsd_config(cfg: CN) -> CN:
    """Add every steel-fsd key, with defaults, to a Detectron2 config (in place; also returned)."""
    _C = cfg
    # Harmonization applied at train and test time (each switchable; all off = "no preprocessing").
    _C.INPUT.HARMONIZE = CN()
    _C.INPUT.HARMONIZE.RESIZE = 512            # target size in pixels; 0 keeps the native size
    _C.INPUT.HARMONIZE.RESIZE_POLICY = "stretch"  # stretch (to SxS) | shortest_edge | longest_edge
    _C.INPUT.HARMONIZE.NORMALIZE = True        # MODEL.PIXEL_MEAN/STD from the training set's statistics
    _C.INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES = 200  # images sampled to estimate mean/std
    _C.INPUT.HARMONIZE.CLAHE = True
    _C.INPUT.HARMONIZE.CLAHE_CLIP = 2.0
    _C.INPUT.HARMONIZE.CLAHE_TILES = 8
    # Random augmentation, train time only.
    _C.INPUT.AUG = CN()
    _C.INPUT.AUG.ENABLED = True                # master switch for all of the below
    _C.INPUT.AUG.GAMMA = True
    _C.INPUT.AUG.GAMMA_RANGE = [0.8, 1.2]
    _C.INPUT.AUG.NOISE = True
    _C.INPUT.AUG.NOISE_SIGMA = 0.01            # std of additive Gaussian noise, fraction of 255
    _C.INPUT.AUG.ROTATION = True
    _C.INPUT.AUG.ROTATION_DEG = 30.0           # uniform in [-deg, +deg]; boxes follow
    _C.INPUT.AUG.HFLIP = True
    _C.INPUT.AUG.VFLIP = True
    _C.INPUT.AUG.CROP = True
    _C.INPUT.AUG.CROP_RANGE = [0.8, 1.0]       # relative crop side, per axis
    _C.INPUT.AUG.SCALES = []                   # multi-scale training: image sizes drawn per image (e.g. [160, 200,
                                               # 240]); [] = INPUT.HARMONIZE.RESIZE only. Test time keeps RESIZE.
    # Mixing images (data/mixing.py): mosaic of 4 images, copy-paste of another image's defects.
    _C.INPUT.AUG.MOSAIC_PROB = 0.0
    _C.INPUT.AUG.MOSAIC_MIN_VISIBLE = 0.3      # a box cut by the mosaic window is kept if this share of it is inside
    _C.INPUT.AUG.COPY_PASTE_PROB = 0.0
    _C.INPUT.AUG.COPY_PASTE_MAX = 3            # defects pasted per image at most
    # Mixed precision (Detectron2's SOLVER.AMP.ENABLED switches it on for training): the autocast dtype,
    # "bfloat16" (CPUs, GPUs from Ampere on; falls back to float16 where unsupported) or "float16" (loss-scaled).
    _C.SOLVER.AMP.PRECISION = "bfloat16"
    _C.TEST.AMP = CN()
    _C.TEST.AMP.ENABLED = False                # evaluation (Trainer.test) under autocast with SOLVER.AMP.PRECISION
    # Exponential moving average of the weights, evaluated and saved at the end of training (engine/ema.py).
    _C.MODEL_EMA = CN()
    _C.MODEL_EMA.ENABLED = False
    _C.MODEL_EMA.DECAY = 0.999                 # ramped as min(DECAY, (1+n)/(10+n)) after n updates
    # Evaluation.
    _C.TEST.PRF_SCORE_THRESH = 0.5             # detections >= this score count for precision/recall/F1
    _C.MODEL.ROI_BOX_HEAD.COSINE_SCALE = 20.0    # CosineROIHeads (TFA's cosine classifier): scale of the cosines
    _C.TEST.PCB_ALPHA = 0.5                    # prototype calibration (adapt: *_pcb): weight of the detector score
    _C.TEST.PRF_IOU_THRESH = 0.5
    # Validation loss during training (loss curves): the training losses on a fixed, unaugmented set of images.
    _C.TEST.VAL_LOSS_DATASET = ""              # registered dataset ("" = off)
    _C.TEST.VAL_LOSS_PERIOD = 0                # every N iterations and at the last one (0 = off)
    _C.TEST.VAL_LOSS_IMAGES = 32               # the first N images (with annotations) of that dataset
    # Gradient-decoupled layers (MODEL.META_ARCHITECTURE "DecoupledRCNN", modeling/decouple.py): the factor on the
    # gradient each branch sends back into the backbone (0 = stop, 1 = unchanged). Defaults: DeFRCN's base training.
    _C.MODEL.GDL = CN()
    _C.MODEL.GDL.RPN_SCALE = 0.0
    _C.MODEL.GDL.ROI_SCALE = 0.75
    # Fine-tuning: parameter-name prefixes kept frozen, e.g. ["backbone", "proposal_generator"] (two-phase
    # transfer: only the ROI heads learn). Empty = everything trains (subject to MODEL.BACKBONE.FREEZE_AT).
    _C.MODEL.FREEZE = []
    # Episodic sampler (DATALOADER.SAMPLER_TRAIN "EpisodicClassSampler"): N classes x K images per batch;
    # N*K = the per-GPU batch size.
    _C.DATALOADER.EPISODE_CLASSES = 4
    _C.DATALOADER.EPISODE_IMAGES_PER_CLASS = 1
    add_prototype_config(cfg)
    return cfg


def add_prototype_config(cfg: CN) -> CN:
    """Keys of the prototype ROI head (MODEL.PROTOTYPE.*). The defaults are the shipped head (factorized
    logits, BN-centred embedding, triplet weight 0.1); ``configs/paper/`` sets the paper's form explicitly."""
    cfg.MODEL.PROTOTYPE = CN()
    cfg.MODEL.PROTOTYPE.EMBED_DIM = 256
    cfg.MODEL.PROTOTYPE.TAU_INIT = 10.0          # initial tau; learned as exp(log_tau)
    cfg.MODEL.PROTOTYPE.TAU_RANGE = [1.0, 64.0]  # tau is kept in this range (projected after each step)
    cfg.MODEL.PROTOTYPE.MOMENTUM = 0.9           # EMA momentum of the prototype memory bank
    cfg.MODEL.PROTOTYPE.TRIPLET_MARGIN = 0.3     # alpha
    cfg.MODEL.PROTOTYPE.TRIPLET_WEIGHT = 0.1     # lambda (paper: 1.0, unstable even with BN); 0 disables it
    # Logits: "factorized" (p(c) = p(fg) * softmax_c(tau*cos(z, mu_c)), p(fg) from the background logit) or
    # "distance" (the paper's -tau*||z-mu_c||^2 in one softmax with the background logit; see prototype_heads.py).
    cfg.MODEL.PROTOTYPE.LOGIT = "factorized"
    # Embedding normalization before the L2 norm: "BN" (BatchNorm without affine; keeps the batch-hard triplet
    # loss from collapsing all embeddings to one point, see prototype_heads.py) or "" (the paper's).
    cfg.MODEL.PROTOTYPE.EMBED_NORM = "BN"
    # TL-SDD's class-specific feature reweighting: hidden width of the MLP that maps a prototype to channel
    # weights of the embedding (0: off; see prototype_heads.py).
    cfg.MODEL.PROTOTYPE.REWEIGHT_HIDDEN = 0
    cfg.MODEL.PROTOTYPE.SUPPORT_FILE = ""        # prototypes from tools/register_support.py
    return cfg
