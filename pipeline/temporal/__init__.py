"""The temporal refine stage (ABAW6 phase 2): a Transformer encoder over clips of frozen frame
features, its training and ablation rows. Ray enters only in `ray_train` (its Ray Train adapter)."""
