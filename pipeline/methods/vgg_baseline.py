"""The ABAW organisers' baseline: VGG16 with frozen convolutional weights, three trainable fully
connected layers and a softmax output, trained with cross-entropy on the labeled weak view.

Cost: one forward of the frozen convolutions without gradients, forward/backward through the three
FC layers only (less than one supervised pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vgg import VGG

from pipeline.methods.base import register_method
from pipeline.methods.supervised import Supervised


@dataclass
class VggBaselineOptions:
    label_smoothing: float = 0.0
    freeze_features: bool = True
    """Keep the convolutional weights fixed ("fixed convolutional weights from a pre-trained
    checkpoint on VGGFACE dataset for feature extraction"); False fine-tunes the whole VGG."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


@register_method
class VggBaseline(Supervised):
    name = "vgg_baseline"
    Options = VggBaselineOptions

    def configure_model(self) -> None:
        if not isinstance(self.model, VGG):
            raise ValueError(f"model.backbone: vgg_baseline needs a timm VGG (vgg11, vgg13, vgg16, vgg19 or "
                             f"their _bn variants), got {self.context.model.backbone!r}")
        # "the last three fully connected layers are trainable": timm's VGG keeps fc6 and fc7 (as
        # 7x7 and 1x1 convolutions) in `pre_logits` and fc8 in the head; the convolutions are `features`.
        if self.options.freeze_features:
            self.model.features.requires_grad_(False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        frozen = self.options.freeze_features
        if frozen:
            # Fixed weights are a fixed feature extractor: eval mode, so a _bn variant's running
            # statistics stay those of the checkpoint too.
            self.model.features.eval()
        with torch.no_grad() if frozen else torch.enable_grad():
            features = self.model.forward_features(images)
        return self.model.forward_head(features)
