"""Dataset registry: which LeRobotDataset each client trains on and the server evaluates on.

The run config picks a profile (``datasets``) and, optionally, a registry file of the user's
own (``registry``). Without a file, profiles come from ``[tool.zk0.datasets.<profile>]`` of the
app's pyproject.toml; a registry file has the same tables at its top level (``[<profile>]``).
Each entry is a dataset URI:

* ``hf:user/name`` (or a bare ``user/name``): a Hugging Face hub dataset;
* ``local:/abs/path`` (or an absolute path): a LeRobotDataset folder on disk;
* ``embedded:<task>``: expert demonstrations zk0 records in its SO-101 simulator and caches.

An embedded entry may say how many demonstrations to record (``episodes``, default 10) and
which set (``shard``: shards of one task share no episode, so two clients can hold the same
task without holding the same data).

Real SO-100/SO-101 datasets name their cameras freely, so an entry maps dataset camera keys
onto the policy's (``cameras = {"observation.images.top" = "observation.image"}``); every key
it names must exist in the dataset. A profile may also carry ``cameras``: a convention for all
of its entries whose keys a dataset may lack (an entry's own mapping wins).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import zk0

SCHEMES = ("hf", "local", "embedded")
EMBEDDED_KEYS = {"episodes": (2, 2000), "shard": (0, 9)}  # an embedded entry's recording: bounds of each key


class RegistryError(ValueError):
    """The registry (or an entry of it) cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry.

    ``cameras`` must all apply (each key is a camera of the dataset); ``camera_defaults`` (the
    profile's convention) apply where the dataset has the key.
    """

    uri: str
    cameras: dict[str, str] = field(default_factory=dict)
    camera_defaults: dict[str, str] = field(default_factory=dict)
    episodes: int = 0  # embedded only: demonstrations to record (0: the demo's default)
    shard: int = 0  # embedded only: which set of demonstrations (two shards of a task share no episode)

    @property
    def scheme(self) -> str:
        """``hf``, ``local`` or ``embedded``."""
        if ":" in self.uri and not self.uri.startswith("/"):
            return self.uri.split(":", 1)[0]
        return "local" if self.uri.startswith("/") else "hf"

    @property
    def target(self) -> str:
        """The URI without its scheme: a repo id, a path or an embedded task name."""
        return self.uri.split(":", 1)[1] if ":" in self.uri and not self.uri.startswith("/") else self.uri

    @property
    def name(self) -> str:
        """A short, filesystem-safe name for logs, metrics and charts (never a local path)."""
        if self.scheme == "local":
            return Path(self.target).name
        sizes = (f"-{self.episodes}ep" if self.episodes else "") + (f"-shard{self.shard}" if self.shard else "")
        return self.target.replace("/", "__") + sizes


@dataclass(frozen=True)
class Registry:
    """A registry profile: client datasets (one per partition) and server evaluation sets."""

    profile: str
    clients: tuple[DatasetEntry, ...]
    server_eval: tuple[DatasetEntry, ...]
    source: str = ""

    def client(self, partition_id: int) -> DatasetEntry:
        """The dataset of simulation partition ``partition_id``."""
        if not 0 <= partition_id < len(self.clients):
            raise RegistryError(
                f"partition {partition_id} has no dataset: registry profile {self.profile!r} lists "
                f"{len(self.clients)} clients; run at most that many SuperNodes or add entries")
        return self.clients[partition_id]


def default_pyproject() -> Path:
    """The app's pyproject.toml: the checkout's (editable install) or the copy inside the package."""
    package = Path(zk0.__file__).resolve().parent
    checkout = package.parents[1] / "pyproject.toml"
    return checkout if checkout.is_file() else package / "pyproject.toml"


def load_registry(profile: str, registry_file: str = "") -> Registry:
    """Profile ``profile`` of the registry file, or of ``[tool.zk0.datasets]`` when none is given."""
    if registry_file:
        path = Path(registry_file).expanduser()
        profiles = _read_toml(path, "registry file", "set run-config 'registry' to a TOML file of [<profile>] "
                                                     "tables (see docs/own-data.md)")
        profiles = profiles.get("tool", {}).get("zk0", {}).get("datasets", profiles)
        where = f"registry file {path}"
    else:
        path = default_pyproject()
        profiles = _read_toml(path, "dataset registry", "install zk0 with `pip install -e .` or pass run-config "
                                                        "'registry'")
        profiles = profiles.get("tool", {}).get("zk0", {}).get("datasets", {})
        where = f"[tool.zk0.datasets] of {path}"
    if profile not in profiles or not isinstance(profiles[profile], dict):
        available = ", ".join(sorted(k for k, v in profiles.items() if isinstance(v, dict))) or "none"
        raise RegistryError(f"dataset profile {profile!r} not in {where}; available: {available}")
    return _profile(profile, profiles[profile], str(path))


def _read_toml(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise RegistryError(f"{what} {path} does not exist; {fix}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{what} {path} is not valid TOML: {err}") from None


def _profile(profile: str, table: dict, source: str) -> Registry:
    defaults = _cameras(table.get("cameras", {}), f"profile {profile!r}")
    unknown = sorted(set(table) - {"clients", "server-eval", "cameras"})
    if unknown:
        raise RegistryError(f"dataset profile {profile!r}: unknown key(s) {', '.join(unknown)}; "
                            "expected clients, server-eval, cameras")
    clients = tuple(_entry(e, profile, defaults) for e in _list(table, "clients", profile))
    server_eval = tuple(_entry(e, profile, defaults) for e in _list(table, "server-eval", profile))
    if not clients:
        raise RegistryError(f"dataset profile {profile!r} lists no clients")
    return Registry(profile, clients, server_eval, source)


def _list(table: dict, key: str, profile: str) -> list:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise RegistryError(f"dataset profile {profile!r}: {key} must be a list of entries")
    return value


def _entry(raw: str | dict, profile: str, defaults: dict[str, str]) -> DatasetEntry:
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("uri"), str) or not raw["uri"]:
        raise RegistryError(f"dataset profile {profile!r}: entry {raw!r} needs a string 'uri'")
    owner = f"dataset {raw['uri']!r}"
    if unknown := sorted(set(raw) - {"uri", "cameras", *EMBEDDED_KEYS}):
        raise RegistryError(f"{owner}: unknown key(s) {', '.join(unknown)}; expected uri, cameras, "
                            f"{', '.join(EMBEDDED_KEYS)}")
    sizes = {key: _embedded_int(raw, key, owner) for key in EMBEDDED_KEYS if key in raw}
    entry = DatasetEntry(uri=raw["uri"], cameras=_cameras(raw.get("cameras", {}), owner), camera_defaults=defaults,
                         **sizes)
    if entry.scheme not in SCHEMES:
        raise RegistryError(f"dataset URI {entry.uri!r}: scheme must be hf:, local: or embedded:")
    if sizes and entry.scheme != "embedded":
        raise RegistryError(f"{owner}: {', '.join(sizes)} apply to embedded: datasets only (they are recorded)")
    return entry


def _embedded_int(raw: dict, key: str, owner: str) -> int:
    low, high = EMBEDDED_KEYS[key]
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RegistryError(f"{owner}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _cameras(raw: object, owner: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                            for k, v in raw.items()):
        raise RegistryError(f"{owner}: cameras must be a table of \"<dataset key>\" = \"<policy key>\" strings")
    return dict(raw)


def parse_camera_map(items: list[str] | str) -> dict[str, str]:
    """``["top=observation.image", "wrist=observation.image2"]`` (or one comma-separated string) as a mapping.

    Short names are dataset camera keys without ``observation.images.``; policy keys are used as given.
    """
    parts = [p.strip() for item in ([items] if isinstance(items, str) else items) for p in item.split(",")]
    mapping: dict[str, str] = {}
    for part in filter(None, parts):
        source, sep, target = (s.strip() for s in part.partition("="))
        if not sep or not source or not target:
            raise RegistryError(f"camera mapping {part!r} is not DATASET_KEY=POLICY_KEY "
                                "(e.g. observation.images.top=observation.image)")
        source = source if "." in source else f"observation.images.{source}"
        if source in mapping:
            raise RegistryError(f"camera mapping names dataset camera {source!r} twice")
        mapping[source] = target
    return mapping


def format_camera_map(mapping: dict[str, str]) -> str:
    """Inverse of :func:`parse_camera_map` (node config carries the mapping as this one string)."""
    return ",".join(f"{k}={v}" for k, v in mapping.items())
