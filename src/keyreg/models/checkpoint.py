"""Loading and saving models: keyreg's own format and the official KeyMorph/BrainMorph checkpoints.

* keyreg format: ``NAME.safetensors`` (weights, no pickle) + ``NAME.json`` (:class:`ModelConfig`).
* official format (``.h5``, ``.pth.tar``, ``.pt``, ``.pth``): a torch pickle
  ``{"state_dict", "args": argparse.Namespace, "optimizer", "epoch"?, "ref_points"?}``.  It is read
  with ``torch.load(weights_only=True)`` and an allow-list of exactly one extra class,
  ``argparse.Namespace``, so no code can run while unpickling: a file that asks for anything
  else is refused.  Key prefixes ``module.``, ``keypoint_extractor.`` and ``backbone.`` are
  stripped; the architecture is inferred from the tensor shapes and cross-checked with ``args``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, atomic_write_text
from ..errors import CheckpointError, ConfigError
from ..preprocess import GridSpec, PreprocessConfig
from .detector import ArchitectureConfig, KeypointDetector, ModelConfig

__all__ = [
    "load_model",
    "save_model",
    "load_official_checkpoint",
    "infer_architecture",
    "normalize_state_dict",
    "official_preset",
    "PRETRAINED_DIR",
    "list_pretrained",
    "DEFAULT_MODEL",
]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
#: Name of the bundled model used when none is given.
DEFAULT_MODEL = "keyreg-default"
OFFICIAL_SUFFIXES = (".h5", ".pth.tar", ".pth", ".pt", ".tar")
_PREFIXES = ("module.", "keypoint_extractor.", "backbone.")


def list_pretrained() -> dict[str, ModelConfig]:
    """Bundled models by name (``keyreg/pretrained/*.json`` with their ``.safetensors``)."""
    out: dict[str, ModelConfig] = {}
    for js in sorted(PRETRAINED_DIR.glob("*.json")):
        if js.with_suffix(".safetensors").exists():
            try:
                out[js.stem] = ModelConfig.from_dict(json.loads(js.read_text()))
            except (ConfigError, json.JSONDecodeError):
                continue
    return out


def _resolve_default() -> str:
    models = list_pretrained()
    alias = PRETRAINED_DIR / "DEFAULT"
    if alias.exists():
        name = alias.read_text().strip()
        if name in models:
            return name
    if not models:
        raise CheckpointError("no bundled model is installed; pass a model file with --load_path")
    return next(iter(models))


# --------------------------------------------------------------------------------------------------
# official checkpoints


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.``, ``keypoint_extractor.``, ``backbone.`` prefixes (in any nesting)."""
    out = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = value
    return out


def infer_architecture(state: dict[str, torch.Tensor]) -> ArchitectureConfig:
    """Backbone, K, levels and truncation from the tensor shapes of a (normalised) state dict."""
    keys = set(state)
    if "block1.conv.weight" in keys:
        w1, w9 = state["block1.conv.weight"], state.get("block9.conv.weight")
        if w9 is None:
            raise CheckpointError("conv checkpoint has no block9 (is it the old fully-connected variant?)")
        return ArchitectureConfig("conv", int(w9.shape[0]), in_channels=int(w1.shape[1]), dim=w1.ndim - 2)
    enc = {int(m.group(1)) for k in keys if (m := re.match(r"encoders\.(\d+)\.", k))}
    dec = {int(m.group(1)) for k in keys if (m := re.match(r"decoders\.(\d+)\.", k))}
    if enc and "final_conv.weight" in keys:
        levels = max(enc) + 1
        truncated = levels - 1 - (max(dec) + 1 if dec else 0)
        first = state["encoders.0.basic_module.SingleConv2.conv.weight"]
        in_ch = int(state["encoders.0.basic_module.SingleConv1.conv.weight"].shape[1])
        final = state["final_conv.weight"]
        backbone = "truncatedunet" if truncated > 0 else "unet"
        return ArchitectureConfig(backbone, int(final.shape[0]), num_levels=levels, num_truncated=truncated,
                                  f_maps=int(first.shape[0]), in_channels=in_ch, dim=final.ndim - 2)
    raise CheckpointError("unrecognised checkpoint: no conv blocks or U-Net encoders in its state_dict")


def official_preset(arch: ArchitectureConfig) -> tuple[PreprocessConfig, str | None]:
    """Preprocessing and weighting the official models were trained with (see ../shared/README)."""
    if arch.backbone == "conv":  # IXI half-resolution: resize to 128^3, last two axes swapped
        return PreprocessConfig(GridSpec("fov", (128, 128, 128), permute=(0, 2, 1))), None
    # BrainMorph foundation models: RAS, 1 mm, 256^3
    return PreprocessConfig(GridSpec("ras", (256, 256, 256), (1.0, 1.0, 1.0))), "power"


def _short(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, flags=re.IGNORECASE)
    if m:  # name the refused global; torch's advice to allow-list it is not passed on
        return f"unsupported GLOBAL {m.group(1).rstrip('.')}"
    m = re.search(r"unsupported operand[^\n.]*", text, flags=re.IGNORECASE)
    if m:
        return m.group(0).strip()
    first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
    if re.fullmatch(r"[\d\s()-]*", first):  # zip reader error codes such as "(101)"
        return "neither a torch zip archive nor a pickle"
    return first


def load_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official checkpoint safely; return ``(state_dict, meta)`` (``args`` as a dict, + ``epoch``).

    Raises:
        CheckpointError: unreadable, not a torch checkpoint, or a pickle asking for anything
            beyond tensors, containers and ``argparse.Namespace``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (an HDF5 file; the KeyMorph/BrainMorph "
                                  f".h5 files are PyTorch pickles)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"{path}: refused, the checkpoint's pickle asks for code that is not "
                                  f"allowed ({_short(e)})") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_short(e)})") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_short(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        state, args = obj["state_dict"], obj.get("args")
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state, args = obj, None
    else:
        raise CheckpointError(f"{path}: checkpoint holds no state_dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of tensors")
    args_dict = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    meta = dict(args_dict)
    if isinstance(obj.get("epoch"), int):
        meta.setdefault("epoch", obj["epoch"])
    return normalize_state_dict(state), meta


def _check_args(arch: ArchitectureConfig, args: dict[str, Any], path: Path) -> None:
    checks = [("num_keypoints", arch.num_keypoints), ("backbone", arch.backbone)]
    if arch.backbone != "conv":
        checks += [("num_levels_for_unet", arch.num_levels)]
    if arch.backbone == "truncatedunet":
        checks += [("num_truncated_layers_for_truncatedunet", arch.num_truncated)]
    for key, inferred in checks:
        if key in args and args[key] is not None and args[key] != inferred:
            raise CheckpointError(f"{path}: args say {key}={args[key]!r} but the weights have {inferred!r}")


# --------------------------------------------------------------------------------------------------
# keyreg format


def _pair(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        jsons = sorted(path.glob("*.json"))
        if len(jsons) != 1:
            raise CheckpointError(f"{path}: expected exactly one model .json in the directory")
        path = jsons[0]
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_model(model: KeypointDetector, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``path.safetensors`` + ``path.json`` (atomically); returns both paths."""
    from safetensors.torch import save_file

    weights, config = _pair(Path(path))
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": ModelConfig.FORMAT})
    atomic_write_text(config, model.config.to_json() + "\n")
    return weights, config


def _load_keyreg(weights: Path, config_path: Path) -> KeypointDetector:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not config_path.is_file():
        raise CheckpointError(f"{weights}: its config {config_path.name} is missing")
    try:
        doc = json.loads(config_path.read_text())
        if not isinstance(doc, dict):
            raise ConfigError(f"expected a JSON object, got a {type(doc).__name__}")
        config = ModelConfig.from_dict(doc)
    except (OSError, UnicodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the model config ({e})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON syntax, field types (ConfigError too)
        raise CheckpointError(f"{config_path}: invalid model config ({str(e).splitlines()[0][:200]})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable weights ({e})") from None
    model = KeypointDetector(config)
    _load_state(model, state, weights)
    return model


def _load_state(model: KeypointDetector, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else
                  f"unexpected {unexpected[:2]}" if unexpected else f"shape mismatch in {wrong[:2]}")
        raise CheckpointError(f"{path}: weights do not fit {model.config.architecture.describe()} ({detail})")
    model.backbone.load_state_dict(state)


def load_model(
    source: str | os.PathLike | None = None,
    *,
    backbone: str | None = None,
    num_keypoints: int | None = None,
    preprocessing: PreprocessConfig | None = None,
    device: torch.device | str | None = None,
) -> KeypointDetector:
    """Load a keypoint model, in eval mode, on ``device``.

    Args:
        source: a bundled model name (``keyreg models`` lists them; ``None`` = the default), a
            keyreg model (``.safetensors`` / ``.json`` / directory), or an official checkpoint
            (``.h5``, ``.pth.tar``, ...).
        backbone, num_keypoints: if given, the loaded model must have them (else
            :class:`CheckpointError`); official checkpoints are otherwise inferred from shapes.
        preprocessing: override the model's preprocessing (e.g. for official checkpoints
            trained on differently prepared data).
    """
    if source is None:
        source = _resolve_default()
    path = Path(source)
    name = str(source)
    if not path.exists() and not any(name.endswith(s) for s in OFFICIAL_SUFFIXES + (".json", ".safetensors")):
        models = list_pretrained()
        if name == DEFAULT_MODEL:
            name = _resolve_default()
        if name not in models:
            avail = ", ".join(models) or "none installed"
            raise CheckpointError(f"unknown model {source!r} (bundled models: {avail}); or pass a file path")
        path = PRETRAINED_DIR / f"{name}.json"
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        weights, config = _pair(path)
        if not weights.is_file():
            raise CheckpointError(f"{weights}: model weights file does not exist")
        model = _load_keyreg(weights, config)
    else:
        state, args = load_official_checkpoint(path)
        try:
            arch = infer_architecture(state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        _check_args(arch, args, path)
        pre, weighting = official_preset(arch)
        config = ModelConfig(name=path.name, architecture=arch, preprocessing=pre, weighting=weighting,
                             description=f"official KeyMorph/BrainMorph checkpoint ({arch.describe()})",
                             training={"source": str(path), "epoch": args.get("epoch")})
        model = KeypointDetector(config)
        _load_state(model, state, path)
    a = model.config.architecture
    if backbone is not None and backbone != a.backbone:
        raise CheckpointError(f"{source}: model is a {a.backbone} backbone, not the requested {backbone}")
    if num_keypoints is not None and num_keypoints != a.num_keypoints:
        raise CheckpointError(f"{source}: model has {a.num_keypoints} keypoints, not the requested {num_keypoints}")
    if preprocessing is not None:
        model.config.preprocessing = preprocessing
    return model.to(device or "cpu").eval()

