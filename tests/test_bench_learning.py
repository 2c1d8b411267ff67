"""bench/learning.py reuses a finished run of exactly the same config, and nothing else."""

import argparse
import importlib.util
import json
from pathlib import Path

from zk0.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


def make_run(folder: Path, cfg: RunConfig, last_round: int) -> Path:
    """A run folder as zk0 writes it: its config and one round record per completed round."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"run-config": cfg.to_run_config()}))
    rounds = [{"round": r, "source": "server", "event": "round", "seconds": 1.0} for r in range(last_round + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return folder


def test_a_finished_run_of_the_same_config_is_reused(tmp_path):
    cfg = RunConfig.flat(num_server_rounds=3, lr=1e-3)
    done = make_run(tmp_path / "20261130-100000-fedavg-1", cfg, last_round=3)
    assert learning.finished_run(tmp_path, cfg) == done


def test_a_run_made_before_a_key_existed_counts_it_as_its_default(tmp_path):
    cfg = RunConfig.flat(num_server_rounds=3)
    done = make_run(tmp_path / "20261130-100000-fedavg-1", cfg, last_round=3)
    saved = json.loads((done / "config.json").read_text())
    del saved["run-config"]["aggregation-weight"]  # as a run saved before the key was added
    (done / "config.json").write_text(json.dumps(saved))
    assert learning.finished_run(tmp_path, cfg) == done
    assert learning.finished_run(tmp_path, RunConfig.flat(num_server_rounds=3, aggregation_weight="dataset")) is None


def test_a_run_moved_from_another_folder_is_reused(tmp_path):
    made_in = RunConfig.flat(num_server_rounds=3, output_dir=str(tmp_path / "elsewhere"))
    done = make_run(tmp_path / "20261130-100000-fedavg-1", made_in, last_round=3)
    assert learning.finished_run(tmp_path, RunConfig.flat(num_server_rounds=3, output_dir=str(tmp_path))) == done


def test_an_unfinished_run_or_another_setting_is_run_again(tmp_path):
    cfg = RunConfig.flat(num_server_rounds=3, lr=1e-3)
    make_run(tmp_path / "20261130-100000-fedavg-1", cfg, last_round=2)  # killed in round 3
    make_run(tmp_path / "20261130-110000-fedavg-2", RunConfig.flat(num_server_rounds=3, lr=2e-3), last_round=3)
    (tmp_path / "20261130-120000-fedavg-3").mkdir()  # stopped before it wrote anything
    empty = tmp_path / "20261130-130000-fedavg-4"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"run-config": cfg.to_run_config()}))
    (empty / "metrics.jsonl").write_text("")  # stopped before round 0 was recorded
    assert learning.finished_run(tmp_path, cfg) is None


def test_every_method_trains_with_equal_optimizer_steps_and_the_settings_reach_its_run_config():
    args = argparse.Namespace(rounds=15, local_steps=100, model="tiny", set="{}")
    configs = {m: learning.settings(args, 42, m) for m in (*learning.BASELINES, *learning.FEDERATED)}
    assert {learning.optimizer_steps(c) for c in configs.values()} == {15 * 100 * 4}
    for method, overrides in learning.FEDERATED.items():
        assert overrides.items() <= configs[method].items()
        assert configs[method]["eval-every"] == configs[method]["num-server-rounds"]  # evaluated at the end only
    args.set = '{"server-lr": 3.0}'
    assert learning.settings(args, 42, "fedavgm")["server-lr"] == 3.0  # --set wins


def test_the_eight_client_variation_keeps_the_steps_equal():
    args = argparse.Namespace(rounds=12, local_steps=50, model="tiny", set='{"datasets": "benchmark-8"}')
    configs = {m: learning.settings(args, 42, m) for m in (*learning.BASELINES, *learning.FEDERATED)}
    assert {learning.optimizer_steps(c) for c in configs.values()} == {12 * 50 * 8}
    assert {c["min-train-nodes"] for c in configs.values()} == {8}


def test_a_method_of_one_local_step_warms_up_over_the_baselines_steps():
    for rounds, local_steps in ((15, 100), (12, 50)):
        args = argparse.Namespace(rounds=rounds, local_steps=local_steps, model="tiny", set="{}")
        central, fedsgd = (learning.settings(args, 42, m) for m in ("centralized", "fedsgd-adam"))
        assert central["warmup-rounds"] * central["local-steps"] == fedsgd["warmup-rounds"] * fedsgd["local-steps"]
        assert fedsgd["warmup-rounds"] == local_steps  # one step a round
    assert learning.settings(args, 42, "fedavgm")["warmup-rounds"] == 1  # its own rounds: the shared warm-up
    args.set = '{"warmup-rounds": 3}'
    assert learning.settings(args, 42, "fedsgd-adam")["warmup-rounds"] == 3  # --set wins


def test_a_new_run_is_found_by_its_config_while_another_benchmark_writes_beside_it(tmp_path):
    def federation(fused: dict, num_nodes: int):
        mine = make_run(tmp_path / "fedavg" / "20261130-100000-fedavg-1", RunConfig.from_run_config(fused), 3)
        other = make_run(tmp_path / "fedavg" / "20261130-100500-fedavg-1", RunConfig.flat(lr=2e-3), 0)
        return other, mine  # the in-process helper answers with the newest folder: the other benchmark's

    config = {"datasets": "embedded", "num-server-rounds": 3, "strategy": "fedavg"}
    run_dir, reused = learning.run_method("fedavg", config, tmp_path, federation)
    assert run_dir.name == "20261130-100000-fedavg-1" and not reused
