"""Video frames for LeRobotDataset samples without reopening an MP4 per sample and camera.

LeRobot's pyav path (``decode_video_frames_pyav``) opens the file, seeks and decodes for every
sample and camera, in a fresh thread pool: on the embedded datasets that is most of a sample's
time. Here every process (a client, each of its DataLoader workers, the server) keeps one
:class:`FrameStore` of

* decoded episodes (uint8, one per camera) of the datasets whose frames fit what is left of
  :data:`FRAME_CACHE_BYTES` when they are opened (each dataset reserves its share): each episode's
  video is decoded once per process, later samples are lookups. A dataset that does not fit never
  uses it: with shuffled samples a partial cache would decode whole episodes for a few frames each,
  and so would datasets that fit one by one but not together (a pooled centralized baseline);
* open videos (at most :data:`MAX_OPEN_VIDEOS`), seeking within them per sample as LeRobot does.

The frames are LeRobot's, bit for bit: the same seek, the same rgb24 conversion, the same
nearest frame within ``tolerance_s`` (episodes are decoded from the keyframe LeRobot would seek
to, and a timestamp outside a decoded episode goes the seek path). Nothing opened crosses a fork:
a forked child (a DataLoader worker) starts with no open video and keeps the decoded frames.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import av
import torch
from lerobot.datasets.dataset_reader import DatasetReader
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import FrameTimestampError

FRAME_CACHE_BYTES = 2 * 2**30  # decoded frames kept per process, over all its datasets (100 embedded episodes: 0.2-0.4 GiB)
MAX_OPEN_VIDEOS = 16  # open containers per process (LeRobot v3 puts many episodes in one file per camera)


class VideoError(RuntimeError):
    """A video FFmpeg cannot read; the message names the file, camera and episode, and the fix."""


@dataclass(frozen=True)
class Clip:
    """One camera's video of one episode: its file and the episode's time span in that file."""

    path: Path
    start: float
    end: float
    name: str = field(default="", compare=False)  # "camera 'x' of episode n", for messages

    def fault(self, what: str) -> str:
        """One line naming the file and what went wrong in it (FFmpeg's words on one line), with the fix."""
        return f"video {self.path} ({self.name}) {' '.join(what.split())}; re-encode it or drop that episode"


@dataclass
class Decoded:
    """Consecutive decoded frames (C, H, W uint8) and their timestamps in seconds, as LeRobot decodes them.

    A kept episode's frames are one (N, C, H, W) tensor; a seek's, a list.
    """

    frames: Sequence[torch.Tensor]
    stamps: list[float]

    def covers(self, timestamps: list[float]) -> bool:
        """Whether both neighbours of every timestamp are here, so the nearest frame is LeRobot's."""
        return bool(self.stamps) and self.stamps[0] <= min(timestamps) and max(timestamps) <= self.stamps[-1]

    @cached_property
    def stamps_tensor(self) -> torch.Tensor:
        """The timestamps as LeRobot compares them (float32), made once per kept episode."""
        return torch.tensor(self.stamps)

    def nearest(self, timestamps: list[float], tolerance_s: float, clip: Clip) -> torch.Tensor:
        """The frame nearest each timestamp, computed as LeRobot does (float32 distances, first on ties)."""
        if not self.stamps:
            raise FrameTimestampError(clip.fault(f"has no frame at {_seconds(timestamps)} s: it ends early or is "
                                                 "damaged"))
        query = torch.tensor(timestamps)
        gaps, index = torch.cdist(query[:, None], self.stamps_tensor[:, None], p=1).min(1)
        late = ~(gaps < tolerance_s)
        if late.any():
            raise FrameTimestampError(clip.fault(
                f"has no frame within tolerance_s={tolerance_s} of {_seconds(query[late].tolist())} s (nearest "
                f"{_seconds(gaps[late].tolist())} s away): it is shorter than its episode or out of sync"))
        return torch.stack([self.frames[i] for i in index.tolist()])

    def read(self, frames: Iterator[tuple[float, torch.Tensor]]) -> Decoded:
        """Append what :func:`decode` yields; on an FFmpeg error, what came before it stays here."""
        for stamp, frame in frames:
            self.stamps.append(stamp)
            self.frames.append(frame)
        return self


def _seconds(values: list[float]) -> list[float]:
    """Timestamps short enough to read in a message."""
    return [round(value, 4) for value in values]


def decode(container: av.container.InputContainer, first: float, last: float) -> Iterator[tuple[float, torch.Tensor]]:
    """LeRobot's pyav decode: seek to the keyframe before ``first``, decode until a frame at or after ``last``."""
    stream = container.streams.video[0]
    container.seek(round(first / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        stamp = float(frame.pts * stream.time_base)
        yield stamp, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
        if stamp >= last:
            return


class FrameStore:
    """One process's open videos and decoded episodes, both least-recently-used first out."""

    def __init__(self, budget: int = FRAME_CACHE_BYTES, max_open: int = MAX_OPEN_VIDEOS,
                 episodes: OrderedDict[Clip, Decoded] | None = None):
        self.budget, self.max_open = budget, max_open
        self.reserved = 0  # bytes promised to the datasets that keep their episodes
        self.episodes: OrderedDict[Clip, Decoded] = episodes if episodes is not None else OrderedDict()
        self.nbytes = sum(decoded.frames.nbytes for decoded in self.episodes.values())  # frames: one tensor each
        self.videos: OrderedDict[Path, av.container.InputContainer] = OrderedDict()
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Whether a dataset of ``nbytes`` decoded frames may keep its episodes (then they are promised to it
        until :meth:`release`)."""
        with self.lock:
            if self.reserved + nbytes > self.budget:
                return False
            self.reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """A dataset that kept its episodes is gone: its share goes back (its episodes leave as others come)."""
        with self.lock:
            self.reserved = max(0, self.reserved - nbytes)

    def frames(self, clip: Clip, timestamps: list[float], tolerance_s: float, keep: bool) -> torch.Tensor:
        """uint8 frames (N, C, H, W) of ``clip``'s video nearest ``timestamps``; ``keep`` the decoded episode."""
        with self.lock:
            try:
                episode = self._episode(clip) if keep else None
                if episode is not None and episode.covers(timestamps):
                    return episode.nearest(timestamps, tolerance_s, clip)
                seek = Decoded([], []).read(decode(self._video(clip.path), min(timestamps), max(timestamps)))
                return seek.nearest(timestamps, tolerance_s, clip)
            except av.FFmpegError as err:
                self._close(clip.path)
                raise VideoError(clip.fault(f"does not decode ({type(err).__name__}: {err})")) from None

    def _episode(self, clip: Clip) -> Decoded:
        """The episode's frames, decoded now if this process has not kept them.

        A video that breaks within the episode keeps the frames before the fault (LeRobot decodes
        those too); later timestamps go the seek path, which reports the fault.
        """
        if clip in self.episodes:
            self.episodes.move_to_end(clip)
            return self.episodes[clip]
        decoded = Decoded([], [])
        try:
            decoded.read(decode(self._video(clip.path), clip.start, clip.end))
        except av.FFmpegError:
            self._close(clip.path)
        frames = torch.stack(decoded.frames) if decoded.frames else torch.empty(0, dtype=torch.uint8)
        self.episodes[clip] = Decoded(frames, decoded.stamps)
        self.nbytes += frames.nbytes
        while self.nbytes > self.budget and len(self.episodes) > 1:
            self.nbytes -= self.episodes.popitem(last=False)[1].frames.nbytes
        return self.episodes[clip]

    def _video(self, path: Path) -> av.container.InputContainer:
        """The open container of ``path``, opened now if this process has not (or has closed it)."""
        if path in self.videos:
            self.videos.move_to_end(path)
            return self.videos[path]
        self.videos[path] = av.open(str(path))
        while len(self.videos) > self.max_open:
            self.videos.popitem(last=False)[1].close()
        return self.videos[path]

    def _close(self, path: Path) -> None:
        """Forget a video that failed: the next sample reopens it rather than reuse a broken decoder."""
        container = self.videos.pop(path, None)
        if container is not None:
            container.close()


_store = FrameStore()
_inherited: list[OrderedDict] = []  # open videos of a parent process, never closed here


def _after_fork() -> None:
    """A forked child gets its own store: the parent's decoded frames (plain memory, copy-on-write), no open video.

    Freeing an open container in the child hangs it: FFmpeg waits for its decoder threads, which
    did not cross the fork. So the parent's open containers stay referenced here, never freed,
    and the parent collects its garbage before forking: a container dropped unclosed (a store
    replaced) waits in a reference cycle until the collector frees it.
    """
    global _store
    _inherited.append(_store.videos)
    parent, _store = _store, FrameStore(_store.budget, _store.max_open, _store.episodes)
    _store.reserved = parent.reserved


os.register_at_fork(before=gc.collect, after_in_child=_after_fork)


def store() -> FrameStore:
    """This process's frame store."""
    return _store


def _release(nbytes: int) -> None:
    """Give a collected dataset's share back to the store of the process it is collected in."""
    store().release(nbytes)


class FrameReader(DatasetReader):
    """LeRobot's dataset reader with its video frames from this process's :class:`FrameStore`.

    :func:`serve_frames` sets ``keep_episodes`` and ``clips`` (each episode's :class:`Clip` per
    camera, looked up in the episode table once rather than per sample).
    """

    keep_episodes: bool
    clips: dict[int, dict[str, Clip]]

    def _query_videos(self, query_timestamps: dict[str, list[float]], ep_idx: int) -> dict[str, torch.Tensor]:
        """Each camera's frames at the episode-relative timestamps, as LeRobot's reader returns them."""
        clips = self.clips.get(ep_idx) or self.clips.setdefault(ep_idx, self._episode_clips(ep_idx))
        frames = {}
        for key, stamps in query_timestamps.items():
            clip = clips[key]
            pixels = store().frames(clip, [clip.start + t for t in stamps], self._tolerance_s, self.keep_episodes)
            frames[key] = (pixels if self._return_uint8 else pixels.type(torch.float32) / 255).squeeze(0)
        return frames

    def _episode_clips(self, ep_idx: int) -> dict[str, Clip]:
        """Where each camera's video of episode ``ep_idx`` is, as LeRobot's reader finds it per sample."""
        episode = self._meta.episodes[ep_idx]
        return {key: Clip(self.root / self._meta.get_video_file_path(ep_idx, key),
                          episode[f"videos/{key}/from_timestamp"], episode[f"videos/{key}/to_timestamp"],
                          f"camera {key!r} of episode {ep_idx}")
                for key in self._meta.video_keys}


def decoded_bytes(dataset: LeRobotDataset) -> int:
    """Bytes of every video frame of ``dataset``'s episodes decoded (uint8, all cameras)."""
    features = dataset.meta.features
    return len(dataset) * sum(math.prod(features[key]["shape"]) for key in dataset.meta.video_keys)


def serve_frames(dataset: LeRobotDataset) -> LeRobotDataset:
    """``dataset`` reading its RGB videos through this process's frame store (depth maps stay LeRobot's).

    LeRobotDataset builds its reader itself and has no decoder seam, so the reader becomes a
    :class:`FrameReader`, which changes the video query only.
    """
    if dataset.meta.video_keys and not dataset.meta.depth_keys:
        dataset.reader.__class__ = FrameReader
        nbytes = decoded_bytes(dataset)
        dataset.reader.keep_episodes = store().reserve(nbytes)
        if dataset.reader.keep_episodes:  # a long-lived process (a resident node, a test worker) opens many in turn
            weakref.finalize(dataset, _release, nbytes)
        dataset.reader.clips = {}
    return dataset
