"""The site configuration a hospital's IT writes once: `SITE.toml`.

Every command (`datasite-setup`, `datasite-admin`) reads the same file, so scripts and people
share one source of truth. Errors name the file and the key, and say what to write instead.

Example::

    [site]
    name = "hospital-a"
    host = "127.0.0.1"
    port = 8081
    data_dir = "hospital-a-data"        # relative to this file
    # db_url = "postgresql://user:pw@db:5432/hospital_a"   # default: SQLite in data_dir
    # allow_custom_code = false
    # custom_code_max_values = 16                     # named floats one custom-code run may return
    # enabled_tasks = ["local_train", "evaluate"]        # default: every installed site task

    [admin]
    email = "admin@hospital-a.example"  # password: $DATASITE_ADMIN_PASSWORD, else generated

    [[data_scientists]]
    email = "ds@uni.example"
    name = "A. Researcher"
    password_env = "DS_PASSWORD"        # optional; else generated into data_dir (0600)

    [privacy]                           # what may leave (datasite_setup/disclosure/)
    min_cohort = 5                      # fewest values behind any released group, bin or release difference
    min_batch = 8                       # fewest samples behind one training step (local_train)
    dp_epsilon_budget = 10.0            # epsilon per data scientist for differentially private
                                        # requests, charged before each run
    # filters = ["min_count", "noise", "histogram_bins", "release_ledger"]   # default: all, in this order

    # [privacy.update_dp]               # optional: every model update leaves clipped and noised
    # noise_multiplier = 2.0            # noise std per coordinate = noise_multiplier x clip norm
    # clip_norm = 1.0                   # L2 bound on an update; a request may choose its own (dp_clip)
    # delta = 1e-5                      # the delta its epsilons (RDP-composed, charged to the budget) hold at
    # clip_bit_noise = 2.0              # adaptive clipping: release "within the clip" with this noise
    # [privacy.sample_dp]               # optional, instead: every training run is DP-SGD (per sample)
    # noise_multiplier = 1.0            # noise std on each step's sum = noise_multiplier x max_grad_norm
    # max_grad_norm = 1.0               # each sample's gradient clipped to this L2 norm
    # delta = 1e-5
    # [privacy.evaluation_dp]           # optional: every evaluation leaves noised (a model is a query on labels)
    # noise_multiplier = 4.0            # per evaluation; counts scaled by what one case can add (domain bounds)
    # delta = 1e-5                      # as update_dp's / sample_dp's when both are set

    # [secure_aggregation]              # optional: model updates leave only masked, summable with peers'
    # peers = { hospital-b = "<64 hex: its datasite-admin secure-aggregation-key>" }
    # min_participants = 3              # fewest sites (this one included) in a session
    # required = true                   # refuse training without a secure-aggregation session

    [cases]                             # the case store (data_dir/case_store)
    split_fractions = { train = 0.7, validation = 0.1, test = 0.2 }   # per patient, fixed by a keyed hash;
                                        # change it before the first ingestion, never after

    [execution]                         # limits for each approved run (isolated child process)
    cpu_seconds = 1800
    wall_seconds = 1800
    memory_mb = 6144
    max_threads = 64                    # live threads of a run, counted by the kernel (root too)
    thread_cgroup = true                # count them in a pids cgroup per run where the server may
                                        # make one (free); false: the server approves each thread
    max_open_files = 256                # RLIMIT_NOFILE
    max_result_mb = 256                 # largest result a run may send back
    fork_server = true                  # runs forked from one process that did their imports
                                        # (~450 MB once; a run starts in ~0.1 s instead of
                                        # 2-9 s); false starts every run cold
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasite_setup.case_splits import DEFAULT_FRACTIONS, check_fractions
from datasite_setup.disclosure import FILTERS, EvaluationNoise, SampleNoise, UpdateNoise

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class SiteConfigError(ValueError):
    """A site config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class DataScientist:
    email: str
    name: str
    password_env: str | None = None
    institution: str = ""


@dataclass(frozen=True)
class PrivacySettings:
    min_cohort: int = 5
    min_batch: int = 8
    dp_epsilon_budget: float = 10.0
    filters: tuple[str, ...] = FILTERS
    update_dp: UpdateNoise | None = None  # [privacy.update_dp]: every model update leaves clipped and noised
    sample_dp: SampleNoise | None = None  # [privacy.sample_dp]: every training run is DP-SGD
    evaluation_dp: EvaluationNoise | None = None  # [privacy.evaluation_dp]: every evaluation leaves noised


@dataclass(frozen=True)
class SecureAggregationSettings:
    """[secure_aggregation]: model updates leave masked, summable only with the pinned peers' (see
    datasite_setup/secure_aggregation/); `required` refuses training without a session."""

    peers: dict[str, str]  # peer site name -> its Ed25519 identity (hex), exchanged out of band
    min_participants: int = 3  # fewest sites, this one included, a session must have
    required: bool = True


@dataclass(frozen=True)
class ExecutionLimits:
    """Per-run limits for approved code (the isolated child process; `isolation.Limits` says how each holds)."""

    cpu_seconds: int = 1800
    wall_seconds: float = 1800.0
    memory_mb: int = 6144
    max_threads: int = 64
    max_open_files: int = 256
    max_result_mb: int = 256
    thread_cgroup: bool = True


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    name: str
    host: str
    port: int
    data_dir: Path
    admin_email: str
    admin_name: str
    admin_password_env: str
    db_url: str | None = None
    allow_custom_code: bool = False
    custom_code_max_values: int = 16  # each a float64 (64 bits): bounds what one custom-code run carries
    data_scientists: tuple[DataScientist, ...] = ()
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    limits: ExecutionLimits = field(default_factory=ExecutionLimits)
    enabled_tasks: tuple[str, ...] | None = None  # None: every site task this install provides
    fork_server: bool = True
    split_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    secure_aggregation: SecureAggregationSettings | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"


def _require(table: dict[str, Any], key: str, kind: type, where: str, path: Path) -> Any:
    if key not in table:
        raise SiteConfigError(f"{path}: missing key '{where}.{key}'; add it (see datasite_setup/site_config.py for an example)")
    return _typed(table[key], kind, f"{where}.{key}", path)


def _typed(value: Any, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise SiteConfigError(f"{path}: '{where}' must be a {names}, got {value!r}")
    return value


def _check_email(email: str, where: str, path: Path) -> str:
    if not _EMAIL.match(email):
        raise SiteConfigError(f"{path}: '{where}' is not an e-mail address: {email!r}")
    return email


def _privacy_settings(privacy: dict[str, Any], path: Path) -> PrivacySettings:
    """The [privacy] table: thresholds and which disclosure filters the site applies."""
    defaults = PrivacySettings()
    min_cohort = _typed(privacy.get("min_cohort", defaults.min_cohort), int, "privacy.min_cohort", path)
    if min_cohort < 1:
        raise SiteConfigError(f"{path}: 'privacy.min_cohort' must be at least 1, got {min_cohort}")
    min_batch = _typed(privacy.get("min_batch", defaults.min_batch), int, "privacy.min_batch", path)
    if min_batch < 1:
        raise SiteConfigError(f"{path}: 'privacy.min_batch' must be at least 1, got {min_batch}")
    budget = _typed(privacy.get("dp_epsilon_budget", defaults.dp_epsilon_budget), (int, float), "privacy.dp_epsilon_budget", path)
    if not 0 <= budget < float("inf"):
        raise SiteConfigError(f"{path}: 'privacy.dp_epsilon_budget' must be a finite number >= 0 (0 refuses every "
                              f"differentially private request), got {budget}")
    filters = privacy.get("filters", list(defaults.filters))
    if not (isinstance(filters, list) and all(isinstance(f, str) for f in filters)):
        raise SiteConfigError(f"{path}: 'privacy.filters' must be a list of filter names, got {filters!r}")
    unknown = [f for f in filters if f not in FILTERS]
    if unknown:
        raise SiteConfigError(f"{path}: 'privacy.filters' names unknown filter(s) {unknown}; known: {', '.join(FILTERS)}")
    update_dp = sample_dp = None
    if "update_dp" in privacy:
        update_dp = UpdateNoise(**_dp_table(privacy["update_dp"], "update_dp", ("noise_multiplier", "clip_norm"),
                                            ("delta", "clip_bit_noise"), path))
    if "sample_dp" in privacy:
        sample_dp = SampleNoise(**_dp_table(privacy["sample_dp"], "sample_dp", ("noise_multiplier", "max_grad_norm"),
                                            ("delta",), path))
    if update_dp is not None and sample_dp is not None:
        raise SiteConfigError(f"{path}: 'privacy.update_dp' and 'privacy.sample_dp' are alternatives; keep one")
    evaluation_dp = None
    if "evaluation_dp" in privacy:
        evaluation_dp = EvaluationNoise(**_dp_table(privacy["evaluation_dp"], "evaluation_dp", ("noise_multiplier",), ("delta",), path))
        training = update_dp or sample_dp
        if training is not None and training.delta != evaluation_dp.delta:
            raise SiteConfigError(f"{path}: 'privacy.evaluation_dp.delta' must equal the training one ({training.delta:g}): "
                                  "one accountant composes both at one delta")
    return PrivacySettings(min_cohort=min_cohort, min_batch=min_batch, dp_epsilon_budget=float(budget),
                           filters=tuple(f for f in FILTERS if f in filters), update_dp=update_dp, sample_dp=sample_dp,
                           evaluation_dp=evaluation_dp)


def _dp_table(table: Any, name: str, required: tuple[str, ...], optional: tuple[str, ...], path: Path) -> dict[str, float]:
    """A [privacy.update_dp], [privacy.sample_dp] or [privacy.evaluation_dp] table: positive finite
    numbers, delta in (0, 1)."""
    table = _typed(table, dict, f"privacy.{name}", path)
    unknown = sorted(set(table) - set(required) - set(optional))
    if unknown:
        raise SiteConfigError(f"{path}: 'privacy.{name}' has unknown key(s) {unknown}; known: {', '.join(required + optional)}")
    values: dict[str, float] = {}
    for key in required + optional:
        if key not in table:
            if key in required:
                raise SiteConfigError(f"{path}: missing key 'privacy.{name}.{key}'; add it (see datasite_setup/site_config.py)")
            continue
        value = float(_typed(table[key], (int, float), f"privacy.{name}.{key}", path))
        if not 0 < value < float("inf") or (key == "delta" and value >= 1):
            bound = "in (0, 1)" if key == "delta" else "a finite number > 0"
            raise SiteConfigError(f"{path}: 'privacy.{name}.{key}' must be {bound}, got {table[key]!r}")
        values[key] = value
    return values


def _secure_aggregation(table: dict[str, Any], own_name: str, path: Path) -> SecureAggregationSettings:
    """The [secure_aggregation] table: the peers' pinned identities and the session rules."""
    known = {"peers", "min_participants", "required"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise SiteConfigError(f"{path}: 'secure_aggregation' has unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    peers = _typed(table.get("peers", {}), dict, "secure_aggregation.peers", path)
    for peer, key in peers.items():
        if peer == own_name or not _SITE_NAME.match(peer):
            raise SiteConfigError(f"{path}: 'secure_aggregation.peers' names '{peer}': a peer is another site's name")
        if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key)):
            raise SiteConfigError(f"{path}: 'secure_aggregation.peers.{peer}' must be the 64 hex digits that site's "
                                  "`datasite-admin secure-aggregation-key` prints")
    minimum = _typed(table.get("min_participants", 3), int, "secure_aggregation.min_participants", path)
    if not 2 <= minimum <= len(peers) + 1:
        raise SiteConfigError(f"{path}: 'secure_aggregation.min_participants' must be 2 to {len(peers) + 1} "
                              f"(this site and its {len(peers)} pinned peers), got {minimum}")
    required = _typed(table.get("required", True), bool, "secure_aggregation.required", path)
    return SecureAggregationSettings(peers=dict(peers), min_participants=minimum, required=required)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate SITE.toml; relative paths are resolved against the file's folder."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SiteConfigError(f"{path}: no such site config; create one (see datasite_setup/site_config.py)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path}: not valid TOML: {exc}") from exc

    if "site" not in raw:
        raise SiteConfigError(f"{path}: missing table [site] with the site's name, port and data_dir")
    site = _typed(raw["site"], dict, "site", path)
    name = _require(site, "name", str, "site", path)
    if not _SITE_NAME.match(name):
        raise SiteConfigError(f"{path}: 'site.name' must be lower-case letters, digits and '-', got {name!r}")
    port = _require(site, "port", int, "site", path)
    if not 1 <= port <= 65535:
        raise SiteConfigError(f"{path}: 'site.port' must be 1-65535, got {port}")
    host = _typed(site.get("host", "127.0.0.1"), str, "site.host", path)
    data_dir = (path.parent / _require(site, "data_dir", str, "site", path)).resolve()
    db_url = site.get("db_url")
    if db_url is not None and not str(db_url).startswith(("postgresql://", "sqlite://")):
        raise SiteConfigError(f"{path}: 'site.db_url' must start with postgresql:// or sqlite://, got {db_url!r}")
    allow_custom = _typed(site.get("allow_custom_code", False), bool, "site.allow_custom_code", path)
    custom_values = _typed(site.get("custom_code_max_values", 16), int, "site.custom_code_max_values", path)
    if not 1 <= custom_values <= 64:
        raise SiteConfigError(f"{path}: 'site.custom_code_max_values' must be 1 to 64, got {custom_values}")

    if "admin" not in raw:
        raise SiteConfigError(f"{path}: missing table [admin] with the clinic admin's e-mail")
    admin = _typed(raw["admin"], dict, "admin", path)
    admin_email = _check_email(_require(admin, "email", str, "admin", path), "admin.email", path)

    scientists = []
    for i, entry in enumerate(_typed(raw.get("data_scientists", []), list, "data_scientists", path)):
        where = f"data_scientists[{i}]"
        entry = _typed(entry, dict, where, path)
        email = _check_email(_require(entry, "email", str, where, path), f"{where}.email", path)
        if email == admin_email:
            raise SiteConfigError(f"{path}: '{where}.email' equals the admin's; a data scientist needs her own account")
        scientists.append(
            DataScientist(
                email=email,
                name=_require(entry, "name", str, where, path),
                password_env=entry.get("password_env"),
                institution=str(entry.get("institution", "")),
            )
        )
    emails = [s.email for s in scientists]
    if len(set(emails)) != len(emails):
        raise SiteConfigError(f"{path}: a data scientist's e-mail appears twice in [[data_scientists]]")

    privacy = _privacy_settings(_typed(raw.get("privacy", {}), dict, "privacy", path), path)

    execution = _typed(raw.get("execution", {}), dict, "execution", path)
    defaults = ExecutionLimits()
    caps = {}
    for key, low, high in (("max_threads", 4, 4096), ("max_open_files", 32, 65536), ("max_result_mb", 1, 4096)):
        caps[key] = _typed(execution.get(key, getattr(defaults, key)), int, f"execution.{key}", path)
        if not low <= caps[key] <= high:
            raise SiteConfigError(f"{path}: 'execution.{key}' must be {low} to {high}, got {caps[key]}")
    limits = ExecutionLimits(
        cpu_seconds=_typed(execution.get("cpu_seconds", defaults.cpu_seconds), int, "execution.cpu_seconds", path),
        wall_seconds=float(_typed(execution.get("wall_seconds", defaults.wall_seconds), (int, float), "execution.wall_seconds", path)),
        memory_mb=_typed(execution.get("memory_mb", defaults.memory_mb), int, "execution.memory_mb", path),
        thread_cgroup=_typed(execution.get("thread_cgroup", defaults.thread_cgroup), bool, "execution.thread_cgroup", path),
        **caps,
    )
    if "warm_spares" in execution:
        raise SiteConfigError(f"{path}: 'execution.warm_spares' is no longer read: runs are forked from one process "
                              "that did their imports; write 'fork_server = true' (or false to start every run cold)")
    fork_server = _typed(execution.get("fork_server", True), bool, "execution.fork_server", path)
    cases = _typed(raw.get("cases", {}), dict, "cases", path)
    fractions = _typed(cases.get("split_fractions", DEFAULT_FRACTIONS), dict, "cases.split_fractions", path)
    try:
        fractions = check_fractions(fractions)
    except (TypeError, ValueError) as exc:
        raise SiteConfigError(f"{path}: 'cases.split_fractions': {exc}") from None
    tasks = site.get("enabled_tasks")
    if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise SiteConfigError(f"{path}: 'site.enabled_tasks' must be a list of task names, got {tasks!r}")
    secure_aggregation = None
    if "secure_aggregation" in raw:
        secure_aggregation = _secure_aggregation(_typed(raw["secure_aggregation"], dict, "secure_aggregation", path), name, path)

    return SiteConfig(
        path=path,
        name=name,
        host=host,
        port=port,
        data_dir=data_dir,
        admin_email=admin_email,
        admin_name=str(admin.get("name", "Clinic admin")),
        admin_password_env=str(admin.get("password_env", "DATASITE_ADMIN_PASSWORD")),
        db_url=db_url,
        allow_custom_code=allow_custom,
        custom_code_max_values=custom_values,
        data_scientists=tuple(scientists),
        privacy=privacy,
        limits=limits,
        fork_server=fork_server,
        split_fractions=fractions,
        enabled_tasks=None if tasks is None else tuple(tasks),
        secure_aggregation=secure_aggregation,
    )
