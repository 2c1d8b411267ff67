"""The model card (a checkpoint's README.md), written from the run folder's own records.

What it says is what happened: the datasets that trained in each round (not the registry's list)
with the robot, fps, tasks and episode counts each client reported, whether the run was a
simulation or a deployment, the held-out and unseen metrics of this round against round 0, the
``zk0 compare`` table when one was made with this run, the policy's inputs and outputs, how the
federation ran and was secured, and how to load the folder with LeRobot alone. The YAML header is
built with huggingface_hub's ``ModelCardData``, so the Hub renders and indexes it.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from statistics import mean
from typing import Any

from zk0.tracking import read_metrics

COMPARISON = "compare.json"  # written into each compared run folder by zk0 compare (zk0.tools.compare)
TAGS = ["smolvla", "federated-learning", "flower", "lerobot", "zk0", "so101"]
LOCAL_MODELS = ("tiny", "smolvla-size")  # built here from a local config: no hub base model
USE_SNIPPET = """from pathlib import Path
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

d = Path("<this folder>")
cfg = PreTrainedConfig.from_pretrained(d)
if (d / cfg.vlm_model_name).is_dir():  # a locally built VLM travels in the folder
    cfg.vlm_model_name = str(d / cfg.vlm_model_name)
policy = SmolVLAPolicy.from_pretrained(d, config=cfg)
preprocessor, postprocessor = make_pre_post_processors(
    cfg, pretrained_path=str(d),
    preprocessor_overrides={"tokenizer_processor": {"tokenizer_name": cfg.vlm_model_name}})
"""
CITATION = """@article{shukor2025smolvla,
  title={SmolVLA: A Vision-Language-Action Model for Affordable and Efficient Robotics},
  author={Shukor, Mustafa and others},
  journal={arXiv preprint arXiv:2506.01844},
  year={2025}
}"""


def model_card(run_dir: Path, server_round: int, policy_config: Any) -> str:
    """The card for the checkpoint of ``server_round`` of the run in ``run_dir``."""
    config = json.loads((run_dir / "config.json").read_text())
    run_config = config["run-config"]
    records = read_metrics(run_dir / "metrics.jsonl")
    trained = _trained_per_round(records, server_round)
    kind = config.get("mode", run_config["strategy"])
    title = f"zk0 {kind} SmolVLA: round {server_round} of {run_config['num-server-rounds']}"
    sections = [f"# {title}", _intro(config, kind, trained), _federation(trained, config, records, kind),
                _results(records, server_round), _comparison(run_dir), _io(policy_config, run_config),
                _training(run_config, config, _privacy(run_config, records, server_round)), _use(),
                f"## Citation\n```bibtex\n{CITATION}\n```"]
    body = "\n\n".join(section for section in sections if section)
    return f"---\n{_metadata(config, records, server_round, title).to_yaml()}\n---\n\n{body}\n"


def refresh_cards(run_dir: Path) -> list[Path]:
    """Write every checkpoint's card of the run again from its records (after ``zk0 compare`` added its table).

    Each policy folder keeps its config, so its card's inputs and outputs come from there.
    """
    from zk0.checkpoint import load_config

    written = []
    for readme in sorted((run_dir / "checkpoints").glob("round_*/**/README.md")):
        round_folder = next(p for p in readme.parents if p.name.startswith("round_"))
        if (readme.parent / "config.json").is_file():
            card = model_card(run_dir, int(round_folder.name.removeprefix("round_")), load_config(readme.parent))
            readme.write_text(card)
            written.append(readme)
    return written


def client_facts(records: list[dict]) -> dict[str, dict]:
    """Each dataset's facts as its client reported them in the query phase (robot, fps, tasks, episodes)."""
    return {r["dataset"]: r for r in records if r.get("event") == "client-dataset"}


def federation(records: list[dict]) -> dict:
    """How the federation ran, as the ServerApp recorded it: ``runtime`` (``simulation`` or ``deployment``), the
    nodes connected and those that reported their dataset; empty for a baseline or a run from before zk0 kept it."""
    return next((r for r in records if r.get("event") == "federation"), {})


def read_comparison(run_dir: Path) -> dict | None:
    """The table of the last ``zk0 compare`` that included this run, or None."""
    path = run_dir / COMPARISON
    return json.loads(path.read_text()) if path.is_file() else None


def _metadata(config: dict, records: list[dict], server_round: int, title: str):
    from huggingface_hub import EvalResult, ModelCardData

    model = config["run-config"]["model-name"]
    hub_datasets = [e["uri"].removeprefix("hf:") for group in ("clients", "server-eval")
                    for e in config.get("datasets", {}).get(group, []) if e["uri"].startswith("hf:")]
    results = [EvalResult(task_type="robotics", dataset_type=kind, dataset_name=name, metric_type="mae",
                          metric_value=round(value, 4), metric_name=f"{label} action MAE (deg)")
               for (name, kind, label), value in _evals(records, server_round, "eval-action-mae").items()]
    return ModelCardData(library_name="lerobot", pipeline_tag="robotics", license="apache-2.0", tags=TAGS,
                         base_model=None if model in LOCAL_MODELS or Path(model).is_absolute() else model,
                         datasets=hub_datasets or None, model_name=title, eval_results=results or None)


def _evals(records: list[dict], server_round: int, key: str) -> dict[tuple[str, str, str], float]:
    """``key`` per dataset at ``server_round``: held-out episodes on clients, unseen tasks on the server."""
    out = {}
    for r in records:
        if r["round"] == server_round and key in r and r["source"] in ("client-eval", "server"):
            label = "held-out" if r["source"] == "client-eval" else "unseen-task"
            out[(r["dataset"], "client" if r["source"] == "client-eval" else "server", label)] = r[key]
    return out


def _trained_per_round(records: list[dict], last: int) -> dict[int, list[str]]:
    """The datasets whose updates were recorded in each round up to ``last``."""
    rounds: dict[int, set[str]] = {}
    for r in records:
        if r["source"] == "client" and "train-loss" in r and r["round"] <= last:
            rounds.setdefault(r["round"], set()).add(r.get("dataset", "?"))
    return {k: sorted(v) for k, v in sorted(rounds.items())}


def _intro(config: dict, kind: str, trained: dict[int, list[str]]) -> str:
    everyone = sorted({d for names in trained.values() for d in names})
    how = ("trained centrally on the pooled training episodes (a baseline)" if kind == "centralized" else
           "trained on each client's episodes alone (a baseline)" if kind == "local" else
           f"trained with federated {kind} across {len(everyone)} clients")
    versions = config.get("versions", {})
    return (f"A SmolVLA vision-language-action policy for SO-100/SO-101 arms, {how}, with zk0 (Flower "
            f"{versions.get('flwr', version('flwr'))}, LeRobot {versions.get('lerobot', version('lerobot'))}). "
            f"In federated training the robot owners' demonstrations never left their machines: only the "
            f"trainable tensors, metrics and normalisation statistics travelled.")


def _federation(trained: dict[int, list[str]], config: dict, records: list[dict], kind: str) -> str:
    rows, previous = [], None
    for server_round, names in trained.items():
        if names != previous:  # one row per change of who trained
            rows.append(f"| {server_round} | {len(names)} | {', '.join(map(_md, names))} |")
            previous = names
    registry = config.get("datasets", {})
    evals = ", ".join(e["uri"] for e in registry.get("server-eval", [])) or "none"
    return ("## Federation\n" + _how_it_ran(records, kind)
            + "\n\nThe datasets whose updates were aggregated (a row where that changed):\n\n"
            "| from round | clients | datasets |\n|---|---|---|\n" + "\n".join(rows or ["| — | 0 | — |"])
            + "\n\n" + _datasets(trained, records)
            + f"\n\nRegistry profile `{registry.get('profile', '?')}`; server evaluation on unseen tasks: {evals}.")


def _how_it_ran(records: list[dict], kind: str) -> str:
    """Simulation or deployment, as the ServerApp's grid told it (a baseline ran on one machine)."""
    if kind in ("centralized", "local"):
        return "A baseline: trained on one machine with every client's training episodes at hand; no federation."
    ran = federation(records)
    if not ran:
        return "Whether this run was a simulation or a deployment was not recorded."
    counts = f"{ran['reported']} of the {ran['nodes']} connected nodes reported their dataset"
    if ran["runtime"] == "deployment":
        return (f"A deployment: a Flower SuperLink and one SuperNode per robot owner, next to that owner's data; "
                f"{counts}.")
    return (f"A simulation: Flower's simulation runtime ran every client on one machine, each with one registry "
            f"dataset; {counts}.")


def _datasets(trained: dict[int, list[str]], records: list[dict]) -> str:
    """What each client that trained reported about its dataset; the data itself never left its owner."""
    facts = client_facts(records)
    if not facts:
        return ("The datasets' robot type, fps, tasks and episode counts were not recorded: they come from the "
                "clients' round-0 query replies, which a baseline does not have.")
    rounds: dict[str, list[int]] = {}
    for server_round, names in trained.items():
        for name in names:
            rounds.setdefault(name, []).append(server_round)
    rows = []
    for name, trained_in in sorted(rounds.items()):
        fact = facts.get(name, {})
        tasks = "; ".join(_md(task) for task in fact.get("tasks", [])) or "—"
        if fact.get("num-tasks", 0) > len(fact.get("tasks", [])):
            tasks += f" (and {fact['num-tasks'] - len(fact['tasks'])} more)"
        rows.append(f"| {_md(name)} | {_md(fact.get('robot-type') or '—')} | {fact.get('fps', '—')} | {tasks} | "
                    f"{fact.get('train-episodes', '—')} | {fact.get('held-out-episodes', '—')} | "
                    f"{len(trained_in)} ({_span(trained_in)}) |")
    return ("Each training client's dataset, as the client described it (the server never saw the data):\n\n"
            "| dataset | robot type | fps | tasks | train episodes | held-out episodes | rounds trained |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def _span(rounds: list[int]) -> str:
    """``1–5`` for consecutive rounds, else ``1, 3, 4``."""
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]}"
    return ", ".join(map(str, rounds))


def _md(text: str) -> str:
    """Owner text as a Markdown table cell: no column breaks, no HTML."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _results(records: list[dict], server_round: int) -> str:
    loss, loss_0 = _evals(records, server_round, "eval-loss"), _evals(records, 0, "eval-loss")
    mae, mae_0 = _evals(records, server_round, "eval-action-mae"), _evals(records, 0, "eval-action-mae")
    rows = [f"| {key[0]} | {key[2]} | {_num(loss_0.get(key))} | {_num(loss.get(key))} | {_num(mae_0.get(key))} | "
            f"{_num(value)} |" for key, value in sorted(mae.items())]
    success = {r: [x["success-rate"] for x in records if x["round"] == r and x.get("event") == "sim-eval"]
               for r in (0, server_round)}
    sim = (f"\n\nSimulator success (closed loop): {_pct(success[0])} at round 0, {_pct(success[server_round])} "
           f"at round {server_round}." if success[server_round] else "\n\nSimulator success was not measured.")
    history = _history(records, server_round)
    return (f"## Results\nFlow-matching loss (fixed noise) and action MAE in degrees, round 0 against round "
            f"{server_round}:\n\n| dataset | evaluated on | loss, round 0 | loss, round {server_round} | "
            f"MAE, round 0 | MAE, round {server_round} |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + sim
            + "\n\nLoss history (mean over clients):\n\n| round | train loss | held-out loss |\n|---|---|---|\n"
            + history)


def _comparison(run_dir: Path) -> str:
    """The ``zk0 compare`` table that included this run (round 0 and each run's final round), when there is one."""
    table = read_comparison(run_dir)
    if not table:
        return ""
    head = ["run", "mode", "round", *(label for _, label in table["columns"]), "optimizer steps"]
    rows = [f"| {'**this run**' if run['folder'] == run_dir.name else run['folder']} | {run['mode']} | {row['round']}"
            f" | {' | '.join(_num(row.get(key)) for key, _ in table['columns'])} | "
            f"{row.get('optimizer-steps') if row.get('optimizer-steps') is not None else '—'} |"
            for run in table["runs"] for row in run["rows"]]
    return (f"## Baseline comparison\n`zk0 compare` ({table['compared']}) set this run beside "
            f"{len(table['runs']) - 1} other run(s) on the same evaluation: means over the clients' held-out "
            f"episodes, the unseen-task sets and the simulator tasks, at round 0 and each run's final round.\n\n| "
            + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(rows))


def _history(records: list[dict], last: int) -> str:
    lines = []
    for server_round in range(last + 1):
        train = [r["train-loss"] for r in records if r["round"] == server_round and "train-loss" in r]
        held = [r["eval-loss"] for r in records if r["round"] == server_round and r["source"] == "client-eval"]
        lines.append(f"| {server_round} | {_num(mean(train) if train else None)} | "
                     f"{_num(mean(held) if held else None)} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def _pct(values: list[float]) -> str:
    return f"{mean(values):.0%}" if values else "not measured"


def _io(policy_config: Any, run_config: dict) -> str:
    rows = [f"| `{name}` | {feature.type.name.lower()} | {list(feature.shape)} |"
            for name, feature in [*policy_config.input_features.items(), *policy_config.output_features.items()]]
    return ("## Inputs and outputs\n| feature | kind | shape |\n|---|---|---|\n" + "\n".join(rows)
            + f"\n\nThe policy predicts chunks of {policy_config.chunk_size} actions and executes "
            f"{policy_config.n_action_steps} of them; base model `{run_config['model-name']}`.")


def _training(run_config: dict, config: dict, privacy: str) -> str:
    keys = ("strategy", "proximal-mu", "num-server-rounds", "local-steps", "batch-size", "client-optimizer", "lr",
            "lr-schedule", "lr-min-factor", "warmup-rounds", "grad-clip-norm", "server-optimizer", "server-lr",
            "server-lr-follows-schedule", "chunk-size", "seed")
    hyper = "\n".join(f"| `{k}` | `{run_config[k]}` |" for k in keys if k in run_config)
    return ("## Training\n| key | value |\n|---|---|\n" + hyper
            + f"\n\nWhat travelled: {run_config['transport-dtype']} trainable tensors (the frozen vision-language "
            f"base stays on each machine, fingerprint `{config.get('base-fingerprint', '?')[:16]}`), each payload "
            f"with a SHA-256 digest both sides check; updates above a norm of {run_config['max-update-norm']} and "
            f"implausible replies were rejected; {_aggregation(run_config, config)}pooled normalisation statistics "
            f"needed at least {run_config.get('min-stats-clients', '?')} contributors. A deployment runs over TLS "
            f"with registered node keys. {privacy} The full config is in the run folder's `config.json`.")


def _aggregation(run_config: dict, config: dict) -> str:
    """How the server combined each round's updates (``aggregation``, ``aggregation-weight``; a run from before
    they were keys: the mean, weighted by frames)."""
    if config.get("mode") in ("centralized", "local"):
        return ""
    rule = run_config.get("aggregation", "mean")
    if rule == "mean" and run_config.get("dp", "none") == "central":
        return "each round's updates were averaged with equal weights (no robust rule); "
    if rule == "mean" and run_config.get("aggregation-weight") == "dataset":
        return ("each round's updates were averaged, weighted by each client's training-set frames as it reported "
                "them (`aggregation-weight=dataset`; no robust rule); ")
    if rule == "mean":
        return "each round's updates were averaged, weighted by the frames each client trained on (no robust rule); "
    how = {"trimmed-mean": f"a coordinate-wise trimmed mean (`trim-fraction={run_config.get('trim-fraction')}`)",
           "median": "their coordinate-wise median",
           "krum": "Krum (each round, the one update nearest its n - f - 2 closest others)"}[rule]
    return (f"each round's updates were combined by {how}, `aggregation={rule}`, to withstand "
            f"`byzantine-clients={run_config.get('byzantine-clients')}` hostile update(s) a round; ")


def _privacy(run_config: dict, records: list[dict], server_round: int) -> str:
    """What differential privacy covered and the ε spent by ``server_round`` (its last privacy record)."""
    mode = run_config.get("dp", "none")
    spent = [r for r in records if r.get("event") == "privacy" and r["round"] <= server_round]
    if mode == "none" or not spent:
        return "No differential privacy."
    who = {"central": "clients clipped their updates and the server added Gaussian noise to their mean",
           "local": "each client clipped its update and added Gaussian noise to it before sending"}[mode]
    last = spent[-1]
    return (f"Differential privacy per robot owner (`dp={mode}`): {who} (clip norm {last['clip-norm']:g}, noise "
            f"multiplier {last['noise-multiplier']:.4g}), and the normalisation statistics were noised too. Spent by "
            f"round {server_round}: ε = {last['epsilon']:.4g} at δ = {last['delta']:g} over {last['releases']} "
            "releases (Rényi DP accountant, no amplification by sampling); training and evaluation metrics and the "
            "dataset facts above are not covered.")


def _use() -> str:
    return ("## Use\nWith LeRobot alone, on a local copy of this folder (`huggingface_hub.snapshot_download` for a "
            f"hub repo):\n```python\n{USE_SNIPPET}```\n\nEvaluate it with zk0: `zk0 eval <folder> --sim` "
            "(closed-loop success in the SO-101 simulator) or `zk0 eval <folder> --dataset hf:user/name` "
            "(offline loss and action MAE on a LeRobot dataset).")
