"""Dataset registry: which LeRobotDataset each client trains on and the server evaluates on.

Lives in ``[tool.zk0.datasets.<profile>]`` of the app's pyproject.toml; the run config
key ``datasets`` picks the profile. Each entry is a dataset URI:

* ``hf:user/name`` (or a bare ``user/name``): a Hugging Face hub dataset;
* ``local:/abs/path`` (or an absolute path): a LeRobotDataset folder on disk;
* ``embedded:<task>``: expert demonstrations zk0 records in its SO-101 simulator and caches.

An entry may map dataset camera keys onto the policy's (``cameras = {"observation.images.top" =
"observation.images.front"}``) because real SO-100 datasets name cameras differently.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import zk0


class RegistryError(ValueError):
    """The registry (or an entry of it) cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry."""

    uri: str
    cameras: dict[str, str] = field(default_factory=dict)

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
        """A short, filesystem-safe name for logs, metrics and charts."""
        return Path(self.target).name if self.scheme == "local" else self.target.replace("/", "__")


@dataclass(frozen=True)
class Registry:
    """A registry profile: client datasets (one per partition) and server evaluation sets."""

    profile: str
    clients: tuple[DatasetEntry, ...]
    server_eval: tuple[DatasetEntry, ...]

    def client(self, partition_id: int) -> DatasetEntry:
        """The dataset of simulation partition ``partition_id``."""
        if not 0 <= partition_id < len(self.clients):
            raise RegistryError(
                f"partition {partition_id} has no dataset: registry profile {self.profile!r} lists "
                f"{len(self.clients)} clients; run at most that many SuperNodes or add entries")
        return self.clients[partition_id]


def default_pyproject() -> Path:
    """The app's pyproject.toml: the project root above the ``zk0`` package."""
    return Path(zk0.__file__).resolve().parents[2] / "pyproject.toml"


def load_registry(profile: str, pyproject: Path | None = None) -> Registry:
    """Read profile ``profile`` of ``[tool.zk0.datasets]`` and validate its entries."""
    path = pyproject or default_pyproject()
    if not path.is_file():
        raise RegistryError(f"dataset registry not found: {path} does not exist (install zk0 from a "
                            "checkout with `pip install -e .` so its pyproject.toml is next to the package)")
    profiles = tomllib.loads(path.read_text()).get("tool", {}).get("zk0", {}).get("datasets", {})
    if profile not in profiles:
        raise RegistryError(f"dataset profile {profile!r} not in [tool.zk0.datasets] of {path}; "
                            f"available: {', '.join(sorted(profiles)) or 'none'}")
    table = profiles[profile]
    clients = tuple(_entry(e, profile) for e in table.get("clients", []))
    server_eval = tuple(_entry(e, profile) for e in table.get("server-eval", []))
    if not clients:
        raise RegistryError(f"dataset profile {profile!r} lists no clients")
    return Registry(profile, clients, server_eval)


def _entry(raw: str | dict, profile: str) -> DatasetEntry:
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("uri"), str):
        raise RegistryError(f"dataset profile {profile!r}: entry {raw!r} needs a string 'uri'")
    cameras = raw.get("cameras", {})
    if not isinstance(cameras, dict) or not all(isinstance(v, str) for v in cameras.values()):
        raise RegistryError(f"dataset {raw['uri']!r}: cameras must be a table of dataset key = policy key strings")
    entry = DatasetEntry(uri=raw["uri"], cameras=dict(cameras))
    if entry.scheme not in ("hf", "local", "embedded"):
        raise RegistryError(f"dataset URI {entry.uri!r}: scheme must be hf:, local: or embedded:")
    return entry
