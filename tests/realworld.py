"""Inputs shaped like the real world: a smolvla_base-format policy and owners' own datasets.

``lerobot/smolvla_base`` declares three generic cameras (``observation.image``, ``…image2``,
``…image3``, 3x256x256), a 6-dim state and a 6-dim action, with SmolVLA's normalisation
mapping. The hub is out of reach here, so tests use a folder written the way LeRobot writes a
pretrained policy (``save_pretrained`` and its processors), on the tiny VLM, in place of the
hub id; and LeRobotDatasets whose cameras are named and counted as robot owners name them.
"""

from __future__ import annotations

from pathlib import Path

from lerobot.configs.types import FeatureType, PolicyFeature

SMOLVLA_BASE_CAMERAS = ("observation.image", "observation.image2", "observation.image3")


def smolvla_base_config(chunk_size: int = 10):
    """smolvla_base's input/output features and normalisation mapping, on zk0's tiny VLM."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    from zk0 import tiny
    from zk0.policy import LOCAL_MODELS

    size = tiny.VLMS["tiny"].image_size
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (6,))}
    inputs |= {cam: PolicyFeature(FeatureType.VISUAL, (3, 256, 256)) for cam in SMOLVLA_BASE_CAMERAS}
    return SmolVLAConfig(vlm_model_name=str(tiny.ensure_vlm("tiny")), load_vlm_weights=False,
                         num_vlm_layers=LOCAL_MODELS["tiny"], resize_imgs_with_padding=(size, size),
                         chunk_size=chunk_size, n_action_steps=chunk_size, input_features=inputs,
                         output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))}, device="cpu")


def write_smolvla_base_format(folder: Path, seed: int = 7) -> Path:
    """Save a randomly initialised smolvla_base-format policy and its processors into ``folder``."""
    import torch
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(smolvla_base_config())
    policy.save_pretrained(folder)
    for processor in make_pre_post_processors(policy.config):
        processor.save_pretrained(folder)
    return folder


# Robot owners' datasets: (task, cameras, mapping onto smolvla_base's cameras); the last is unseen.
LAB = {
    "arm-top-wrist": ("red-left", ("top", "wrist"),
                      {"observation.images.top": "observation.image", "observation.images.wrist": "observation.image2"}),
    "arm-three-cams": ("green-right", ("front", "wrist", "side"),
                       {"observation.images.front": "observation.image", "observation.images.side": "observation.image3"}),
    "arm-gripper-only": ("purple-place-center", ("gripper",), {"observation.images.gripper": "observation.image2"}),
}


def write_lab(folder: Path) -> Path:
    """The :data:`LAB` datasets under ``folder`` and a registry file ``lab.toml`` naming them (profile ``lab``)."""
    import synthetic

    entries = []
    for name, (task, cameras, mapping) in LAB.items():
        root = folder / name
        if not root.exists():
            synthetic.generate(synthetic.TASKS[task], root, episodes=4, frames=16, image_size=48, seed=len(entries),
                               cameras=cameras)
        cams = ", ".join(f'"{k}" = "{v}"' for k, v in mapping.items())
        entries.append(f'{{ uri = "local:{root}", cameras = {{ {cams} }} }}')
    (folder / "lab.toml").write_text(f"[lab]\nclients = [{entries[0]}, {entries[1]}]\nserver-eval = [{entries[2]}]\n")
    return folder / "lab.toml"
