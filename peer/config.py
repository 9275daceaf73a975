"""A peer's configuration file (TOML), validated with messages that name the key at fault.

Example (``hospital_a.toml``)::

    peer_id = "hospital-a"
    listen = "0.0.0.0:7443"

    [tls]
    cert = "hospital-a.pem"         # paths are relative to this file
    key = "hospital-a.key"          # must be mode 0600
    ca = "ca.pem"
    roster = "roster.json"          # signed by the CA (roster.json.sig beside it)
    crl = "crl.pem"

    [storage]
    data = "sqlite:///data.db"      # any SQLAlchemy URL; relative sqlite paths: this folder
    ledger = "sqlite:///ledger.db"

    [policy]
    max_epsilon = 8.0               # total privacy budget of this institution
    min_participants = 3            # at least 3 (with 2, the other learns your input)
    allowed_models = ["logreg", "mlp", "vector"]
    allowed_operators = ["ceremony-operator"]   # which operators may propose
    allowed_peer_proposers = []     # which peers may propose (none by default)
    allow_exact_payloads = false    # exact sums ("vector"): n-1 others learn your input
    max_proposal_bytes = 262144     # larger proposal documents are refused unread
    proposals_per_minute = 30       # per caller (token bucket, burst proposal_burst)
    proposal_burst = 10
    assumed_colluders_fraction = 0.1  # secure aggregation must hold against this many
                                      # colluding participants (and the aggregator); weaker
                                      # graphs, degrees or thresholds are refused (SECURITY.md)

    [policy.models]                 # optional: which declared models this site trains
    allowed_layers = ["InputLayer", "Dense", "Conv2D", "MaxPooling2D", "Flatten"]
    max_parameters = 500000         # default: the layers of peer.training.declared, 2,000,000
                                    # (BatchNormalization and Lambda are always refused)

    [data]                          # optional: where the training records are read from;
    source = "sql"                  # default: [storage] data (see peer/data/sources.py)

    [timeouts]
    stage_seconds = 30.0

    [limits]                        # optional; per caller (peer/ratelimit.py)
    reads_per_second = 20.0         # Status/Records calls, sustained
    reads_burst = 40
    hello_seconds = 30.0            # a RoundStream without a hello by then is closed
    trust_poll_seconds = 2.0        # how often roster and CRL files are checked for changes

    [relay]                         # optional; outbound-only sites (peer/relay.py)
    peers = ["hospital-a", "hospital-b"]   # relays to keep a Control stream to, in order

    [metrics]                       # optional; absent = no endpoint (peer/metrics.py)
    listen = "127.0.0.1:9464"       # Prometheus /metrics, plain HTTP
    allow_remote = false            # true to listen on a non-loopback address
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ratelimit import Limits

if TYPE_CHECKING:
    from .training.declared import ModelPolicy

__all__ = ["ConfigFileError", "MetricsConfig", "PeerConfig", "Policy", "load_config"]


class ConfigFileError(ValueError):
    """The configuration file is missing, unreadable or has a bad value (named in the text)."""


@dataclass(frozen=True)
class Policy:
    """A site's local rules for the sessions it joins (deny by default: see SECURITY.md,
    "Peer layer: who may propose and start; differencing")."""

    max_epsilon: float = 8.0
    # With 2 participants the other one learns this site's input from any sum.
    min_participants: int = 3
    # "cnn" and "declared" models are further checked by ``models`` (layers, parameters).
    allowed_models: tuple[str, ...] = ("logreg", "mlp", "cnn", "declared", "vector", "statistics")
    # Who may propose: roster operators named here, and roster peers named in
    # ``allowed_peer_proposers`` (none by default: a hospital proposing a session it takes
    # part in chooses who its input is summed with).
    allowed_operators: tuple[str, ...] = ()
    allowed_peer_proposers: tuple[str, ...] = ()
    # Exact (non-DP) payloads such as ``vector``: the n-1 others learn this site's input
    # from any exact sum, so they are refused unless the site opts in.
    allow_exact_payloads: bool = False
    # Bounds on what a caller can make this peer parse and remember.
    max_proposal_bytes: int = 256 * 1024
    proposals_per_minute: float = 30.0
    proposal_burst: int = 10
    max_rounds: int = 1000
    max_vector_length: int = 50_000_000
    # Cleartext sessions reveal every input to the aggregator: benchmarks only.
    allow_cleartext: bool = False
    min_paillier_key_bits: int = 2048
    # Secure aggregation: the fraction of participants this institution assumes may collude
    # with a malicious aggregator (never fewer than the aggregator itself). Proposals whose
    # graph, degree or threshold do not hold against that many are refused.
    assumed_colluders_fraction: float = 0.1
    # Declared models this site trains (``[policy.models]``): layer types and a parameter
    # budget; checked when a proposal arrives, before anything is built or read.
    models: ModelPolicy = field(default_factory=lambda: _model_policy({}, ""))


def _model_policy(table: dict[str, Any], where: str) -> ModelPolicy:
    from .training.declared import ModelPolicy  # lazy: the CLI need not import peer.training

    unknown = sorted(set(table) - {"allowed_layers", "max_parameters"})
    if unknown:
        raise ConfigFileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    default = ModelPolicy()
    layers = _get(table, "allowed_layers", list, where, sorted(default.allowed_layers))
    if not all(isinstance(layer, str) for layer in layers):
        raise ConfigFileError(f"{where}: 'allowed_layers' must be a list of layer class names")
    limit = _get(table, "max_parameters", int, where, default.max_parameters)
    if limit < 1:
        raise ConfigFileError(f"{where}: 'max_parameters' must be positive")
    return ModelPolicy(frozenset(layers), limit)


@dataclass(frozen=True)
class MetricsConfig:
    """The optional ``[metrics]`` table: where the Prometheus endpoint listens."""

    host: str = "127.0.0.1"
    port: int = 9464
    allow_remote: bool = False


@dataclass(frozen=True)
class PeerConfig:
    path: Path
    peer_id: str
    listen: str
    cert: Path
    key: Path
    ca: Path
    roster: Path
    crl: Path
    data_url: str
    ledger_url: str
    policy: Policy = field(default_factory=Policy)
    stage_seconds: float = 30.0
    dashboard_port: int = 8050
    payload_file: Path | None = None  # test hook: a .npy vector this peer contributes
    limits: Limits = field(default_factory=Limits)  # per-caller limits (peer/ratelimit.py)
    metrics: MetricsConfig | None = None  # None: no metrics endpoint (peer/metrics.py)
    # [relay] peers: for an outbound-only peer (no address in the roster), the reachable
    # peers to keep its Control stream open to, in order of preference (peer/relay.py);
    # empty: every reachable roster peer, in roster order.
    relays: tuple[str, ...] = ()
    # The [data] table: where training records come from (peer/data/sources.py); None: the
    # patient store at data_url.
    data: dict[str, Any] | None = None
    # Where the peer may write its own files (the aggregator's spool): the folder the config
    # was named in, not resolved. deploy/peer-site links a read-only kit's config into a
    # writable state folder, so the resolved path (``directory``) is the read-only kit.
    state_directory: Path | None = None

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def writable_directory(self) -> Path:
        """Where this peer writes its own files (see ``state_directory``)."""
        return self.state_directory or self.directory


def _get(
    table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...
) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigFileError(f"{where}: missing required key '{key}'")
        return default
    value = table[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigFileError(f"{where}: '{key}' must be a number, not {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigFileError(f"{where}: '{key}' must be a {names}, not {value!r}")
    return value


def _sqlite_relative(url: str, base: Path) -> str:
    # sqlite:///relative.db is relative to the process's working directory; make it relative
    # to the config file instead, so a kit works wherever the peer is started from.
    prefix = "sqlite:///"
    if "uri=true" in url or url.startswith(prefix + "file:"):
        return url  # SQLite's URI form (e.g. mode=ro) names its file itself
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str((base / url[len(prefix) :]).resolve())
    return url


def load_config(path: str | Path) -> PeerConfig:
    """Read and validate a peer's TOML configuration.

    Raises:
        ConfigFileError: naming the file, the key and the problem.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: cannot read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML: {error}") from None
    base = path.parent
    where = str(path)

    def table(name: str) -> dict[str, Any]:
        value = document.get(name, {})
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: [{name}] must be a table")
        return value

    def file(tbl: dict[str, Any], key: str, section: str, must_exist: bool = True) -> Path:
        raw = _get(tbl, key, str, f"{where} [{section}]")
        resolved: Path = (base / str(raw)).resolve()
        if must_exist and not resolved.exists():
            raise ConfigFileError(
                f"{where} [{section}]: '{key}' = {raw!r}: no such file ({resolved})"
            )
        return resolved

    peer_id = _get(document, "peer_id", str, where)
    listen = _get(document, "listen", str, where)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigFileError(f"{where}: 'listen' must be host:port, not {listen!r}")
    tls = table("tls")
    storage = table("storage")
    policy_table = dict(table("policy"))
    models_table = policy_table.pop("models", {})
    if not isinstance(models_table, dict):
        raise ConfigFileError(f"{where}: [policy.models] must be a table")
    timeouts = table("timeouts")
    ppath = f"{where} [policy]"
    policy = Policy(
        max_epsilon=float(
            _get(policy_table, "max_epsilon", (int, float), ppath, Policy.max_epsilon)
        ),
        min_participants=_get(
            policy_table, "min_participants", int, ppath, Policy.min_participants
        ),
        allowed_models=tuple(
            _get(policy_table, "allowed_models", list, ppath, list(Policy.allowed_models))
        ),
        allowed_operators=tuple(_get(policy_table, "allowed_operators", list, ppath, [])),
        allowed_peer_proposers=tuple(_get(policy_table, "allowed_peer_proposers", list, ppath, [])),
        allow_exact_payloads=_get(policy_table, "allow_exact_payloads", bool, ppath, False),
        max_proposal_bytes=_get(
            policy_table, "max_proposal_bytes", int, ppath, Policy.max_proposal_bytes
        ),
        proposals_per_minute=float(
            _get(
                policy_table,
                "proposals_per_minute",
                (int, float),
                ppath,
                Policy.proposals_per_minute,
            )
        ),
        proposal_burst=_get(policy_table, "proposal_burst", int, ppath, Policy.proposal_burst),
        max_rounds=_get(policy_table, "max_rounds", int, ppath, Policy.max_rounds),
        max_vector_length=_get(
            policy_table, "max_vector_length", int, ppath, Policy.max_vector_length
        ),
        allow_cleartext=_get(policy_table, "allow_cleartext", bool, ppath, False),
        min_paillier_key_bits=_get(
            policy_table, "min_paillier_key_bits", int, ppath, Policy.min_paillier_key_bits
        ),
        assumed_colluders_fraction=float(
            _get(
                policy_table,
                "assumed_colluders_fraction",
                (int, float),
                ppath,
                Policy.assumed_colluders_fraction,
            )
        ),
        models=_model_policy(models_table, f"{where} [policy.models]"),
    )
    if not 0 <= policy.assumed_colluders_fraction < 0.5:
        raise ConfigFileError(f"{ppath}: 'assumed_colluders_fraction' must be in [0, 0.5)")
    if policy.max_epsilon <= 0:
        raise ConfigFileError(f"{ppath}: 'max_epsilon' must be positive")
    if policy.min_participants < 3:
        raise ConfigFileError(
            f"{ppath}: 'min_participants' must be at least 3 (with 2, each learns the "
            "other's input from the sum)"
        )
    for key in ("allowed_operators", "allowed_peer_proposers", "allowed_models"):
        if not all(isinstance(item, str) for item in getattr(policy, key)):
            raise ConfigFileError(f"{ppath}: '{key}' must be a list of strings")
    if policy.max_proposal_bytes < 1024:
        raise ConfigFileError(f"{ppath}: 'max_proposal_bytes' must be at least 1024")
    if policy.proposals_per_minute <= 0 or policy.proposal_burst < 1:
        raise ConfigFileError(
            f"{ppath}: 'proposals_per_minute' must be positive and 'proposal_burst' at least 1"
        )
    stage_seconds = float(
        _get(timeouts, "stage_seconds", (int, float), f"{where} [timeouts]", 30.0)
    )
    if stage_seconds <= 0:
        raise ConfigFileError(f"{where} [timeouts]: 'stage_seconds' must be positive")
    payload = document.get("payload_file")
    data_url = _sqlite_relative(
        _get(storage, "data", str, f"{where} [storage]", "sqlite:///data.db"), base
    )
    data = table("data") if "data" in document else None
    if data is not None:
        from .data import DataError, data_source

        try:  # checks the keys now (a typo stops the peer at start, not at a session)
            data_source(data, base, data_url)
        except DataError as error:
            raise ConfigFileError(f"{where}: {error}") from None
    return PeerConfig(
        path=path.resolve(),
        state_directory=base.absolute(),
        peer_id=peer_id,
        listen=listen,
        cert=file(tls, "cert", "tls"),
        key=file(tls, "key", "tls"),
        ca=file(tls, "ca", "tls"),
        roster=file(tls, "roster", "tls"),
        crl=file(tls, "crl", "tls"),
        data_url=data_url,
        ledger_url=_sqlite_relative(
            _get(storage, "ledger", str, f"{where} [storage]", "sqlite:///ledger.db"), base
        ),
        policy=policy,
        stage_seconds=stage_seconds,
        dashboard_port=_get(document, "dashboard_port", int, where, 8050),
        payload_file=(base / payload).resolve() if isinstance(payload, str) else None,
        limits=_limits(table("limits"), f"{where} [limits]"),
        metrics=_metrics(document, f"{where} [metrics]"),
        relays=tuple(str(p) for p in _get(table("relay"), "peers", list, f"{where} [relay]", [])),
        data=data,
    )


def _metrics(document: dict[str, Any], where: str) -> MetricsConfig | None:
    """The optional ``[metrics]`` table; ``None`` when absent (no endpoint)."""
    if "metrics" not in document:
        return None
    tbl = document["metrics"]
    if not isinstance(tbl, dict):
        raise ConfigFileError(f"{where}: [metrics] must be a table")
    listen = _get(tbl, "listen", str, where, "127.0.0.1:9464")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigFileError(f"{where}: 'listen' must be host:port, not {listen!r}")
    return MetricsConfig(
        host=host, port=int(port), allow_remote=_get(tbl, "allow_remote", bool, where, False)
    )


def _limits(tbl: dict[str, Any], where: str) -> Limits:
    """The optional ``[limits]`` table (every key optional; see :class:`Limits`)."""
    hello = _get(tbl, "hello_seconds", (int, float), where, 0.0)
    limits = Limits(
        reads_per_second=float(
            _get(tbl, "reads_per_second", (int, float), where, Limits.reads_per_second)
        ),
        reads_burst=_get(tbl, "reads_burst", int, where, Limits.reads_burst),
        hello_seconds=float(hello) if hello else None,
        trust_poll_seconds=float(
            _get(tbl, "trust_poll_seconds", (int, float), where, Limits.trust_poll_seconds)
        ),
    )
    if limits.reads_per_second <= 0 or limits.reads_burst < 1 or limits.trust_poll_seconds <= 0:
        raise ConfigFileError(
            f"{where}: reads_per_second and trust_poll_seconds must be positive, "
            "reads_burst at least 1"
        )
    return limits
