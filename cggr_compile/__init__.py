"""cggr-compile: confidence-gated gradient routing for PyTorch training.

* ``torch.compile(model, backend="cggr")``: importing this package registers the backend (it is
  also discoverable through the ``torch_dynamo_backends`` entry point).
* :func:`transform`: the same rewrite applied to an ``nn.Module``.
* :func:`enable_cggr`: one call turns CGGR on for a ``transformers.Trainer`` (or TRL's
  ``SFTTrainer``); :func:`route_step` does the same for the micro-batches of a plain loop.
"""

from .compat import CGGRLoss, CGGRModel, CGGRScorer, create_truncated_router
from .config import CGGRConfig
from .integrations import enable_cggr, route_step
from .reference import reference_losses
from .model_layout import ModelCall, RouterSpec
from .router import detect_router_spec
from .transform import transform

__all__ = ["CGGRConfig", "CGGRLoss", "CGGRModel", "CGGRScorer", "ModelCall", "RouterSpec",
           "create_truncated_router", "detect_router_spec", "enable_cggr", "reference_losses", "route_step",
           "transform"]
__version__ = "0.1.0"

from .backend import cggr_state_dict, explain, last_metrics, load_cggr_state_dict, register as _register_backend, step

_register_backend()
__all__ += ["cggr_state_dict", "explain", "last_metrics", "load_cggr_state_dict", "step"]
