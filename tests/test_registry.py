"""zk0.registry: dataset profiles in pyproject.toml and dataset URIs."""

from __future__ import annotations

import pytest
from waits import deadline

from zk0.registry import (DatasetEntry, Registry, RegistryError, default_pyproject, format_camera_map, load_registry,
                          parse_camera_map)
from zk0.sim.scene import TASKS


def write_pyproject(tmp_path, body: str):
    path = tmp_path / "pyproject.toml"
    path.write_text(body)
    return path


def test_default_pyproject_is_the_checkout():
    path = default_pyproject()
    assert path.is_file()
    assert "[tool.zk0.datasets.embedded]" in path.read_text()


def test_embedded_profile_from_real_pyproject():
    reg = load_registry("embedded")
    assert isinstance(reg, Registry)
    assert reg.profile == "embedded"
    assert len(reg.clients) == 4
    assert len(reg.server_eval) == 1
    assert [e.uri for e in reg.clients] == [
        "embedded:red-pick", "embedded:blue-pick-small", "embedded:green-place-left", "embedded:yellow-place-right"]
    assert all(e.scheme == "embedded" for e in (*reg.clients, *reg.server_eval))
    assert reg.server_eval[0].target == "purple-place-center"
    # the unseen task is not one of the training tasks
    assert reg.server_eval[0].target not in {e.target for e in reg.clients}


def test_hub_profile_entries_are_hf():
    reg = load_registry("so101-hub")
    assert len(reg.clients) >= 2
    assert all(e.scheme == "hf" for e in reg.clients)
    assert "/" in reg.clients[0].target and not reg.clients[0].target.startswith("hf:")


@pytest.mark.parametrize("uri, scheme, target, name", [
    ("hf:user/ds", "hf", "user/ds", "user__ds"),
    ("user/ds", "hf", "user/ds", "user__ds"),
    ("local:/abs/path/my_ds", "local", "/abs/path/my_ds", "my_ds"),
    ("/abs/path/my_ds", "local", "/abs/path/my_ds", "my_ds"),
    ("embedded:red-left", "embedded", "red-left", "red-left"),
])
def test_entry_scheme_target_name(uri, scheme, target, name):
    entry = DatasetEntry(uri=uri)
    assert (entry.scheme, entry.target, entry.name) == (scheme, target, name)
    assert "/" not in entry.name


def test_unknown_profile_lists_available():
    with pytest.raises(RegistryError) as err:
        load_registry("nope")
    message = str(err.value)
    assert "'nope'" in message
    assert "embedded" in message and "so101-hub" in message


def test_missing_pyproject(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry("p", tmp_path / "missing.toml")


def test_bad_scheme_rejected(tmp_path):
    path = write_pyproject(tmp_path, '[tool.zk0.datasets.p]\nclients = ["s3:bucket/ds"]\n')
    with pytest.raises(RegistryError) as err:
        load_registry("p", path)
    assert "s3:bucket/ds" in str(err.value)
    assert "scheme" in str(err.value)


def test_entry_without_uri_rejected(tmp_path):
    path = write_pyproject(tmp_path, '[tool.zk0.datasets.p]\nclients = [{ path = "/x" }]\n')
    with pytest.raises(RegistryError, match="uri"):
        load_registry("p", path)


def test_profile_without_clients_rejected(tmp_path):
    path = write_pyproject(tmp_path, '[tool.zk0.datasets.p]\nserver-eval = ["hf:a/b"]\n')
    with pytest.raises(RegistryError, match="no clients"):
        load_registry("p", path)


def test_client_partition_out_of_range():
    reg = load_registry("embedded")
    assert reg.client(0).uri == "embedded:red-pick"
    assert reg.client(3).uri == "embedded:yellow-place-right"
    for bad in (4, -1):
        with pytest.raises(RegistryError) as err:
            reg.client(bad)
        assert f"partition {bad}" in str(err.value)
        assert "4 clients" in str(err.value)


def test_temp_pyproject_with_cameras(tmp_path):
    path = write_pyproject(tmp_path, """
[tool.zk0.datasets.p]
clients = [
    "hf:someone/ds1",
    { uri = "local:/data/ds2", cameras = { "observation.images.top" = "observation.images.front" } },
    { uri = "/data/ds3" },
]
server-eval = [{ uri = "embedded:purple-unseen" }]

[tool.zk0.datasets.other]
clients = ["hf:x/y"]
""")
    reg = load_registry("p", path)
    assert reg.profile == "p"
    assert [e.scheme for e in reg.clients] == ["hf", "local", "local"]
    assert reg.clients[0].cameras == {}
    assert reg.clients[1].cameras == {"observation.images.top": "observation.images.front"}
    assert reg.clients[1].target == "/data/ds2"
    assert reg.clients[2].name == "ds3"
    assert reg.server_eval == (DatasetEntry(uri="embedded:purple-unseen"),)
    assert len(load_registry("other", path).clients) == 1
    with pytest.raises(RegistryError, match="other, p"):
        load_registry("missing", path)


def test_user_registry_file_outside_the_checkout(tmp_path):
    path = tmp_path / "elsewhere" / "my-lab.toml"
    path.parent.mkdir()
    path.write_text("""
[lab]
clients = [{ uri = "local:/data/arm1", cameras = { "observation.images.top" = "observation.image" } },
           "hf:me/arm2"]
server-eval = ["local:/data/unseen"]

[lab.cameras]
"observation.images.wrist" = "observation.image2"
""")
    reg = load_registry("lab", str(path))
    assert reg.source == str(path)
    assert [e.uri for e in reg.clients] == ["local:/data/arm1", "hf:me/arm2"]
    assert reg.clients[0].cameras == {"observation.images.top": "observation.image"}
    assert all(e.camera_defaults == {"observation.images.wrist": "observation.image2"}
               for e in (*reg.clients, *reg.server_eval))
    with pytest.raises(RegistryError, match=r"'embedded' not in registry file .*available: lab"):
        load_registry("embedded", str(path))


@pytest.mark.parametrize("body, message", [
    ("[lab\nclients = []", "is not valid TOML"),
    ('[lab]\nclients = "local:/x"', "clients must be a list"),
    ('[lab]\nclients = ["local:/x"]\nserver_eval = []', "unknown key(s) server_eval"),
    ('[lab]\nclients = [{ uri = "local:/x", cameras = ["top"] }]', "cameras must be a table"),
    ('[lab]\nclients = [{ uri = "" }]', "needs a string 'uri'"),
    ('[lab]\nclients = [{ uri = "local:/x", episodes = 50 }]', "episodes apply to embedded: datasets only"),
    ('[lab]\nclients = [{ uri = "embedded:red-pick", episodes = 1 }]', "episodes must be an integer in [2, 2000]"),
    ('[lab]\nclients = [{ uri = "embedded:red-pick", shard = "1" }]', "shard must be an integer in [0, 9]"),
    ('[lab]\nclients = [{ uri = "embedded:red-pick", episode = 50 }]', "unknown key(s) episode; expected uri"),
])
def test_bad_registry_file_is_one_line(tmp_path, body, message):
    path = tmp_path / "reg.toml"
    path.write_text(body)
    with pytest.raises(RegistryError) as err:
        load_registry("lab", str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_registry_file_names_the_key(tmp_path):
    with pytest.raises(RegistryError, match=r"registry file .*nope.toml does not exist; set run-config 'registry'"):
        load_registry("lab", str(tmp_path / "nope.toml"))


def test_hub_profile_maps_usual_camera_names_onto_smolvla_base():
    reg = load_registry("so101-hub")
    defaults = reg.clients[0].camera_defaults
    assert defaults["observation.images.front"] == "observation.image"
    assert defaults["observation.images.wrist"] == "observation.image2"
    assert set(defaults.values()) == {"observation.image", "observation.image2", "observation.image3"}


def test_parse_camera_map():
    assert parse_camera_map(["top=observation.image", "observation.images.wrist = observation.image2"]) == {
        "observation.images.top": "observation.image", "observation.images.wrist": "observation.image2"}
    assert parse_camera_map("top=observation.image,wrist=observation.image2") == parse_camera_map(
        ["top=observation.image", "wrist=observation.image2"])
    assert parse_camera_map("") == {}
    mapping = {"observation.images.top": "observation.image"}
    assert parse_camera_map(format_camera_map(mapping)) == mapping
    for bad in ("top", "=observation.image", "top=", "top=a,observation.images.top=b"):
        with pytest.raises(RegistryError):
            parse_camera_map(bad)


def test_installed_wheel_carries_the_registry(tmp_path):
    """A non-editable install finds the app's pyproject.toml (registry, run config) inside the package."""
    import subprocess
    import sys

    from conftest import ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, timeout=deadline())
    (wheel,) = (tmp_path / "dist").glob("zk0-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=deadline())
    code = ("import zk0.registry as r; print(r.default_pyproject()); print(len(r.load_registry('embedded').clients))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline(), check=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout
    assert out.split() == [str(tmp_path / "site" / "zk0" / "pyproject.toml"), "4"]


def test_benchmark_profiles_record_more_demonstrations_in_distinct_shards():
    from zk0.sim.embedded import embedded_root, embedded_seed
    from zk0.sim.policy_eval import sim_tasks

    bench, eight, skewed = (load_registry(p) for p in ("benchmark", "benchmark-8", "benchmark-skewed"))
    assert [e.episodes for e in bench.clients] == [100] * 4 and bench.server_eval[0].target == "purple-place-center"
    names = [e.name for e in eight.clients]
    assert len(set(names)) == 8 and names[:2] == ["red-pick-50ep", "red-pick-50ep-shard1"]
    assert sim_tasks(eight.clients) == sim_tasks(bench.clients) == [e.target for e in bench.clients]
    assert [e.episodes for e in skewed.clients] == [200, 50, 50, 50]
    roots = {embedded_root(e.target, e.episodes, e.shard) for e in eight.clients}
    assert len(roots) == 8 and embedded_root("red-pick") != embedded_root("red-pick", 100)
    # attempt k of a recording is seed + k, at most twice the episodes: no two shards or tasks share one
    spans = sorted((embedded_seed(t, s), embedded_seed(t, s) + 2 * 2000) for t in TASKS for s in range(10))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
