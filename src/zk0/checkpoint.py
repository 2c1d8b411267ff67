"""The run folder and its checkpoints: LeRobot pretrained-policy folders with a model card.

``outputs/<run-id>/`` holds ``config.json``, ``metrics.jsonl``, ``charts/`` and
``checkpoints/round_<N>/``. A checkpoint folder loads with LeRobot alone (its
``README.md`` shows how, and the metrics of that very round: it is written after
evaluation). A locally built VLM backbone (model-name tiny, smolvla-size) has no hub id,
so its files travel in the checkpoint's ``vlm/`` folder and ``vlm_model_name`` names that
folder relative to the checkpoint: the folder loads on any machine, from any directory.
:func:`load_checkpoint` reads one back, policy and processors (``zk0 eval``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import PolicyProcessorPipeline, TokenizerProcessorStep

from zk0.config import RESUME_FREE_KEYS, RunConfig
from zk0.registry import DatasetEntry, Registry


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's outputs."""

    root: Path

    @classmethod
    def create(cls, output_dir: str, strategy: str, run_id: int) -> RunFolder:
        """A new, empty run folder ``<output_dir>/<timestamp>-<strategy>-<run id>``."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{strategy}-{run_id % 1_000_000:06d}"
        root = Path(output_dir).expanduser().resolve() / name
        root.mkdir(parents=True, exist_ok=False)
        return cls(root)

    @classmethod
    def existing(cls, path: str) -> RunFolder:
        """A run folder made by an earlier run (to resume it)."""
        root = Path(path).expanduser().resolve()
        if not (root / STATE_FILE).is_file():
            raise ResumeError(f"{root} has no {STATE_FILE}: not a zk0 run folder, or no round was completed; "
                              "start a new run instead")
        return cls(root)

    def add_flower_run(self, run_id: int) -> int:
        """Record which Flower runs wrote here (a resumed run has a new id): `zk0 status` maps them.

        Returns the attempt number: 1 for the run that created the folder, 2 for its first resume, …
        """
        path = self.root / "flower-runs.txt"
        with path.open("a") as f:
            f.write(f"{run_id}\n")
        return len(path.read_text().split())

    def checkpoint(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round_{server_round}"

    def write_config(self, cfg: RunConfig, registry: Registry, fingerprint: str) -> None:
        """``config.json``: the resolved run config, registry profile and software versions."""
        doc = {"run-config": cfg.to_run_config(), "datasets": _registry_doc(registry),
               "base-fingerprint": fingerprint, "versions": versions()}
        (self.root / "config.json").write_text(json.dumps(doc, indent=2) + "\n")


class ResumeError(RuntimeError):
    """A run cannot be resumed from the given folder (missing or mismatched server state)."""


STATE_FILE = "server_state.pt"
VLM_FOLDER = "vlm"  # a checkpoint's copy of its local VLM backbone (config, processor, tokenizer; no weights)


@dataclass
class ServerState:
    """Everything the server needs to continue after ``server_round`` as if it had never stopped."""

    server_round: int
    master: dict[str, torch.Tensor]
    norm_stats: str
    run_config: dict
    fingerprint: str
    python_rng: tuple
    torch_rng: torch.Tensor
    downlink: dict = field(default_factory=dict)  # an int8 run's model chain (zk0.chain.Chain.state)
    tuned: dict = field(default_factory=dict)  # server-optimizer moments and the tuning (mu, lr factor) state
    pending_end: list | None = None  # the round's records so far when its end (evaluations, checkpoint) is to come
    privacy: dict = field(default_factory=dict)  # dp runs: the accountant's ledger and the noise generator's state
    pending_measured: dict = field(default_factory=dict)  # that round's bytes and seconds so far (RoundState.measured)

    def save(self, run: RunFolder) -> None:
        """Write atomically: a crash while saving leaves the previous round's state intact."""
        tmp = run.root / f".{STATE_FILE}.tmp"
        torch.save(asdict(self), tmp)
        os.replace(tmp, run.root / STATE_FILE)

    @classmethod
    def load(cls, run: RunFolder, cfg: RunConfig, fingerprint: str) -> ServerState:
        """The saved state, refused when the run config or the frozen base changed since."""
        state = cls(**torch.load(run.root / STATE_FILE, weights_only=True))
        if changed := changed_keys(state.run_config, cfg):
            raise ResumeError(f"cannot resume {run.root.name}: run-config {', '.join(changed)} differ from the "
                              "saved run; resume with the run's own config (zk0 run/simulate --resume does)")
        if fingerprint != state.fingerprint:
            raise ResumeError(f"cannot resume {run.root.name}: the frozen base differs from the saved run's")
        return state


def changed_keys(saved: dict, cfg: RunConfig) -> list[str]:
    """The run-config keys whose value in ``cfg`` differs from a saved run's config, in a way that changes what
    the run computes: keys added since the run was saved count as their defaults, ``RESUME_FREE_KEYS`` not at
    all (its output folder, say)."""
    now, saved = cfg.to_run_config(), RunConfig().to_run_config() | saved
    return sorted(k for k in now if k not in RESUME_FREE_KEYS and now[k] != saved.get(k))


def versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    out = {"python": platform.python_version()}
    for pkg in ("zk0", "lerobot", "flwr", "torch", "transformers"):
        out[pkg] = version(pkg)
    return out


def _registry_doc(registry: Registry) -> dict:
    def entry(e: DatasetEntry) -> dict:
        return {"uri": e.uri, "cameras": e.cameras} | {k: v for k, v in (("episodes", e.episodes),
                                                                          ("shard", e.shard)) if v}
    return {"profile": registry.profile, "clients": [entry(e) for e in registry.clients],
            "server-eval": [entry(e) for e in registry.server_eval]}


def save_checkpoint(folder: Path, policy, stats: dict[str, dict[str, torch.Tensor]], card: str) -> Path:
    """Write policy, pre/post processors (with the federation's stats) and the model card."""
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    preprocessor, postprocessor = make_pre_post_processors(policy.config, dataset_stats=stats)
    if Path(policy.config.vlm_model_name).is_dir():
        _bundle_vlm(folder, policy.config, preprocessor)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    (folder / "README.md").write_text(card)
    return folder


def _bundle_vlm(folder: Path, config: PreTrainedConfig, preprocessor: PolicyProcessorPipeline) -> None:
    """Copy the local VLM into ``folder`` and name it relatively in the saved config and tokenizer step.

    An absolute path into this machine's cache would break the checkpoint anywhere else. The
    live config keeps its absolute name: the server goes on training with it.
    """
    shutil.copytree(config.vlm_model_name, folder / VLM_FOLDER, dirs_exist_ok=True)
    portable = copy.copy(config)
    portable.vlm_model_name = VLM_FOLDER
    portable.save_pretrained(folder)
    tokenizer = next(step for step in preprocessor.steps if isinstance(step, TokenizerProcessorStep))
    tokenizer.tokenizer_name = VLM_FOLDER


def load_config(path: str | Path) -> PreTrainedConfig:
    """The policy config of a checkpoint folder or hub id, pointed at the VLM the checkpoint carries, if any.

    Hub ids and absolute VLM folders stay as saved; ``vlm`` of a portable checkpoint becomes
    the absolute ``<path>/vlm``, which holds wherever the process runs from.
    """
    config = PreTrainedConfig.from_pretrained(path)
    if isinstance(config, SmolVLAConfig) and (bundled := Path(path).expanduser() / config.vlm_model_name).is_dir():
        config.vlm_model_name = str(bundled.resolve())
    return config


class CheckpointError(RuntimeError):
    """A folder is not a loadable LeRobot SmolVLA checkpoint (policy and processors)."""


def load_checkpoint(folder: Path, device: str = "cpu"
                    ) -> tuple[SmolVLAPolicy, PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """``(policy, preprocessor, postprocessor)`` of a LeRobot SmolVLA checkpoint folder, on ``device``.

    A VLM the checkpoint carries (see :func:`load_config`) serves the policy
    and the preprocessor's tokenizer alike. Raises :class:`CheckpointError` with one line
    naming the folder when anything is missing or the policy is not a SmolVLA (the CLI
    prints it instead of a traceback).
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a LeRobot checkpoint: no config.json there")
    try:
        config = load_config(folder)
    except Exception as err:  # draccus, json and lerobot raise many kinds
        raise _unloadable(folder, err) from None
    if not isinstance(config, SmolVLAConfig):
        raise CheckpointError(f"{folder} holds a policy of type {config.type!r}, not a SmolVLA")
    vlm = Path(config.vlm_model_name)
    if vlm.is_absolute() and not vlm.is_dir():
        raise CheckpointError(f"{folder} needs the VLM folder {vlm}, which is missing: a checkpoint saved before zk0 "
                              "bundled local VLMs in vlm/ needs it; set ZK0_CACHE as when it was saved")
    config.device = device
    try:
        policy = SmolVLAPolicy.from_pretrained(folder, config=config)
        preprocessor, postprocessor = make_pre_post_processors(
            config, pretrained_path=str(folder),
            preprocessor_overrides={"device_processor": {"device": device},
                                    "tokenizer_processor": {"tokenizer_name": config.vlm_model_name}})
    except Exception as err:  # transformers, safetensors and lerobot raise many kinds
        raise _unloadable(folder, err) from None
    return policy, preprocessor, postprocessor


def _unloadable(folder: Path, err: Exception) -> CheckpointError:
    """The first line of ``err`` (capped), so the CLI shows one readable line."""
    detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return CheckpointError(f"{folder} is not a loadable LeRobot SmolVLA checkpoint: {detail}")
