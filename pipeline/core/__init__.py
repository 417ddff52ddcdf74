"""The pure learning core, no Ray: weak/strong views and RandAugment, model creation, the EMA
network, class thresholds (DTM, class-mean, adaptive), macro-F1 and per-video smoothing."""
