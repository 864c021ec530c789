"""Weights and heads for any model, ours or timm's.

Everything here finds a model's head through ``model.pretrained_cfg``:
``"classifier"`` (a dotted module path such as ``"fc"`` or ``"head.fc"``, or a
tuple of them) and, for models with auxiliary heads, ``"aux_classifiers"``.
That is what lets the same code load ImageNet weights into a 120-class model,
swap in an MLP head, freeze the backbone or build optimizer groups without
naming an architecture.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from pipeline.distributed import unwrap
from pipeline.errors import PipelineError
from pipeline.models.heads import HEADS, build_head, check_head, final_layer, init_head_small

__all__ = ["HEADS", "check_head"]  # re-exported: they used to live here
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Where training scripts (ours, timm's, torchvision's references) keep the weights.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state", "state_dict_ema")
# Added by DataParallel/DistributedDataParallel and by torch.compile respectively.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_PROBLEMS_SHOWN = 3


@dataclass
class LoadReport:
    """What ``load_weights`` did with each tensor name."""

    loaded: list[str]
    dropped: list[str]  # in the file, head-only, did not fit: ignored
    random: list[str]  # in the model's head, not loaded: a new head (final layer zero-started)
    source: str = ""
    reason: str = ""  # why ``dropped`` was dropped, e.g. "1000 classes, model has 120"

    def summary(self) -> str:
        """One log line: counts, and the dropped names with the reason."""
        dropped = f"dropped {len(self.dropped)}"
        if self.dropped:
            dropped += f" ({', '.join(self.dropped)}: {self.reason})"
        return (f"weights {self.source}: loaded {len(self.loaded)} tensors, {dropped}, "
                f"new head tensors {len(self.random)}")


def architecture(model: nn.Module) -> str:
    """The model's name for messages."""
    return model.pretrained_cfg.get("architecture", type(model).__name__)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the classifier module(s), auxiliary classifiers included."""
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return names + tuple(cfg.get("aux_classifiers", ()))


def in_head(name: str, heads: Sequence[str]) -> bool:
    """Whether parameter/module ``name`` lies inside one of the ``heads`` modules."""
    return any(name == head or name.startswith(head + ".") for head in heads)


# ---------------------------------------------------------------- reading files


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a zip checkpoint's pickle would import (read from its opcodes, not run)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # not a zip checkpoint: nothing to name
        return []


def _torch_load(path: Path) -> object:
    try:
        # weights_only=True: unpickling a file from the internet must never run its code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch raises this both for pickles that need code and for plain garbage.
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise PipelineError(
                f"weights file {path} refused as unsafe: loading it would call "
                f"{', '.join(unsafe[:3])} (e.g. a whole model saved with torch.save(model)); "
                "re-save only the weights, torch.save(model.state_dict(), path), from a trusted copy"
            ) from err
        raise PipelineError(f"weights file {path} is not a readable PyTorch file, or one that "
                            "would need to run code to load (refused as unsafe); check the file "
                            "or re-save it with torch.save(model.state_dict(), path)") from err
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as err:
        raise PipelineError(f"weights file {path} is not a readable PyTorch file ({err}); "
                            "check that the download finished and the suffix is right") from err


def _unwrap_checkpoint(obj: object, path: Path) -> dict[str, Tensor]:
    """The state_dict inside ``obj``: ``obj`` itself or one of CHECKPOINT_KEYS."""
    if not isinstance(obj, Mapping):
        raise PipelineError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict; "
                            "save it with torch.save(model.state_dict(), path)")
    for key in CHECKPOINT_KEYS:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    if obj and all(isinstance(value, Tensor) for value in obj.values()):
        return dict(obj)
    raise PipelineError(f"weights file {path} holds no state_dict (top-level keys: "
                        f"{', '.join(map(str, list(obj)[:8]))}); expected tensors or one of "
                        f"{', '.join(CHECKPOINT_KEYS)}")


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a local weights file (.safetensors, or a torch pickle read safely)."""
    if not path.is_file():
        raise PipelineError(f"weights file {path} not found; check the path passed to --weights")
    if path.suffix not in SUFFIXES:
        raise PipelineError(f"weights file {path} has an unknown suffix; "
                            f"use one of {', '.join(SUFFIXES)}")
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except SafetensorError as err:
            raise PipelineError(f"weights file {path} is not a valid .safetensors file ({err}); "
                                "check that the download finished") from err
    else:
        state = _unwrap_checkpoint(_torch_load(path), path)
    return _strip_wrappers(state)


# ---------------------------------------------------------------- fitting tensors to a model


def _shape(tensor: Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def _drop_reason(dropped: list[str], state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    for key in dropped:
        if key in own and state[key].ndim == 2 and own[key].ndim == 2:
            return f"{state[key].shape[0]} classes, model has {own[key].shape[0]}"
    return "the model's head has a different structure"


def _sort_keys(state: Mapping[str, Tensor], own: Mapping[str, Tensor], heads: Sequence[str]
               ) -> tuple[list[str], list[str], list[str]]:
    """Split the file's keys into (loaded, dropped, problems); problems are messages."""
    loaded, dropped, problems = [], [], []
    for key, tensor in state.items():
        if key in own and own[key].shape == tensor.shape:
            loaded.append(key)
        elif in_head(key, heads):
            dropped.append(key)
        elif key in own:
            problems.append(f"{key} file {_shape(tensor)} vs model {_shape(own[key])}")
        else:
            problems.append(f"{key} {_shape(tensor)} not in the model")
    for key in own:
        # A missing counter (num_batches_tracked) is harmless: it only matters for momentum=None.
        if key not in state and not in_head(key, heads) and not key.endswith("num_batches_tracked"):
            problems.append(f"{key} {_shape(own[key])} missing from the file")
    return loaded, dropped, problems


def _zero_unloaded_heads(model: nn.Module, heads: Sequence[str], loaded: set[str]) -> None:
    """Zero-start every head whose final layer the file did not fill (see heads.init_head_small)."""
    for path in heads:
        module = model.get_submodule(path)
        found = final_layer(module)
        if found is not None and ".".join(filter(None, (path, found[0], "weight"))) not in loaded:
            init_head_small(module)


def apply_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> LoadReport:
    """Load ``state`` into ``model``; a head whose tensors do not fit starts at zero.

    Any other missing, unexpected or mis-shaped tensor means the file belongs
    to another architecture: that is an error naming the first few of them.
    """
    model = unwrap(model)
    own = model.state_dict()
    heads = head_names(model)
    loaded, dropped, problems = _sort_keys(state, own, heads)
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        listed = "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        raise PipelineError(f"weights {source} do not fit model {architecture(model)} "
                            f"({len(loaded)} of {len(state)} tensors fit): {listed}; "
                            "use weights saved from this architecture or pick the model they belong to")
    model.load_state_dict({key: state[key] for key in loaded}, strict=False)
    keep_dropped_classifier(model, heads, state, dropped)
    done = set(loaded)
    _zero_unloaded_heads(model, heads, done)
    random = [key for key in own if in_head(key, heads) and key not in done]
    return LoadReport(loaded, dropped, random, source=source, reason=_drop_reason(dropped, state, own))


def keep_dropped_classifier(model: nn.Module, heads: Sequence[str], state: Mapping[str, Tensor],
                            dropped: list[str]) -> None:
    """Keep the file's own classifier (dropped: other classes) as ``model.pretrained_head``: what it knows
    of classes the competition shares with it, by name (pipeline/models/class_prior.py)."""
    from pipeline.models.class_prior import pretrained_head

    key = f"{heads[0]}.weight" if heads else None  # the main classifier; auxiliary heads are not priors
    if key in dropped:
        head = pretrained_head(state[key], state.get(f"{heads[0]}.bias"))
        if head is not None:
            model.pretrained_head = head


def load_weights(model: nn.Module, path: Path) -> LoadReport:
    """Load a local weights file into ``model`` (see ``apply_state_dict`` for the rules)."""
    path = Path(path)
    return apply_state_dict(model, read_state_dict(path), str(path))


def load_pretrained_url(model: nn.Module) -> LoadReport:
    """Download torchvision's ImageNet weights for one of our models and load them.

    ``pretrained_cfg["tv_weights"]`` names the torchvision enum (``"ResNet50_Weights"``);
    it is resolved only here, so importing the models never imports torchvision.models.
    """
    enum_name = model.pretrained_cfg.get("tv_weights")
    if not enum_name:
        raise PipelineError(f"model {architecture(model)} has no pretrained weights; "
                            "train it from scratch or pass --weights FILE")
    import torchvision.models

    url = getattr(torchvision.models, enum_name).IMAGENET1K_V1.url
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                   weights_only=True)
    except (OSError, RuntimeError) as err:  # no network, HTTP error, bad hash
        raise PipelineError(f"could not download {url} ({err}); for offline use download it "
                            "elsewhere and pass --weights FILE") from err
    return apply_state_dict(model, state, url)


# ---------------------------------------------------------------- heads


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def replace_head(model: nn.Module, head: str, num_classes: int, *, hidden: int = 256,
                 drop_rate: float = 0.0) -> None:
    """Swap the main classifier for ``build_head(head, ...)``: "linear" keeps the
    (already zero-started) Linear, "mlp" is Linear -> ReLU -> Dropout -> Linear."""
    check_head(head)
    if head == "linear":
        return
    classifier = model.pretrained_cfg["classifier"]
    for path in (classifier,) if isinstance(classifier, str) else classifier:
        old = model.get_submodule(path)
        if not isinstance(old, nn.Linear):
            raise PipelineError(f"head mlp needs a Linear classifier but {architecture(model)}."
                                f"{path} is a {type(old).__name__}; use --head linear")
        _set_submodule(model, path, build_head("mlp", old.in_features, num_classes, hidden=hidden,
                                               drop_rate=drop_rate))


# ---------------------------------------------------------------- training helpers


def model_data_config(model: nn.Module, pretrained: bool) -> dict:
    """input_size / mean / std / interpolation / crop_pct from ``model.pretrained_cfg``.

    These are the statistics the architecture's weights expect. ``pretrained``
    is part of the interface so callers state why they ask; the values are the
    same either way, since a model trained from scratch here used them too.
    """
    cfg = unwrap(model).pretrained_cfg
    return {
        "input_size": tuple(cfg["input_size"]),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": cfg.get("crop_pct", 0.875),
    }
