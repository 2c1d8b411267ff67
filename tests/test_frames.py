"""zk0.frames: LeRobot's own frames, each video opened once per process, episodes decoded once, safe across fork."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import av
import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import FrameTimestampError, decode_video_frames

import synthetic
from waits import deadline

from zk0 import data, frames, tiny
from zk0.frames import Clip, FrameStore, VideoError
from zk0.policy import tiny_config
from zk0.registry import DatasetEntry

EPISODES, FRAMES, FPS = 3, 12, 30
DELTA = {"action": [i / FPS for i in range(5)]}
SHAPES = {  # name -> cameras and codec: the test fixture's, 3 cameras named otherwise, LeRobot's default codec
    "h264-2cams": (synthetic.CAMERAS, "h264"),
    "h264-3cams": (("front", "wrist", "side"), "h264"),
    "av1-top-wrist": (("top", "wrist"), "libsvtav1"),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("frames")
    return {name: synthetic.generate(synthetic.TASKS["blue-center"], folder / name, EPISODES, FRAMES, tiny.IMAGE_SIZE,
                                     seed=2, cameras=cameras, vcodec=vcodec)
            for name, (cameras, vcodec) in SHAPES.items()}


@pytest.fixture
def store(monkeypatch) -> FrameStore:
    """A fresh store for this process, so a test sees only what it did."""
    fresh = FrameStore()
    monkeypatch.setattr(frames, "_store", fresh)
    return fresh


def lerobot(root: Path, episodes: list[int] | None = None) -> LeRobotDataset:
    """The dataset as LeRobot alone reads it (a fresh pyav decode per sample and camera)."""
    return LeRobotDataset(f"zk0/{root.name}", root=root, episodes=episodes, delta_timestamps=DELTA,
                          video_backend="pyav")


def assert_same_samples(ours: LeRobotDataset, theirs: LeRobotDataset, order: list[int]) -> None:
    for i in order:
        mine, reference = ours[i], theirs[i]
        for key in theirs.meta.video_keys:
            assert torch.equal(mine[key], reference[key]), (key, i)
            assert mine[key].dtype == reference[key].dtype == torch.float32


@pytest.mark.parametrize("keep", [True, False], ids=["episodes-kept", "seek-per-sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_frames_are_lerobots_bit_for_bit(roots, shape, keep, store):
    ours = frames.serve_frames(lerobot(roots[shape], episodes=[0, 2]))
    ours.reader.keep_episodes = keep
    order = list(range(len(ours)))
    random.Random(0).shuffle(order)  # as a shuffling loader asks: seeks back and forth in open videos
    assert_same_samples(ours, lerobot(roots[shape], episodes=[0, 2]), order)
    cameras = len(SHAPES[shape][0])
    assert list(store.videos) == [roots[shape] / ours.meta.get_video_file_path(0, key) for key in ours.meta.video_keys]
    assert len(store.episodes) == (2 * cameras if keep else 0)


def test_open_split_serves_frames_from_the_store(roots, store):
    """What the ClientApp trains on: open_split's datasets, through train_loader and batches."""
    split = data.open_split(DatasetEntry(uri=f"local:{roots['h264-2cams']}"), tiny_config(5, "cpu"), 0.34, 0)
    assert split.train.reader.keep_episodes and split.held_out.reader.keep_episodes  # embedded-sized: kept
    batch = next(data.batches(data.train_loader(split.train, 4), seed=0, cameras={}))
    reference = lerobot(roots["h264-2cams"], split.train_episodes)
    positions = {int(index): i for i, index in enumerate(reference.hf_dataset["index"])}
    for row, index in enumerate(batch["index"].tolist()):
        for key in synthetic.CAMERAS:
            camera = f"observation.images.{key}"
            assert torch.equal(batch[camera][row], reference[positions[index]][camera])
    assert len(store.episodes) == len({int(e) for e in batch["episode_index"]}) * len(synthetic.CAMERAS)


def test_each_video_is_opened_once(roots, store, monkeypatch):
    opened: list[str] = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    ours = frames.serve_frames(lerobot(roots["h264-3cams"]))
    ours.reader.keep_episodes = False
    for i in random.Random(1).sample(range(len(ours)), 20):
        ours[i]
    assert sorted(opened) == sorted(str(roots["h264-3cams"] / ours.meta.get_video_file_path(0, key))
                                    for key in ours.meta.video_keys)


@pytest.mark.parametrize("tolerance_frames", [0.003, 0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("keep", [True, False], ids=["episodes-kept", "seek-per-sample"])
def test_tolerance_as_lerobot_applies_it(roots, tolerance_frames, keep, store):
    """Between frames, halfway (ties), past the end, before the start: LeRobot's frame or LeRobot's refusal."""
    path = roots["h264-2cams"] / "videos" / "observation.images.front" / "chunk-000" / "file-000.mp4"
    duration = EPISODES * FRAMES / FPS
    clip = Clip(path, 0.0, duration, "camera 'front' of episode 0")
    tolerance = tolerance_frames / FPS
    queries = [[k / FPS + offset / FPS] for k in (0, 5, 17, 35) for offset in (0.0, 0.2, 0.5, -0.5, 0.7)]
    queries += [[duration + 0.4 / FPS], [duration + 3 / FPS], [-0.4 / FPS], [1 / FPS, 4.5 / FPS, 30 / FPS]]
    agreed = refused = 0
    for stamps in queries:
        try:
            expected = decode_video_frames(path, stamps, tolerance, backend="pyav", return_uint8=True)
        except FrameTimestampError:
            with pytest.raises(FrameTimestampError, match="no frame within tolerance_s") as err:
                store.frames(clip, stamps, tolerance, keep)
            assert str(path) in str(err.value) and "\n" not in str(err.value)
            refused += 1
        else:
            assert torch.equal(store.frames(clip, stamps, tolerance, keep), expected), stamps
            agreed += 1
    assert agreed and refused


def test_broken_video_one_line_naming_the_file_camera_and_episode(roots, tmp_path, store):
    """A half-copied file: LeRobot's frames where LeRobot decodes them, one clear line where it cannot."""
    root = tmp_path / "broken"
    synthetic.generate(synthetic.TASKS["red-left"], root, EPISODES, FRAMES, 32, seed=0)
    video = root / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    outcomes = {}
    for keep in (True, False):
        ours, theirs = frames.serve_frames(lerobot(root)), lerobot(root)
        ours.reader.keep_episodes = keep
        for i in range(len(ours)):
            try:
                expected = theirs[i]["observation.images.wrist"]
            except (FrameTimestampError, av.FFmpegError):  # LeRobot's FFmpeg error does not name the file
                with pytest.raises((FrameTimestampError, VideoError)) as err:
                    ours[i]
                message, episode = str(err.value), int(theirs.hf_dataset[i]["episode_index"])
                assert "\n" not in message and str(video) in message and "re-encode it or drop that episode" in message
                assert f"camera 'observation.images.wrist' of episode {episode}" in message
                outcomes[keep, i] = "refused"
            else:
                assert torch.equal(ours[i]["observation.images.wrist"], expected)
                outcomes[keep, i] = "decoded"
    assert {"refused", "decoded"} <= set(outcomes.values())


def test_a_bounded_store_evicts_and_stays_exact(roots, store):
    ours = frames.serve_frames(lerobot(roots["h264-3cams"]))
    store.budget = 2 * FRAMES * 3 * tiny.IMAGE_SIZE**2  # room for one camera's episode (and its lead-in), not two
    assert ours.reader.keep_episodes
    assert_same_samples(ours, lerobot(roots["h264-3cams"]), list(range(0, len(ours), 3)))
    assert 0 < store.nbytes <= store.budget and len(store.episodes) < EPISODES * 3


def test_a_dataset_too_big_to_keep_is_read_per_sample(roots, store, monkeypatch):
    ours = lerobot(roots["h264-2cams"])
    store.budget = frames.decoded_bytes(ours) - 1
    frames.serve_frames(ours)
    assert not ours.reader.keep_episodes
    ours[0], ours[len(ours) - 1]
    assert store.nbytes == 0 and not store.episodes and len(store.videos) == 2


def test_datasets_that_fit_alone_but_not_together_keep_only_what_fits(roots, store):
    # A pooled baseline opens every client's dataset in one process: sharing one cache they
    # would evict each other and decode whole episodes per sample.
    first, second = lerobot(roots["h264-2cams"]), lerobot(roots["h264-3cams"])
    store.budget = frames.decoded_bytes(first) + frames.decoded_bytes(second) - 1
    frames.serve_frames(first), frames.serve_frames(second)
    assert first.reader.keep_episodes and not second.reader.keep_episodes
    for i in range(0, len(second), 7):
        first[i % len(first)], second[i]
    assert store.episodes and all(roots["h264-2cams"] in clip.path.parents for clip in store.episodes)
    assert len(store.episodes) == EPISODES * 2  # nothing evicted: each episode decoded once
    assert_same_samples(second, lerobot(roots["h264-3cams"]), list(range(0, len(second), 5)))


def test_max_open_videos_is_a_bound(roots, store):
    store.max_open = 1
    ours = frames.serve_frames(lerobot(roots["h264-3cams"]))
    ours.reader.keep_episodes = False
    assert_same_samples(ours, lerobot(roots["h264-3cams"]), [0, 20, 7])
    assert len(store.videos) == 1


class Probe(torch.utils.data.Dataset):
    """What a DataLoader worker's store held when it got its first sample, and the sample."""

    def __init__(self, dataset: LeRobotDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        held = {"open": len(frames.store().videos), "kept": frames.store().nbytes}
        return held | {"image": self.dataset[i]["observation.images.front"]}


def test_forked_workers_open_their_own_videos_and_keep_the_parents_frames(roots, store):
    ours = frames.serve_frames(lerobot(roots["h264-2cams"]))
    ours[0]  # the parent opens both videos and keeps episode 0 before the workers fork
    parents = dict(store.videos)
    assert len(parents) == 2 and store.nbytes > 0
    loader = torch.utils.data.DataLoader(Probe(ours), batch_size=1, num_workers=2, sampler=[0, 20])
    first = list(loader)
    assert [int(b["open"]) for b in first] == [0, 0]  # no container crossed the fork
    assert all(int(b["kept"]) == store.nbytes for b in first)  # decoded frames did, copy-on-write
    reference = lerobot(roots["h264-2cams"])
    assert torch.equal(first[0]["image"][0], reference[0]["observation.images.front"])
    assert torch.equal(first[1]["image"][0], reference[20]["observation.images.front"])
    assert frames.store() is store and store.videos == parents
    ours.reader.keep_episodes = False  # the parent's own containers still seek and decode right
    assert_same_samples(ours, reference, [30, 1])


class Collecting(torch.utils.data.Dataset):
    """A front camera image per sample, after the worker's garbage collector ran."""

    def __init__(self, dataset: LeRobotDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        gc.collect()
        return self.dataset[i]["observation.images.front"]


def test_a_worker_forked_after_the_parent_dropped_open_videos_does_not_hang(roots, monkeypatch):
    ours = frames.serve_frames(lerobot(roots["h264-2cams"]))
    gc.disable()  # the dropped store's open videos wait in a reference cycle for the collector
    try:
        monkeypatch.setattr(frames, "_store", FrameStore())  # (monkeypatch restores this process's own at the end)
        ours[0]
        frames._store = FrameStore()  # drops the store that opened the videos, unclosed
        loader = torch.utils.data.DataLoader(Collecting(ours), batch_size=1, num_workers=1, timeout=deadline())
        image = next(iter(loader))  # a hung worker: RuntimeError after 600 s (generous: a loaded machine is slow, a hang is forever)
    finally:
        gc.enable()
    assert torch.equal(image[0], lerobot(roots["h264-2cams"])[0]["observation.images.front"])


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_do_not_depend_on_workers_or_resuming(roots, workers, store):
    """Two rounds of more than one pass each (the second reseeded mid-pass): the same batches with
    DataLoader workers as without, and from a fresh loader (a resumed run) as from the resident one."""
    split = data.open_split(DatasetEntry(uri=f"local:{roots['h264-2cams']}"), tiny_config(5, "cpu"), 0.34, 0)
    resident, with_workers = data.train_loader(split.train, 4), data.train_loader(split.train, 4, workers)
    draws = len(split.train) // 4 + 1  # more than one pass
    for seed in (3, 4):
        expected = data.batches(resident, seed, cameras={})
        streams = [data.batches(with_workers, seed, cameras={}),
                   data.batches(data.train_loader(split.train, 4, workers), seed, cameras={})]
        for _ in range(draws):
            reference = next(expected)
            for got in (next(stream) for stream in streams):
                assert got.keys() == reference.keys()
                for key, value in reference.items():
                    assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_a_collected_dataset_gives_its_share_back(roots, store):
    first = frames.serve_frames(lerobot(roots["h264-2cams"]))
    store.budget = store.reserved = frames.decoded_bytes(first)  # full: the next dataset would have to seek
    assert not frames.serve_frames(lerobot(roots["h264-2cams"])).reader.keep_episodes
    del first
    gc.collect()
    assert store.reserved == 0 and frames.serve_frames(lerobot(roots["h264-2cams"])).reader.keep_episodes
