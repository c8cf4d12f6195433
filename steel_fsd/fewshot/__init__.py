"""Few-shot adaptation: support sampling and K-shot manifests (``support``), prototype files and attaching them
to a model (``prototypes``), building prototypes from K boxes and evaluating with them (``adapt``), and the
seeded K-shot / cross-dataset protocol (``protocol``)."""
