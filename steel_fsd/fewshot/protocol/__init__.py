"""The few-shot protocol: settings x methods x K x seeds, each cell adapted, evaluated and written as JSON.

A protocol file (YAML, see ``configs/protocols/``) names the datasets (train/val/test split names under a
short key such as ``neu``), the models (Detectron2 config files), the methods (a model and how it
adapts), the settings, the shots and seeds. :class:`Protocol` runs it:

* ``base_novel``: a dataset's classes split into base and novel; the base model trains on images holding
  only base classes; adaptation uses a K-shot manifest over all classes (TFA's balanced fine-tuning set);
  evaluation on the test split over all classes, bAP/nAP over the base/novel classes.
* ``cross``: the base model trains on all classes of ``source``; adaptation with K shots per class of
  ``target``; evaluation on ``target``'s test split.
* ``kshot`` (in-domain): no base model; the model trains from MODEL.WEIGHTS (scratch offline) on the K-shot
  set of all classes of ``dataset``, then is evaluated on its test split.
* ``VARIANTS``: ablation / preprocessing rows, each a model trained on a dataset's train split and evaluated
  on its test split with its trained classifier (prototype models: the memory bank), ``shots`` 0.

Methods adapt by ``support`` (prototypes from the K shots with :func:`register_support`, no gradient
step) or ``finetune`` (the base checkpoint resized to the target classes by
:func:`~steel_fsd.modeling.surgery.resize_checkpoint`, prototype banks initialized from the support
prototypes, then FINETUNE_OPTS, e.g. backbone and RPN frozen). Every trained model and every cell is
cached on disk: a rerun skips what is finished and resumes an interrupted training.

Layout: :mod:`.spec` (the file), :mod:`.methods` (adaptation by ``adapt`` name, pluggable), :mod:`.cells`
(the cell record and its one writer), :mod:`.runner` (:class:`Protocol`: training, cells, report).
"""
from .cells import Cell, cell_record
from .methods import ADAPTERS, AdaptContext
from .runner import Protocol
from .spec import KINDS, ProtocolSpec, Setting

__all__ = ["ADAPTERS", "AdaptContext", "KINDS", "Cell", "Protocol", "ProtocolSpec", "Setting", "cell_record"]
