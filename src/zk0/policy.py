"""Build the SmolVLA policy and split it into what trains and what stays frozen.

``model-name = "tiny"`` builds a randomly initialised SmolVLA on the embedded tiny VLM and
``"smolvla-size"`` one with smolvla_base's architecture (SmolVLM2-500M backbone, 16 VLM
layers, 512-pixel images), both offline and deterministic from the run seed; any other
value is a pretrained SmolVLA, by hub id or local folder. Only the trainable tensors travel
between server and clients; the frozen base is rebuilt on each side and checked through its
fingerprint.
"""

from __future__ import annotations

import hashlib

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0 import so101, tiny
from zk0.checkpoint import load_config
from zk0.config import RunConfig
from zk0.logs import prints_to_debug
from zk0.model_source import ModelUnavailable, require_model

TINY = "tiny"
SMOLVLA_SIZE = "smolvla-size"
# Locally built models and how many VLM layers SmolVLA keeps (smolvla_base keeps 16).
LOCAL_MODELS = {TINY: 4, SMOLVLA_SIZE: 16}
POLICY_FPS = 30  # SO-100/SO-101 recordings and smolvla_base use 30 fps


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return torch.device(name)


def local_config(name: str, chunk_size: int, device: str) -> SmolVLAConfig:
    """SmolVLA config on the local VLM ``name``, with the embedded datasets' SO-101 features.

    Camera frames are resized (with padding) to the VLM's own image size, as SmolVLA does.
    """
    image_size = tiny.VLMS[name].image_size
    spec = so101.features(tiny.IMAGE_SIZE)
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, spec["observation.state"]["shape"])}
    for cam in so101.CAMERAS:
        inputs[f"observation.images.{cam}"] = PolicyFeature(FeatureType.VISUAL, (3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE))
    return SmolVLAConfig(
        vlm_model_name=str(tiny.ensure_vlm(name)), load_vlm_weights=False, num_vlm_layers=LOCAL_MODELS[name],
        resize_imgs_with_padding=(image_size, image_size), chunk_size=chunk_size,
        n_action_steps=chunk_size, input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, spec["action"]["shape"])},
        device=device)


def tiny_config(chunk_size: int, device: str) -> SmolVLAConfig:
    """The tiny policy's config (tests build datasets and processors against it without a policy)."""
    return local_config(TINY, chunk_size, device)


def build_policy(cfg: RunConfig, device_name: str | None = None) -> SmolVLAPolicy:
    """The policy named by ``cfg.model.model_name`` on ``device_name`` (default: the clients' ``cfg.train.device``)."""
    device = resolve_device(device_name or cfg.train.device)
    if cfg.model.model_name in LOCAL_MODELS:
        torch.manual_seed(cfg.seed)  # the frozen base must be identical on every node
        with prints_to_debug("lerobot"):
            policy = SmolVLAPolicy(local_config(cfg.model.model_name, cfg.model.chunk_size, device.type))
    else:
        policy = _load_pretrained(cfg.model.model_name, device)
        policy.config.chunk_size = policy.config.n_action_steps = cfg.model.chunk_size
    return policy.to(device)


def policy_config(cfg: RunConfig) -> SmolVLAConfig:
    """The policy's config without its weights: enough to check datasets against it in seconds."""
    if cfg.model.model_name in LOCAL_MODELS:
        return local_config(cfg.model.model_name, cfg.model.chunk_size, "cpu")
    require_model(cfg.model.model_name)
    try:
        config = load_config(cfg.model.model_name)
    except Exception as err:  # draccus, json, hub and filesystem errors all mean the same here
        raise ModelUnavailable(f"model {cfg.model.model_name!r}: its config.json could not be read "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(config, SmolVLAConfig):
        raise ModelUnavailable(f"model {cfg.model.model_name!r} is a {config.type!r} policy, not a SmolVLA")
    config.chunk_size = config.n_action_steps = cfg.model.chunk_size
    return config


def _load_pretrained(name: str, device: torch.device) -> SmolVLAPolicy:
    """Load a pretrained SmolVLA, failing within seconds with one line when it is unreachable.

    A zk0 checkpoint folder carries its local VLM; its config points there (see ``load_config``).
    """
    require_model(name)
    try:
        config = load_config(name)
        config.device = device.type
        with prints_to_debug("lerobot"):
            return SmolVLAPolicy.from_pretrained(name, config=config)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"model {name!r} could not be loaded as a SmolVLA policy: "
                               f"{str(err).splitlines()[0]}") from None


def trainable_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``), by name."""
    return {n: p for n, p in policy.named_parameters() if p.requires_grad}


def trainable_shapes(policy: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes every payload must match."""
    return {n: tuple(p.shape) for n, p in trainable_state(policy).items()}


@torch.no_grad()
def load_trainable(policy: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the trainable parameters (names must match exactly)."""
    params = trainable_state(policy)
    if set(params) != set(tensors):
        raise ValueError(f"trainable tensors differ: {sorted(set(params) ^ set(tensors))[:3]}")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))


@torch.no_grad()
def base_fingerprint(policy: torch.nn.Module) -> str:
    """SHA-256 of the frozen base (frozen parameters and buffers): equal bases, equal fingerprints."""
    trainable = set(trainable_state(policy))
    h = hashlib.sha256()
    tensors = [(n, t) for n, t in policy.state_dict().items() if n not in trainable]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
