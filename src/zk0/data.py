"""Open LeRobotDatasets, check them against the policy, split them by episode, load batches.

Held-out episodes are whole episodes chosen by a seeded permutation, so no frame of a
training episode is ever evaluated on. Normalisation statistics are computed from the
training episodes only (never the held-out ones).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from lerobot.datasets.compute_stats import DEFAULT_QUANTILES, aggregate_stats, get_feature_stats
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.utils import CompatibilityError
from lerobot.datasets.video_utils import decode_video_frames
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from zk0.frames import serve_frames
from zk0.logs import ffmpeg_quiet
from zk0.policy import POLICY_FPS
from zk0.registry import DatasetEntry

STATE, ACTION = "observation.state", "action"
STAT_NAMES = frozenset({"min", "max", "mean", "std", "count"})
QUANTILES = frozenset(f"q{int(q * 100):02d}" for q in DEFAULT_QUANTILES)  # what LeRobot adds to STAT_NAMES
STATS_WEIGHT_CAP = 4  # in pooling, no client's frames count more than this many times the median client's


class DatasetError(RuntimeError):
    """A dataset that cannot be opened or does not fit the policy; the message names it and the fix."""


@dataclass
class DatasetSplit:
    """A dataset opened for federated training: train and held-out episodes of one source."""

    entry: DatasetEntry
    meta: LeRobotDatasetMetadata
    train: LeRobotDataset
    held_out: LeRobotDataset

    @property
    def train_episodes(self) -> list[int]:
        return list(self.train.episodes)

    @property
    def held_out_episodes(self) -> list[int]:
        return list(self.held_out.episodes)


Locator = Callable[[DatasetEntry], tuple[str, Path | None]]
SOURCES: dict[str, Locator] = {}  # URI scheme -> how to find its datasets
PROVIDERS = {"embedded": "zk0.sim.embedded"}  # schemes an edge module registers; imported on first use


def register_source(scheme: str) -> Callable[[Locator], Locator]:
    """Register ``locator`` as the source of ``scheme:`` URIs, as LeRobot registers config subclasses.

    Sources that need heavy dependencies (the simulator) live outside the core, so that opening
    a hub or local dataset never imports them; :data:`PROVIDERS` names their module.
    """
    def add(locator: Locator) -> Locator:
        SOURCES[scheme] = locator
        return locator
    return add


def locate(entry: DatasetEntry) -> tuple[str, Path | None]:
    """Repo id and local root of an entry; embedded datasets are recorded in the simulator on first use."""
    if entry.scheme not in SOURCES and entry.scheme in PROVIDERS:
        importlib.import_module(PROVIDERS[entry.scheme])
    return SOURCES.get(entry.scheme, SOURCES["hf"])(entry)  # an unknown scheme fails to open as a hub id


@register_source("hf")
def _hub(entry: DatasetEntry) -> tuple[str, Path | None]:
    """A Hugging Face hub dataset: LeRobot downloads it into its own cache."""
    return entry.target, None


@register_source("local")
def _local(entry: DatasetEntry) -> tuple[str, Path | None]:
    """A LeRobotDataset folder on disk."""
    root = Path(entry.target).expanduser()
    if not (root / "meta" / "info.json").is_file():
        raise DatasetError(f"dataset {entry.uri!r}: {root} is not a LeRobotDataset folder (no meta/info.json)")
    return f"local/{root.name}", root


def open_metadata(entry: DatasetEntry) -> LeRobotDatasetMetadata:
    """Dataset metadata, failing with one line when a hub dataset is unreachable."""
    repo_id, root = locate(entry)
    try:
        return LeRobotDatasetMetadata(repo_id, root=root)
    except CompatibilityError as err:  # an older (or newer) LeRobot format: converting fixes it, not the network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"dataset {entry.uri!r}: {first}") from None
    except Exception as err:  # hub, filesystem and format errors all surface here
        hint = ("the Hugging Face hub is unreachable or HF_HUB_OFFLINE is set; download it on a connected "
                "machine and register it as local:/path") if entry.scheme == "hf" else "check the folder"
        raise DatasetError(f"dataset {entry.uri!r} could not be opened ({type(err).__name__}): {hint}") from None


def camera_feeds(entry: DatasetEntry, meta: LeRobotDatasetMetadata,
                 policy_cfg: SmolVLAConfig) -> tuple[dict[str, str], list[str]]:
    """The renames that feed the policy's cameras from the dataset's, and what is wrong with them.

    SmolVLA runs with any non-empty subset of its cameras (it skips, or pads up to
    ``empty_cameras``, the others), so a dataset fits when at least one of its cameras feeds a
    policy camera: under the policy's own key, through the entry's mapping (every key of which
    must be a dataset camera), or through the profile's convention where it applies.
    """
    have, wanted = list(meta.camera_keys), list(policy_cfg.image_features)
    problems = [f"camera mapping names {src!r}, which is not a camera of the dataset (its cameras: {have})"
                for src in entry.cameras if src not in have]
    problems += [f"camera mapping sends {src!r} to {dst!r}, which is not a camera of the policy "
                 f"(policy cameras: {wanted})" for src, dst in entry.cameras.items() if dst not in wanted]
    renames = {src: dst for src, dst in entry.cameras.items() if src in have}
    for src, dst in entry.camera_defaults.items():  # a convention: first come, first served, never overriding
        if src in have and src not in renames and dst in wanted and dst not in renames.values():
            renames[src] = dst
    feeds: dict[str, list[str]] = {}
    for cam in have:
        feeds.setdefault(renames.get(cam, cam), []).append(cam)
    problems += [f"dataset cameras {sources} all feed policy camera {dst!r}; map them apart"
                 for dst, sources in feeds.items() if len(sources) > 1 and dst in wanted]
    if not any(dst in wanted for dst in feeds) and not problems:
        problems.append(f"no dataset camera feeds the policy: dataset cameras {have}, policy cameras {wanted}; map "
                        f"one (registry entry cameras = {{\"{have[0] if have else '<dataset key>'}\" = "
                        f"\"{wanted[0]}\"}}, or zk0 client start --camera DATASET_KEY=POLICY_KEY)")
    return renames, problems


def describe_cameras(renames: dict[str, str], meta: LeRobotDatasetMetadata, policy_cfg: SmolVLAConfig) -> str:
    """Which dataset camera feeds which policy camera, e.g. ``top -> observation.image, (none) -> …image3``."""
    fed = {renames.get(cam, cam): cam for cam in meta.camera_keys}
    return ", ".join(f"{fed.get(dst, '(none: SmolVLA skips it)')} -> {dst}" for dst in policy_cfg.image_features)


def schema_mismatches(meta: LeRobotDatasetMetadata, policy_cfg: SmolVLAConfig, entry: DatasetEntry) -> list[str]:
    """Every way the dataset differs from what the policy expects (empty when it fits)."""
    problems = []
    for key, expected in ((STATE, policy_cfg.robot_state_feature), (ACTION, policy_cfg.action_feature)):
        if key not in meta.features:
            problems.append(f"missing feature {key!r}")
        elif tuple(meta.features[key]["shape"]) != tuple(expected.shape):
            problems.append(f"{key} has shape {tuple(meta.features[key]['shape'])}, policy expects "
                            f"{tuple(expected.shape)}")
    problems += camera_feeds(entry, meta, policy_cfg)[1]
    if meta.fps != POLICY_FPS:
        problems.append(f"fps is {meta.fps}, policy expects {POLICY_FPS}")
    return problems


def check_schema(entry: DatasetEntry, meta: LeRobotDatasetMetadata, policy_cfg: SmolVLAConfig) -> DatasetEntry:
    """The entry with its resolved camera renames; :class:`DatasetError` naming every mismatch otherwise."""
    problems = schema_mismatches(meta, policy_cfg, entry)
    if problems:
        raise DatasetError(f"dataset {entry.uri!r} does not match the policy: " + "; ".join(problems))
    return replace(entry, cameras=camera_feeds(entry, meta, policy_cfg)[0], camera_defaults={})


def check_frames(entry: DatasetEntry, meta: LeRobotDatasetMetadata) -> None:
    """Decode the last frame of every video camera in every episode; one line naming the first that fails.

    A video that will not decode would otherwise pass every check and fail each round on the node.
    """
    for episode in range(meta.total_episodes):
        info = meta.episodes[episode]
        for cam in meta.video_keys:
            timestamp = info[f"videos/{cam}/from_timestamp"] + (info["length"] - 1) / meta.fps
            try:
                with ffmpeg_quiet():
                    decode_video_frames(meta.root / meta.get_video_file_path(episode, cam), [timestamp],
                                        tolerance_s=0.5 / meta.fps, backend="pyav")
            except Exception as err:  # PyAV, FFmpeg and LeRobot's timestamp checks raise many kinds
                raise DatasetError(f"dataset {entry.uri!r}: camera {cam!r} of episode {episode} does not decode "
                                   f"({type(err).__name__}); re-encode or drop that episode") from None


def preflight(entry: DatasetEntry, policy_cfg: SmolVLAConfig, training: bool) -> DatasetEntry:
    """Everything that can be checked before a run: opens, fits the policy, decodes, can be split.

    Takes seconds and fails with one line, so a node or a simulation never starts on data that
    would fail every round. Returns the entry with its resolved camera renames.
    """
    meta = open_metadata(entry)
    resolved = check_schema(entry, meta, policy_cfg)
    if training and meta.total_episodes < 2:
        raise DatasetError(f"dataset {entry.uri!r} has {meta.total_episodes} episode; a client needs at least 2 "
                           "(training and held-out episodes); record more")
    if entry.scheme == "hf":
        meta = LeRobotDataset(meta.repo_id, video_backend="pyav").meta  # the videos, not just the metadata
    check_frames(entry, meta)
    return resolved


def split_episodes(num_episodes: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split of episode indices (at least one episode on each side)."""
    if num_episodes < 2:
        raise DatasetError(f"a dataset needs at least 2 episodes to split train/held-out, it has {num_episodes}")
    order = np.random.default_rng(seed).permutation(num_episodes).tolist()
    n_held = min(num_episodes - 1, max(1, math.ceil(held_out_fraction * num_episodes)))
    return sorted(order[n_held:]), sorted(order[:n_held])


def open_split(entry: DatasetEntry, policy_cfg: SmolVLAConfig, held_out_fraction: float, seed: int) -> DatasetSplit:
    """Open ``entry``, check it against the policy and split it by episode (the split's entry has resolved renames)."""
    meta = open_metadata(entry)
    resolved = check_schema(entry, meta, policy_cfg)
    train_eps, held_eps = split_episodes(meta.total_episodes, held_out_fraction, seed)
    return DatasetSplit(resolved, meta, _load(meta, policy_cfg, train_eps), _load(meta, policy_cfg, held_eps))


def _load(meta: LeRobotDatasetMetadata, policy_cfg: SmolVLAConfig, episodes: list[int] | None = None) -> LeRobotDataset:
    """The dataset (or some of its episodes) with action chunks of the policy's length, its videos opened
    once per process (:mod:`zk0.frames`)."""
    delta = {ACTION: [i / meta.fps for i in range(policy_cfg.chunk_size)]}
    return serve_frames(LeRobotDataset(meta.repo_id, root=meta.root, episodes=episodes, delta_timestamps=delta,
                                       video_backend="pyav"))


def vector_stats(dataset: LeRobotDataset) -> dict[str, dict[str, np.ndarray]]:
    """Normalisation statistics of state and action over the frames of ``dataset``."""
    table = dataset.hf_dataset.with_format("numpy")
    return {key: get_feature_stats(np.stack(table[key]).astype(np.float64), axis=0, keepdims=False)
            for key in (STATE, ACTION)}


def encode_stats(stats: dict[str, dict[str, np.ndarray]]) -> str:
    """Normalisation stats as JSON: they travel in ConfigRecords."""
    return json.dumps({k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}, sort_keys=True)


def decode_stats(text: str) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_stats`, as tensors for LeRobot's normaliser."""
    return {k: {s: torch.tensor(v, dtype=torch.float32) for s, v in d.items()} for k, d in json.loads(text).items()}


def pool_stats(encoded: list[str]) -> str:
    """Federation-wide stats from each client's (count-weighted, as LeRobot aggregates datasets)."""
    stats = [{k: {s: np.asarray(v) for s, v in d.items()} for k, d in json.loads(t).items()} for t in encoded]
    return encode_stats(aggregate_stats(stats))


def feature_sizes(policy_cfg: SmolVLAConfig) -> dict[str, int]:
    """Vector lengths of state and action the policy expects: every client's stats must have them."""
    return {STATE: policy_cfg.input_features[STATE].shape[0], ACTION: policy_cfg.output_features[ACTION].shape[0]}


def parse_stats(text: str, frames: int, sizes: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """A client's reported stats, once plausible for ``frames`` frames; a ``ValueError`` names what is not.

    They come from an untrusted node and shape everyone's normalisation: NaN, a negative std or a
    vector of the wrong length would break every client, so each is refused before pooling.
    """
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(stats, dict) or set(stats) != set(sizes):
        raise ValueError(f"must have exactly the keys {sorted(sizes)}")
    return {key: _plausible(key, stats[key], frames, sizes[key]) for key in sorted(sizes)}


def _plausible(key: str, reported: object, frames: int, size: int) -> dict[str, np.ndarray]:
    """One feature's stats as arrays: finite vectors of ``size`` with min <= mean <= max and std >= 0.

    Quantiles are checked as finite vectors only: LeRobot estimates them from histograms, a hair
    outside [min, max] at times.
    """
    names = set(reported) if isinstance(reported, dict) else set()
    if not STAT_NAMES <= names <= STAT_NAMES | QUANTILES:
        raise ValueError(f"{key} needs min/max/mean/std/count and at most LeRobot's quantiles")
    try:
        stats = {name: np.asarray(reported[name], dtype=np.float64) for name in sorted(names)}
    except (TypeError, ValueError):
        raise ValueError(f"{key} stats must be lists of numbers") from None
    if not all(np.isfinite(value).all() for value in stats.values()):
        raise ValueError(f"{key} stats must be finite")
    if any(stats[name].shape != (size,) for name in names - {"count"}):
        raise ValueError(f"{key} stats must be vectors of length {size}")
    count = stats["count"]
    if count.shape != (1,) or not count[0].is_integer() or not 1 <= count[0] <= frames:
        raise ValueError(f"{key} count must be one whole number in 1..{frames} (the frames claimed)")
    if (stats["std"] < 0).any():
        raise ValueError(f"{key} std must not be negative")
    if not ((stats["min"] <= stats["mean"]).all() and (stats["mean"] <= stats["max"]).all()):
        raise ValueError(f"{key} needs min <= mean <= max")
    return stats | {"count": count.astype(np.int64)}


def pool_reports(reports: list[dict[str, dict[str, np.ndarray]]]) -> str:
    """Federation-wide stats from plausible client reports (:func:`parse_stats`), each weight capped.

    LeRobot weights each report by its frame count, which a node states itself: any count up to
    the frames it claims passes. So a weight is ``min(count, STATS_WEIGHT_CAP x median count)``
    (the lower median: with two clients the smaller one), which keeps honest federations of similar
    datasets count-weighted, as LeRobot pools datasets, and bounds a lying or huge client to a few
    median clients' worth. Same reports in the same order, same bits.
    """
    capped = [{key: stats | {"count": np.minimum(stats["count"], _weight_cap(reports, key))}
               for key, stats in report.items()} for report in reports]
    return encode_stats(aggregate_stats(capped))


def _weight_cap(reports: list[dict[str, dict[str, np.ndarray]]], key: str) -> int:
    counts = sorted(int(report[key]["count"][0]) for report in reports)
    return STATS_WEIGHT_CAP * counts[(len(counts) - 1) // 2]


def outliers(reports: list[dict[str, dict[str, np.ndarray]]]) -> list[int]:
    """Indices of reports with a mean farther outside the others' [min, max] than that range is wide.

    Different tasks move the joints differently, so only a mean beyond every other client's data
    by a whole range is suspicious; it is for a warning, not a rejection.
    """
    def far_out(i: int, key: str) -> bool:
        others = [r[key] for j, r in enumerate(reports) if j != i]
        low, high = np.min([o["min"] for o in others], axis=0), np.max([o["max"] for o in others], axis=0)
        mean, span = reports[i][key]["mean"], high - low
        return bool(((mean < low - span) | (mean > high + span)).any())
    return [i for i, report in enumerate(reports) if len(reports) > 1 and any(far_out(i, key) for key in report)]


def open_full(entry: DatasetEntry, policy_cfg: SmolVLAConfig) -> tuple[DatasetEntry, LeRobotDataset]:
    """All episodes of an evaluation dataset (unseen task: nothing of it is trained on), with the resolved entry."""
    meta = open_metadata(entry)
    return check_schema(entry, meta, policy_cfg), _load(meta, policy_cfg)


def rename_cameras(batch: dict, cameras: dict[str, str]) -> dict:
    """Apply a registry entry's camera mapping to a batch."""
    return {cameras.get(k, k): v for k, v in batch.items()} if cameras else batch


def train_loader(dataset: LeRobotDataset, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A shuffling loader, kept resident by the client across rounds.

    The order comes from the sampler's own generator alone, which :func:`batches` reseeds. The
    DataLoader draws a worker seed from its generator on every new iterator but not when
    persistent workers restart: sharing one generator made the order depend on ``num_workers``
    and on whether the run had been resumed.
    """
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                                       generator=torch.Generator(), num_workers=num_workers,
                                       persistent_workers=num_workers > 0)


def batches(loader: torch.utils.data.DataLoader, seed: int, cameras: dict[str, str]) -> Iterator[dict]:
    """An endless stream of shuffled batches whose order depends on ``seed`` only.

    Clients reseed it every round (from seed, round and partition), so a resumed run sees
    the very batches an uninterrupted one would have seen, whatever ``num-workers``.
    """
    loader.sampler.generator.manual_seed(seed)
    while True:
        for batch in loader:
            yield rename_cameras(batch, cameras)


def eval_batches(dataset: LeRobotDataset, batch_size: int, limit: int, cameras: dict[str, str]) -> Iterator[dict]:
    """The first ``limit`` batches of a fixed, evenly spaced selection of frames (same every call)."""
    n = min(len(dataset), batch_size * limit)
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(0))  # leave global RNG alone
    for batch in loader:
        yield rename_cameras(batch, cameras)

