"""Dataset validation behind ``zk0 data check URI…``.

A federated run can spend hours on a dataset fault that shows up only as a NaN loss, a policy
that learned from a dead camera, or an evaluation score inflated because evaluation episodes
were also trained on. This module finds those faults in seconds, before training: it reads the
parquet frames directly and decodes only the first, middle and last frame of each episode per
camera. An episode is identified by a hash of its content, not its index, so a copy of it in
another dataset (a client set leaking into an evaluation set) is found even after re-indexing.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import decode_video_frames
from lerobot.utils.constants import DEFAULT_FEATURES

from zk0.data import ACTION, STATE, DatasetError, locate, open_metadata
from zk0.registry import SCHEMES, DatasetEntry

CAMERA_PREFIX = "observation.images."
BLACK_LEVEL = 2.0  # mean uint8 intensity under which a frame counts as black
GRID = 8  # frames are compared as GRID x GRID cell means, which lossy-codec noise hardly moves
FROZEN_LEVEL = 6.0  # largest cell-mean change (uint8) between sampled frames of a frozen stream
TOLERANCE_S = 1e-4  # LeRobot's default: a frame that training could not load is an issue here too
LISTED = 8  # episodes named in one issue line before the rest are only counted


@dataclass
class DatasetReport:
    """What one dataset is and what is wrong with it (``issues`` empty: clean)."""

    uri: str
    root: Path | None = None
    version: str | None = None
    features: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    fps: float = 0
    robot_type: str | None = None
    episodes: int = 0
    frames: int = 0
    issues: list[str] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)  # episode index -> SHA-256 of its state and action

    @property
    def ok(self) -> bool:
        return not self.issues


@dataclass
class _Frames:
    """A dataset's numeric columns, sorted by episode then frame, with each episode's slice."""

    columns: dict[str, np.ndarray]  # name -> (frames, values)
    episodes: np.ndarray  # episode indices present in the data, ascending
    starts: np.ndarray  # first row of each of them
    counts: np.ndarray  # their frame counts

    def rows(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i] + self.counts[i]))


def run_check(uris: list[str]) -> tuple[list[str], bool]:
    """Check ``uris`` alone and against each other: the report lines and whether all are clean."""
    reports = [check_dataset(uri) for uri in dict.fromkeys(uris)]  # a URI named twice is one dataset
    cross = cross_check(reports)
    return format_report(reports, cross), not cross and all(r.ok for r in reports)


def check_dataset(uri: str) -> DatasetReport:
    """Describe and check one dataset; a dataset that cannot be read becomes a one-line issue, not an error."""
    report = DatasetReport(uri)
    entry = DatasetEntry(uri)
    if entry.scheme not in SCHEMES:
        report.issues.append(f"dataset {uri!r}: scheme must be hf:, local: or embedded:")
        return report
    try:
        repo_id, root = locate(entry)
        if root is not None and not _version_ok(report, repo_id, root):
            return report  # LeRobot cannot open an older format at all
        meta = _open(entry)
        _describe(report, meta)
        report.issues += _schema_issues(meta)
        if meta.total_episodes:
            _check_content(report, meta)
        else:
            report.issues.append("the dataset has no episodes")
    except DatasetError as err:
        report.issues.append(str(err))
    except Exception as err:  # a corrupt file must read as a one-line reason, never as a traceback
        report.issues.append(f"dataset {uri!r} could not be read ({type(err).__name__}: {_first_line(err)})")
    return report


def _version_ok(report: DatasetReport, repo_id: str, root: Path) -> bool:
    """Whether the folder is LeRobot v3.x; otherwise an issue naming LeRobot's conversion script."""
    report.root = root
    report.version = str(json.loads((root / "meta" / "info.json").read_text()).get("codebase_version"))
    if report.version.startswith("v3."):
        return True
    report.issues.append(
        f"format {report.version} is not LeRobot v3.x; convert it in place with `python -m lerobot.scripts."
        f"convert_dataset_v21_to_v30 --repo-id={repo_id} --root={root} --push-to-hub=false`")
    return False


def _open(entry: DatasetEntry) -> LeRobotDatasetMetadata:
    """Metadata with the data and videos on disk: a hub dataset is downloaded where training would put it."""
    meta = open_metadata(entry)
    if entry.scheme != "hf":
        return meta
    try:
        return LeRobotDataset(meta.repo_id, root=meta.root, video_backend="pyav").meta
    except Exception as err:  # hub and filesystem errors alike
        raise DatasetError(f"dataset {entry.uri!r}: data or videos could not be downloaded "
                           f"({type(err).__name__}: {_first_line(err)})") from None


def _describe(report: DatasetReport, meta: LeRobotDatasetMetadata) -> None:
    report.root = meta.root
    report.version = meta.info.codebase_version
    report.features = {k: (v["dtype"], tuple(v["shape"])) for k, v in meta.features.items()}
    report.fps = meta.fps
    report.robot_type = meta.robot_type
    report.episodes = meta.total_episodes
    report.frames = meta.total_frames


def _schema_issues(meta: LeRobotDatasetMetadata) -> list[str]:
    """What an SO-100 policy needs from the features: 1-D float state and action, at least one camera."""
    issues = [] if meta.fps > 0 else [f"fps is {meta.fps}, must be positive"]
    for key in (STATE, ACTION):
        spec = meta.features.get(key)
        if spec is None:
            issues.append(f"missing feature {key!r}")
        elif not spec["dtype"].startswith("float") or len(spec["shape"]) != 1:
            issues.append(f"{key} is {spec['dtype']} {tuple(spec['shape'])}, must be a 1-D float vector")
    if not any(k.startswith(CAMERA_PREFIX) for k in meta.camera_keys):
        issues.append(f"no camera: no video or image feature named {CAMERA_PREFIX}*")
    return issues


def _check_content(report: DatasetReport, meta: LeRobotDatasetMetadata) -> None:
    episodes = _episode_table(meta)
    frames = _read_frames(meta, episodes)
    report.issues += _count_issues(meta, episodes, frames)
    report.issues += _non_finite_issues(frames)
    report.hashes = _episode_hashes(frames)
    for key in meta.video_keys:
        report.issues += _camera_issues(meta, episodes, frames, key)


def _episode_table(meta: LeRobotDatasetMetadata) -> dict[int, dict]:
    """meta/episodes without its per-episode statistics, by episode index."""
    columns = [c for c in meta.episodes.column_names if not c.startswith("stats/")]
    return {int(row["episode_index"]): row for row in meta.episodes.select_columns(columns).to_list()}


def _read_frames(meta: LeRobotDatasetMetadata, episodes: dict[int, dict]) -> _Frames:
    """Every numeric column of the data files the episodes point to (image bytes are not read)."""
    files = sorted({meta.data_path.format(chunk_index=e["data/chunk_index"], file_index=e["data/file_index"])
                    for e in episodes.values()})
    paths = [meta.root / f for f in files]
    names = [f.name for f in pq.read_schema(paths[0]) if _is_numeric(f.type)]
    table = pa.concat_tables([pq.read_table(p, columns=names) for p in paths])
    table = table.sort_by([("episode_index", "ascending"), ("frame_index", "ascending")])
    columns = {name: _matrix(table[name]) for name in names}
    ids, starts, counts = np.unique(columns["episode_index"][:, 0], return_index=True, return_counts=True)
    return _Frames(columns, ids, starts, counts)


def _is_numeric(kind: pa.DataType) -> bool:
    while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A column as (frames, values); nested lists are flattened per frame, nulls become NaN."""
    array = column.combine_chunks()
    rows = len(array)
    while not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(rows, -1)


def _count_issues(meta: LeRobotDatasetMetadata, episodes: dict[int, dict], frames: _Frames) -> list[str]:
    """Frames per episode must match meta/episodes, and frame_index must run 0..n-1 in each."""
    counted = dict(zip(frames.episodes.tolist(), frames.counts.tolist(), strict=True))
    issues = []
    if len(episodes) != meta.total_episodes:
        issues.append(f"meta/episodes lists {len(episodes)} episodes, info.json says {meta.total_episodes}")
    if sum(counted.values()) != meta.total_frames:
        issues.append(f"the data holds {sum(counted.values())} frames, info.json says {meta.total_frames}")
    wrong = [f"{ep} ({counted.get(ep, 0)} in data, {e['length']} in meta)" for ep, e in episodes.items()
             if not counted.get(ep, 0) == e["length"] == e["dataset_to_index"] - e["dataset_from_index"]]
    if wrong:
        issues.append(f"frame counts disagree with meta/episodes in {_episodes(wrong)}")
    orphans = sorted(set(counted) - set(episodes))
    if orphans:
        issues.append(f"{_episodes(orphans)} in the data but missing from meta/episodes")
    position = np.arange(len(frames.columns["frame_index"])) - np.repeat(frames.starts, frames.counts)
    gaps = np.unique(frames.columns["episode_index"][position != frames.columns["frame_index"][:, 0], 0])
    if gaps.size:
        issues.append(f"frame_index is not 0..n-1 (gaps or repeats) in {_episodes(gaps.tolist())}")
    return issues


def _non_finite_issues(frames: _Frames) -> list[str]:
    """NaN or inf in any float column, named with the episodes holding them: one poisons a whole training run."""
    issues = []
    for name, values in frames.columns.items():
        if not np.issubdtype(values.dtype, np.floating):
            continue
        per_episode = np.add.reduceat((~np.isfinite(values)).sum(axis=1), frames.starts)
        bad = np.flatnonzero(per_episode)
        if bad.size:
            where = [f"{frames.episodes[i]} ({per_episode[i]})" for i in bad]
            issues.append(f"non-finite values in {name}: {per_episode.sum()} in {_episodes(where)}")
    return issues


def _episode_hashes(frames: _Frames) -> dict[int, str]:
    """SHA-256 of each episode's state and action (float32, frame order): the same episode, wherever it lies."""
    if STATE not in frames.columns or ACTION not in frames.columns:
        return {}
    hashes = {}
    for i, ep in enumerate(frames.episodes.tolist()):
        digest = hashlib.sha256()
        for key in (STATE, ACTION):
            digest.update(np.ascontiguousarray(frames.columns[key][frames.rows(i)], dtype="<f4").tobytes())
        hashes[ep] = digest.hexdigest()
    return hashes


def _camera_issues(meta: LeRobotDatasetMetadata, episodes: dict[int, dict], frames: _Frames, key: str) -> list[str]:
    """Black or frozen streams, judged from each episode's first, middle and last frame."""
    found: dict[str, list[int]] = defaultdict(list)
    errors = []
    for i, ep in enumerate(frames.episodes.tolist()):
        if ep not in episodes:
            continue  # already reported as missing from meta/episodes
        try:
            found[_stream_state(meta, episodes[ep], frames, i, key)].append(ep)
        except Exception as err:  # a broken file or timestamps out of tolerance: training would fail on it
            found["undecodable"].append(ep)
            errors.append(f"{type(err).__name__}: {_first_line(err)}")
    found.pop("ok", None)
    return [f"camera {key} is {state} in {_episodes(eps)}"
            + (f" (first error: {errors[0]})" if state == "undecodable" else "") for state, eps in found.items()]


def _stream_state(meta: LeRobotDatasetMetadata, episode: dict, frames: _Frames, i: int, key: str) -> str:
    """``black``, ``frozen`` or ``ok`` for one episode of one camera."""
    rows = frames.rows(i)
    stamps = frames.columns["timestamp"][rows, 0]
    picks = sorted({0, len(stamps) // 2, len(stamps) - 1})
    path = meta.root / meta.video_path.format(video_key=key, chunk_index=episode[f"videos/{key}/chunk_index"],
                                              file_index=episode[f"videos/{key}/file_index"])
    start = episode[f"videos/{key}/from_timestamp"]
    images = [decode_video_frames(path, [start + float(stamps[p])], TOLERANCE_S, backend="pyav",
                                  return_uint8=True)[0].numpy() for p in picks]
    if all(image.mean() < BLACK_LEVEL for image in images):
        return "black"
    cells = np.stack([_cell_means(image) for image in images])
    if len(cells) > 1 and np.abs(np.diff(cells, axis=0)).max() <= FROZEN_LEVEL:
        return "frozen (first, middle and last frames alike)"
    return "ok"


def _cell_means(image: np.ndarray) -> np.ndarray:
    """Channel means over a GRID x GRID grid of a (C, H, W) frame.

    An unchanged scene does not decode to identical pixels (h264 rate control re-quantises each
    keyframe differently, by up to tens of levels at an edge), but its cell means stay within a few.
    """
    channels, height, width = image.shape
    grid = min(GRID, height, width)
    image = image[:, :height - height % grid, :width - width % grid].astype(np.float32)
    return image.reshape(channels, grid, height // grid, grid, width // grid).mean(axis=(2, 4))


def cross_check(reports: list[DatasetReport]) -> list[str]:
    """Episodes with the same content in two datasets (or twice in one): the client/evaluation leak check."""
    places: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for report in reports:
        for ep, digest in report.hashes.items():
            places[digest].append((report.uri, ep))
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (first_uri, first_ep), *copies in places.values():
        for uri, ep in copies:
            pairs[(first_uri, uri)].append(f"{first_ep}={ep}")
    return [f"{a} holds the same content twice in {_episodes(eps)} (episode=episode)" if a == b else
            f"{a} and {b} share {_episodes(eps)} (episode in the first=episode in the second)"
            for (a, b), eps in pairs.items()]


def format_report(reports: list[DatasetReport], cross_issues: list[str]) -> list[str]:
    """Per dataset a summary then CLEAN or its issues; then the duplicates; then one overall line."""
    lines = []
    for report in reports:
        lines.append(report.uri)
        if report.features:
            lines.append(f"  {report.version}, {report.fps} fps, {report.episodes} episodes, {report.frames} frames, "
                         f"robot {report.robot_type or 'unknown'}")
            lines.append("  " + ", ".join(f"{k} {dtype}[{'x'.join(map(str, shape))}]"
                                          for k, (dtype, shape) in report.features.items()
                                          if k not in DEFAULT_FEATURES))
        lines += [f"  ISSUE: {issue}" for issue in report.issues] or ["  CLEAN"]
    lines += [f"DUPLICATE: {issue}" for issue in cross_issues]
    bad = sum(not r.ok for r in reports)
    if bad or cross_issues:
        lines.append(f"ISSUES: {bad} of {len(reports)} datasets with issues, "
                     f"{len(cross_issues)} duplicate-episode findings")
    else:
        lines.append(f"CLEAN: {len(reports)} datasets")
    return lines


def _episodes(items: list) -> str:
    """``episode 3`` or ``episodes 1, 4, ...``: at most LISTED named, so an issue stays one readable line."""
    shown = ", ".join(str(item) for item in items[:LISTED])
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"episode{'s' if len(items) > 1 else ''} {shown}{more}"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
