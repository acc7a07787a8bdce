"""The ADM evaluator's Inception features, from torch-fidelity's port of the TensorFlow InceptionV3 graph.

torch-fidelity (``pip install torch-fidelity``; torchmetrics' FID uses the same network) re-implements the 2015
TensorFlow Inception graph that the ADM evaluator loads (``classify_image_graph_def.pb``): the same weights, the
graph's own bilinear resize to 299 x 299 (TF1 semantics, not ``F.interpolate``'s) and its input normalisation.
From one forward pass this module takes what the ADM evaluator takes from the graph:

- ``pool``: ``pool_3`` (2,048 features): FID, precision / recall;
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (the 1x1 branch of block ``Mixed_6d``, 17 x 17), flattened
  in NHWC order (2,023 features): sFID;
- ``probabilities``: the softmax of the unbiased logits (``pool_3`` times the graph's ``softmax/logits/MatMul``
  weights, 1,008 classes): the Inception Score.

The weights are downloaded once from torch-fidelity's release into torch's hub cache (``TORCH_HOME``), checked
against the hash in the file name, or read from a local file (``weights=PATH``, the same format: a plain state dict).
Either way they are read with ``torch.load(weights_only=True)``: a file that would run code is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["INCEPTION_WEIGHTS_URL", "InceptionFeatures", "SPATIAL_CHANNELS", "load_inception_weights"]

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]


def _require_torch_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("Inception features need torch-fidelity: pip install 'sphere-ar-hf[eval]' "
                          f"(or pip install torch-fidelity): {e}") from None
    return FeatureExtractorInceptionV3


def load_inception_weights(path: str | os.PathLike | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """The InceptionV3 state dict: from ``path``, or downloaded (and cached) from :data:`INCEPTION_WEIGHTS_URL`."""
    if path is None:
        state = torch.hub.load_state_dict_from_url(INCEPTION_WEIGHTS_URL, map_location="cpu", progress=progress,
                                                   check_hash=True, weights_only=True)
        source = INCEPTION_WEIGHTS_URL
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such Inception weights file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a plain weights file (torch.load with weights_only=True refused it: "
                             f"{str(e).splitlines()[0]})") from None
        except Exception as e:  # noqa: BLE001  (a text file, a truncated archive, ...: whatever torch.load raises)
            first = str(e).splitlines()[0] if str(e) else ""
            raise ValueError(f"{path}: not a readable torch weights file ({type(e).__name__}: {first})") from None
        source = str(path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (torch-fidelity's InceptionV3 weights)")
    return state


class InceptionFeatures:
    """``features(images)`` -> ``{"pool", "spatial", "probabilities"}`` for a batch of uint8 images ``(N, H, W, 3)``.

    Args:
        weights: a local weights file, or ``None`` to download torch-fidelity's (cached after the first time).
        device: where the network runs.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        network_class = _require_torch_fidelity()
        state = load_inception_weights(weights)
        buffer = io.BytesIO()
        torch.save(state, buffer)  # tensors only (checked above), handed to torch-fidelity's loader
        buffer.seek(0)
        try:
            network = network_class("inception-v3-compat", ["2048", "logits_unbiased"],
                                    feature_extractor_weights_path=buffer)
        except RuntimeError as e:  # load_state_dict: missing / unexpected / mis-shaped keys
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise ValueError(f"{weights or INCEPTION_WEIGHTS_URL}: these are not torch-fidelity's InceptionV3 "
                             f"weights ({'; '.join(lines[:3])[:400]})") from None
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self._spatial: torch.Tensor | None = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} of shape {images.shape}")
        x = torch.from_numpy(np.array(images, copy=not images.flags.writeable)).to(self.device).permute(0, 3, 1, 2)
        pool, logits = self.network(x)
        return {"pool": pool.cpu().numpy(), "spatial": self._spatial.float().cpu().numpy(),
                "probabilities": torch.softmax(logits.double(), dim=1).cpu().numpy()}
