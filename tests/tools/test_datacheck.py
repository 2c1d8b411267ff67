"""zk0.tools.datacheck: the dataset checker catches planted duplicates, NaNs, dead cameras and bad folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import synthetic

from zk0.tools import datacheck

EPISODES, FRAMES, SIZE = 2, 8, 32
STATE = "observation.state"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small, valid synthetic dataset (never modified: tests copy it first)."""
    root = tmp_path_factory.mktemp("datacheck") / "clean"
    return synthetic.generate(synthetic.TASKS["red-left"], root, EPISODES, FRAMES, SIZE, seed=0)


@pytest.fixture
def copy(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "copy")


def _plant_nan(root, episode: int, frame: int) -> None:
    """Overwrite one observation.state value of the data file with NaN, as a corrupt recording would."""
    path = next((root / "data").glob("*/*.parquet"))
    table = pq.read_table(path)
    rows = table.column("episode_index").to_numpy() == episode
    row = int(np.flatnonzero(rows & (table.column("frame_index").to_numpy() == frame))[0])
    state = np.stack(table.column(STATE).to_numpy(zero_copy_only=False)).astype(np.float32)
    state[row, 0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), state.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index(STATE), STATE, column), path)


def _dead_cameras(root) -> None:
    """A dataset whose front camera is black and whose wrist camera shows one unchanging grey frame."""
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset.create(repo_id="zk0/dead", fps=synthetic.FPS, features=synthetic.features(SIZE), root=root,
                               robot_type=synthetic.ROBOT_TYPE, use_videos=True, video_backend="pyav",
                               rgb_encoder=RGBEncoderConfig(vcodec="h264"))
    rng = np.random.default_rng(0)
    for _ in range(FRAMES):
        joints = rng.normal(size=6).astype(np.float32)
        ds.add_frame({STATE: joints, "action": joints, "task": "nothing",
                      "observation.images.front": np.zeros((SIZE, SIZE, 3), np.uint8),
                      "observation.images.wrist": np.full((SIZE, SIZE, 3), 128, np.uint8)})
    ds.save_episode(parallel_encoding=False)
    ds.finalize()


def test_clean_dataset_is_described_and_clean(clean):
    report = datacheck.check_dataset(f"local:{clean}")
    assert report.ok, report.issues
    assert (report.version, report.fps, report.episodes, report.frames) == ("v3.0", synthetic.FPS, EPISODES,
                                                                           EPISODES * FRAMES)
    assert report.robot_type == synthetic.ROBOT_TYPE
    assert report.features[STATE] == ("float32", (6,))
    assert report.features["observation.images.front"] == ("video", (SIZE, SIZE, 3))
    assert sorted(report.hashes) == list(range(EPISODES)) and len(set(report.hashes.values())) == EPISODES
    lines, ok = datacheck.run_check([f"local:{clean}"])
    assert ok and "  CLEAN" in lines and lines[-1].startswith("CLEAN")


def test_copied_episodes_are_reported_as_duplicates(clean, copy):
    lines, ok = datacheck.run_check([f"local:{clean}", f"local:{copy}"])
    assert not ok
    assert lines.count("  CLEAN") == 2  # each is fine alone: the leak is between them
    shared = [line for line in lines if line.startswith("DUPLICATE")]
    assert len(shared) == 1 and str(clean) in shared[0] and str(copy) in shared[0] and "0=0, 1=1" in shared[0]
    assert lines[-1].startswith("ISSUES")


def test_planted_nan_is_named_with_column_and_episode(clean, copy):
    _plant_nan(copy, episode=1, frame=3)
    report = datacheck.check_dataset(f"local:{copy}")
    assert report.issues == [f"non-finite values in {STATE}: 1 in episode 1 (1)"]
    # the untouched episode 0 is still recognised as a copy; the corrupted one no longer matches
    cross = datacheck.cross_check([datacheck.check_dataset(f"local:{clean}"), report])
    assert len(cross) == 1 and "episode 0=0" in cross[0]


def test_black_and_frozen_cameras(tmp_path):
    _dead_cameras(tmp_path / "dead")
    issues = datacheck.check_dataset(f"local:{tmp_path / 'dead'}").issues
    assert issues == ["camera observation.images.front is black in episode 0",
                      "camera observation.images.wrist is frozen (first, middle and last frames alike) in episode 0"]


def test_old_format_names_the_conversion_script(copy):
    info_path = copy / "meta" / "info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "codebase_version": "v2.1"}))
    report = datacheck.check_dataset(f"local:{copy}")
    assert report.version == "v2.1" and len(report.issues) == 1
    assert "convert_dataset_v21_to_v30" in report.issues[0]


@pytest.mark.parametrize("uri, reason", [("local:/nonexistent/dataset", "no meta/info.json"),
                                         ("s3:bucket/dataset", "scheme must be"),
                                         ("hf:nobody/nothing", "could not be opened")])
def test_unreadable_dataset_is_one_issue_line(uri, reason):
    lines, ok = datacheck.run_check([uri])
    assert not ok
    assert lines[0] == uri and reason in lines[1] and "\n" not in lines[1]
    assert len(lines) == 3 and lines[2].startswith("ISSUES")
