"""`zk0 push`: which checkpoint, exactly what is uploaded and how it is tagged, with a recording fake at the
HfApi boundary (no network); the token never lands in the run folder or the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zk0.cli.app import app
from zk0.config import RunConfig
from zk0.hub import PushError, best_round, plan_push, push, push_at_end, skip_reason

TOKEN = "hf_zk0TestTokenThatMustNeverBeWritten"


def make_run(root: Path, rounds=(2, 4), sim: dict[int, float] | None = None) -> Path:
    """A run folder as the ServerApp leaves it: config, metrics and checkpoint folders."""
    run = root / "20261129-000000-fedprox-1"
    for r in rounds:
        folder = run / "checkpoints" / f"round_{r}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text("{}")
        (folder / "README.md").write_text("---\nlibrary_name: lerobot\n---\n# card\n")
    (run / "config.json").write_text(json.dumps({"run-config": {"strategy": "fedprox", "num-server-rounds": 4}}))
    records = [{"round": r, "source": "client", "dataset": d, "train-loss": 1.0} for r in (1, 2, 3, 4)
               for d in ("red-pick", "blue-pick-small")]
    mae = {2: 3.0, 4: 5.0}
    records += [{"round": r, "source": "client-eval", "dataset": "red-pick", "eval-loss": 0.5, "eval-action-mae": m}
                for r, m in mae.items()]
    records += [{"round": r, "source": "server", "event": "sim-eval", "dataset": "t", "success-rate": s}
                for r, s in (sim or {}).items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


class FakeHfApi:
    """Records every call a push makes."""

    def __init__(self, token: str | None = None) -> None:
        self.token, self.calls = token, []
        FakeHfApi.last = self

    def create_repo(self, repo_id, *, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, commit_message))
        self.card = (Path(folder_path) / "README.md").read_text()

    def create_tag(self, repo_id, *, tag, tag_message, exist_ok):
        self.calls.append(("create_tag", repo_id, tag))


def test_best_is_sim_success_where_measured_else_held_out_mae(tmp_path):
    run = make_run(tmp_path)
    assert plan_push(run, "alice/so101-fl", "best", False).server_round == 2
    records = [{"round": 2, "event": "sim-eval", "success-rate": 0.2}, {"round": 4, "event": "sim-eval",
                                                                         "success-rate": 0.6}]
    assert best_round(records, [2, 4])[0] == 4 and "simulator success (60%)" in best_round(records, [2, 4])[1]
    assert best_round([], [2, 4]) == (4, "no held-out metric was recorded: the last checkpointed round")


def test_a_push_uploads_the_checkpoint_once_and_tags_round_and_version(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    plan = plan_push(make_run(tmp_path), "alice/so101-fl", "4", private=True)
    api = FakeHfApi()
    push(plan, api)
    assert api.calls[0] == ("create_repo", "alice/so101-fl", True, True)
    kind, repo, files, message = api.calls[1]
    assert (kind, repo, files) == ("upload_folder", "alice/so101-fl", ["README.md", "config.json", "model.safetensors"])
    assert message == "zk0: fedprox round 4/4, 2 clients (blue-pick-small, red-pick), held-out loss 0.5, MAE 5"
    assert api.card.endswith("## This upload\n\nRound 4 of the run: the round asked for.\n")
    assert "This upload" not in (plan.folder / "README.md").read_text()  # the run folder's card is left as it was
    assert [c[2] for c in api.calls[2:]] == ["fl-round-4", "zk0-v0.1.0"]


@pytest.mark.parametrize("spec,reason", [("7", "choose best, last or a checkpointed round (2, 4)"),
                                         ("soon", "choose best, last")])
def test_a_round_without_a_checkpoint_is_refused(tmp_path, spec, reason):
    with pytest.raises(PushError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        plan_push(make_run(tmp_path), "alice/x", spec, False)


def test_bad_repo_ids_and_empty_runs_are_one_line(tmp_path):
    with pytest.raises(PushError, match="needs the owner"):
        plan_push(make_run(tmp_path), "lonely", "last", False)
    with pytest.raises(PushError, match="has no checkpoint"):
        plan_push(tmp_path, "alice/x", "last", False)


def test_offline_the_push_fails_at_once_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["push", str(make_run(tmp_path)), "--repo-id", "alice/x"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in result.stderr


def test_the_cli_hands_the_token_to_huggingface_hub_only(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    run = make_run(tmp_path / "runs")
    result = CliRunner().invoke(app, ["push", str(run), "--repo-id", "alice/so101-fl", "--round", "best"])
    assert result.exit_code == 0, result.output
    assert FakeHfApi.last.token == TOKEN and "pushed round 2" in result.stdout
    assert "Round 2 of the run: lowest held-out action MAE" in FakeHfApi.last.card  # the card says why this round
    assert TOKEN not in result.output
    assert not [p for p in run.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_dry_run_writes_exactly_what_would_be_uploaded(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["push", str(run), "--repo-id", "alice/x", "--dry-run", "--private"])
    assert result.exit_code == 0, result.output
    out = run / "push-4"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "README.md").read_text().endswith("Round 4 of the run: the last checkpointed round.\n")
    assert "would upload to alice/x (private), tags fl-round-4, zk0-v0.1.0" in result.stdout
    again = CliRunner().invoke(app, ["push", str(run), "--repo-id", "alice/x", "--dry-run"])
    assert again.exit_code == 1 and "exists" in again.stderr


def test_a_completed_run_pushes_its_last_checkpoint_privately_unless_it_is_short(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = make_run(tmp_path)
    api = FakeHfApi()
    line = push_at_end(run, RunConfig.flat(hf_repo_id="alice/fl", num_server_rounds=5, checkpoint_interval=5), api)
    assert line == "pushed round 4 to https://huggingface.co/alice/fl (private)"
    assert api.calls[0] == ("create_repo", "alice/fl", True, True) and api.calls[2][2] == "fl-round-4"
    short = push_at_end(run, RunConfig.flat(hf_repo_id="alice/fl", num_server_rounds=3), FakeHfApi())
    assert short == ("not pushed to alice/fl: num-server-rounds=3 < checkpoint-interval=5: a short test run is "
                     "not published")
    assert skip_reason(10, 5) is None


def test_an_end_of_run_push_that_fails_says_so_and_keeps_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_run(tmp_path)
    line = push_at_end(run, RunConfig.flat(hf_repo_id="alice/fl", num_server_rounds=5, checkpoint_interval=5))
    assert line.startswith("not pushed to alice/fl: HF_HUB_OFFLINE is set") and "retry with `zk0 push`" in line
    assert (run / "checkpoints" / "round_4" / "model.safetensors").is_file()
