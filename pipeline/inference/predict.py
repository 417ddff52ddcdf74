"""A trained checkpoint applied to shard rows: find and load the evaluation network of any checkpoint
we write, and `predict_rows`, the pure per-batch function Ray Data actors call (probabilities,
predicted label, confidence and optionally pooled features per row). No Ray here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.data import schema, storage
from pipeline.data.schema import CONFIDENCE, DECODED, FEATURES, PREDICTED, PROBABILITY_COLUMNS
from pipeline.methods.base import Method, MethodContext
from pipeline.training import checkpoint
from pipeline.training.config import TrainConfig, load_config, without_retired_keys
from pipeline.training.inputs import evaluation_tensor

RAY_CHECKPOINT = re.compile(r"^checkpoint_")


def resolve_checkpoint(uri: str) -> str:
    """The checkpoint file meant by `uri`: a `.pt` file; a folder with `checkpoints/epoch-NNNN.pt`
    (a single-process run, or one Ray checkpoint); or a Ray Train run folder (its newest epoch)."""
    if uri.endswith(".pt"):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such checkpoint file")
        return uri
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no such checkpoint, run or folder")
    found = checkpoint.latest(uri)
    if found:
        return found
    candidates = []
    for name in storage.list_dir(uri):
        if RAY_CHECKPOINT.match(name):
            folder = storage.join(uri, name)
            epochs = checkpoint.list_checkpoints(folder)
            if epochs:
                candidates.append((epochs[-1], checkpoint.latest(folder)))
    if not candidates:
        raise FileNotFoundError(f"{uri}: no checkpoint here (expected a .pt file, a run folder with "
                                f"{checkpoint.CHECKPOINT_FOLDER}/epoch-NNNN.pt, or a Ray Train run "
                                "folder with checkpoint_* folders)")
    return max(candidates)[1]


@dataclass
class FrameModel:
    """A trained method's evaluation network, ready to predict."""

    method: Method
    config: TrainConfig
    checkpoint: str
    epoch: int

    @property
    def run_id(self) -> str:
        """What produced a prediction: the run's name and epoch (stored with every output row)."""
        return f"{self.config.run.name}@epoch-{self.epoch:04d}"

    @property
    def network(self) -> torch.nn.Module:
        return self.method.evaluation_model()

    @property
    def acceptance_inclusive(self) -> bool:
        """The method's acceptance rule at its thresholds (`Method.acceptance_inclusive`)."""
        return type(self.method).acceptance_inclusive

    def thresholds(self) -> np.ndarray | None:
        """The class thresholds the method held when saved (None for methods without them)."""
        thresholds = self.method.thresholds()
        return thresholds.detach().cpu().double().numpy() if thresholds is not None else None

    @functools.cached_property
    def feature_width(self) -> int:
        """Width of the pooled features (`pooled_features`), measured once on a blank image: timm's
        `num_features` is not the pre-logits width of every model (heads with a hidden layer)."""
        size = self.config.data.image_size
        blank = torch.zeros((1, 3, size, size), device=self.method.device)
        return int(pooled_features(self, blank).shape[1])

    @functools.cached_property
    def weights_digest(self) -> str:
        """SHA-256 of the evaluation network's parameters and buffers (names, dtypes, shapes,
        bytes), and of the settings that shape its input (backbone, image size, resize, precision):
        the same digest means the same predictions, wherever the checkpoint lies; a network
        retrained to the same path gets a new one."""
        digest = hashlib.sha256()
        options = {"backbone": self.config.model.backbone, "image_size": self.config.data.image_size,
                   "resize": self.config.data.resize, "precision": self.config.run.precision,
                   "method": self.config.method}
        digest.update(json.dumps(options, sort_keys=True).encode())
        for name, tensor in sorted(self.network.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def output_identity(model: FrameModel, **options: Any) -> dict[str, Any]:
    """What a resumable output (predictions, pseudo labels, features) is keyed by: the network's
    weights digest and every other option that changes the rows (features on, thresholds, the
    acceptance rule). Not the checkpoint's path: a run retrained in place must not reuse outputs
    of the old network, and a moved checkpoint may reuse its own."""
    return {"weights": model.weights_digest, **options}


def load_frame_model(uri: str, device: str | torch.device = "cpu") -> FrameModel:
    """Rebuild the method from the checkpoint's own config and load its state (weights_only)."""
    path = resolve_checkpoint(uri)
    state = checkpoint.load(path, map_location="cpu")
    if "config" not in state or "method" not in state:
        raise ValueError(f"{path}: not a training checkpoint of this pipeline (no config/method)")
    config = load_config(base=without_retired_keys(json.loads(state["config"])))
    # The weights come from the checkpoint: never fetch or read the initial weights again.
    model_config = dataclasses.replace(config.model, pretrained=False, pretrained_path=None)
    config = dataclasses.replace(config, model=model_config)
    context = MethodContext(model=model_config, optimizer=config.optimizer, total_steps=config.total_steps,
                            device=torch.device(device), precision=config.run.precision)
    method = config.method_class()(config.options(), context)
    method.load_state_dict(state["method"])
    method.evaluation_model().eval()
    return FrameModel(method=method, config=config, checkpoint=path, epoch=int(state["epoch"]))


@torch.no_grad()
def pooled_features(model: FrameModel, images: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logit features of the evaluation network (timm's forward_head contract)."""
    network = model.network
    if not (hasattr(network, "forward_features") and hasattr(network, "forward_head")):
        raise TypeError(f"{type(network).__name__}: features need a timm model "
                        "(forward_features / forward_head)")
    with model.method.autocast():
        features = network.forward_head(network.forward_features(model.method.prepare(images)),
                                        pre_logits=True)
    return features.float().flatten(1)


@torch.no_grad()
def predict_rows(model: FrameModel, table: pa.Table, with_features: bool = False) -> pa.Table:
    """Shard rows -> one output row each: the identifying columns that are present (sample_id,
    source, split, video, frame, label), the 8 probabilities, predicted label, confidence, `decoded`,
    optionally `features`. Undecodable rows keep their identity with predicted -1, zero
    probabilities and decoded False, so they are counted, never silently dropped."""
    device = model.method.device
    data = model.config.data
    count = table.num_rows
    probabilities = np.zeros((count, schema.NUM_CLASSES), np.float32)
    features = None
    ok = np.zeros(count, bool)
    if count:
        images, ok = evaluation_tensor(table[schema.IMAGE].to_pylist(), data, device)
        if ok.any():
            kept = images[torch.from_numpy(ok).to(device)]
            if with_features:
                pooled = pooled_features(model, kept)
                # timm heads end in the classifier applied to the pooled features (dropout is off in
                # eval), so one forward gives both; a test checks this equals the plain forward.
                with model.method.autocast():
                    logits = model.network.get_classifier()(pooled)
                probabilities[ok] = logits.float().softmax(dim=1).cpu().numpy()
                features = np.zeros((count, pooled.shape[1]), np.float32)
                features[ok] = pooled.cpu().numpy()
            else:
                probabilities[ok] = model.method.predict(kept).cpu().numpy()
    predicted = np.where(ok, probabilities.argmax(axis=1), schema.NO_LABEL).astype(np.int64)
    columns: dict[str, pa.Array] = {}
    for name in (schema.SAMPLE_ID, schema.SOURCE, schema.SPLIT, schema.VIDEO, schema.FRAME, schema.LABEL):
        if name in table.column_names:
            columns[name] = table[name]
    for index, name in enumerate(PROBABILITY_COLUMNS):
        columns[name] = pa.array(probabilities[:, index])
    columns[PREDICTED] = pa.array(predicted)
    columns[CONFIDENCE] = pa.array(probabilities.max(axis=1))
    columns[DECODED] = pa.array(ok)
    if with_features:
        # The network's width even when no row decoded: one column type for every batch of a file.
        if features is None:
            features = np.zeros((count, model.feature_width), np.float32)
        columns[FEATURES] = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                              features.shape[1])
    return pa.table(columns)


def probabilities_of(table: pa.Table) -> np.ndarray:
    """The (N, 8) probability matrix of a `predict_rows` output."""
    return np.stack([table[name].to_numpy(zero_copy_only=False) for name in PROBABILITY_COLUMNS],
                    axis=1).astype(np.float32)
