"""zk0 compare: one table and one chart over federated and baseline runs."""

from __future__ import annotations

import json

import pytest
from federation import shared_runs

from zk0.tools.compare import CompareError, compare, load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_table_has_every_run_at_round_0_and_its_last_round(runs, tmp_path):
    chart = tmp_path / "charts" / "compare.png"
    lines = compare([runs["fedprox"], runs["centralized"], runs["local"]], chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = next(line for line in lines if "round" in line and "held-out MAE" in line)
    assert "unseen MAE" in header and "optimizer steps" in header and "sim success" not in header
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in lines if line.startswith("│")]
    assert {(row[1], row[2]) for row in rows} == {(m, r) for m in ("fedprox", "centralized", "local") for r in "02"}
    round_0 = {row[1]: row[3:7] for row in rows if row[2] == "0"}
    assert round_0["fedprox"] == round_0["centralized"]  # same initial weights, stats and seeds
    assert {row[-1] for row in rows if row[2] == "2"} == {"16"}  # 2 rounds x 2 steps x 4 clients, every mode


def test_sim_success_is_split_into_client_and_unseen_tasks(runs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    doc = json.loads((runs["centralized"] / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(doc))
    client, unseen = doc["datasets"]["clients"][0]["uri"], doc["datasets"]["server-eval"][0]["uri"]
    sims = [{"round": 0, "source": "server", "event": "sim-eval", "dataset": uri.split(":", 1)[1],
             "success-rate": rate, "episodes": 2} for uri, rate in ((client, 0.5), (unseen, 0.25))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sims))
    assert load_run(run_dir).series() == {"sim-clients": {0: 0.5}, "sim-unseen": {0: 0.25}}
    lines = compare([run_dir], tmp_path / "sim.png")
    assert any("sim success (client tasks)" in line for line in lines)
    assert any("0.5000" in line and "0.2500" in line for line in lines)


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(CompareError, match="is not a zk0 run folder") as err:
            compare([folder], tmp_path / "chart.png")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "chart.png").exists()


def test_each_compared_run_keeps_the_table_and_its_cards_show_it(runs, tmp_path):
    from huggingface_hub.repocard import metadata_load

    from zk0.model_card import read_comparison

    fedprox, centralized = runs["fedprox"], runs["centralized"]
    lines = compare([fedprox, centralized], tmp_path / "chart.png")
    table = read_comparison(fedprox)
    assert table == read_comparison(centralized) and [r["folder"] for r in table["runs"]] == [fedprox.name,
                                                                                               centralized.name]
    printed = {tuple(cell.strip() for cell in line.strip("│ ").split("│")[:3]) for line in lines if "│" in line}
    assert {(r["folder"], r["mode"], str(row["round"])) for r in table["runs"] for row in r["rows"]} <= printed
    readme = fedprox / "checkpoints" / "round_2" / "README.md"
    card = readme.read_text()
    final = table["runs"][1]["rows"][-1]
    assert "## Baseline comparison" in card and "| **this run** | fedprox | 2 |" in card
    assert (f"| {centralized.name} | centralized | 2 | {final['held-out-loss']:.6g} | {final['held-out-mae']:.6g} |"
            in card)
    assert metadata_load(readme)["library_name"] == "lerobot"
    baseline = (centralized / "checkpoints" / "round_2" / "README.md").read_text()
    assert f"| {fedprox.name} | fedprox | 2 |" in baseline and "| **this run** | centralized | 2 |" in baseline
