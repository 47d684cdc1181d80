"""config.yaml -> one frozen, validated :class:`Config`.

Loaded once at start-up and passed explicitly; defaults live only on these models.
Every validation error names its YAML path (``rules[0].match.Modality``) so an admin
can fix the file without reading code.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from workers.outputs import OutputProfile

__all__ = [
    "AETitle",
    "Completion",
    "Config",
    "ConfigError",
    "Delivery",
    "Destination",
    "MatchCondition",
    "NodeSettings",
    "Peer",
    "ResultSettings",
    "Rule",
    "WorkerSettings",
    "folder_problems",
    "load_config",
    "model_problems",
]

_AE_TITLE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")  # default character repertoire, no "\"


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"AE title must be at most 16 characters. Found {len(stripped)}.")
    if not _AE_TITLE_CHARS.match(stripped):
        raise ValueError("AE title may hold only printable ASCII characters other than '\\'")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_TlsT = TypeVar("_TlsT", "ClientTls", "NodeTls")


class ClientTls(_Frozen):
    """TLS to a destination (:func:`node.tls.client_context`)."""

    ca_certificates: Path
    """Trust anchors for the destination's certificate (PEM)."""
    certificate: Path | None = None
    """Our certificate (PEM), for a destination that wants one (mutual TLS)."""
    private_key: Path | None = None

    @model_validator(mode="after")
    def _certificate_with_key(self) -> ClientTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: give both or neither")
        return self


class NodeTls(_Frozen):
    """DICOM over TLS on the SCP's port (:func:`node.tls.server_context`)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path
    """Trust anchors for the peers' certificates (PEM)."""
    require_client_certificate: bool = True
    plain_port: Port | None = None
    """A second port without TLS, for peers that cannot speak it."""


class NodeSettings(_Frozen):
    """This node on the network, and where it keeps its data."""

    ae_title: AETitle = "PACSNODE"
    port: Port = 11112
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("./data")
    max_pdu_bytes: int = Field(default=0, ge=0)
    """Largest PDU we accept; 0 means unlimited (fastest for large images)."""
    max_associations: int = Field(default=32, ge=1)
    """Associations served at once; one more is rejected (transient, local limit)."""
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    """Longest wait for an association request, release or abort."""
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    """Longest wait for the rest of a DIMSE message (a C-STORE's data)."""
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    """An association silent this long is aborted; a PDU that stops arriving for this
    long closes its connection."""
    fast_transport: bool = True
    """pacsnode's faster acceptor (:mod:`node.transport`); false: pynetdicom's own."""
    tls: NodeTls | None = None
    """DICOM over TLS on ``port``; absent: plain DICOM."""


#: The disk guard when ``storage:`` sets neither threshold: the larger of the two.
DEFAULT_MIN_FREE_BYTES = 2 * 1024**3
DEFAULT_MIN_FREE_PERCENT = 5.0


class StorageSettings(_Frozen):
    """The disk guard (:mod:`node.disk_guard`): below this much free space on the data
    folder's file system new instances are refused (Out of Resources); jobs and
    deliveries go on. Neither set: 5 % or 2 GiB, whichever is larger; one or both set:
    the larger of those set."""

    min_free_bytes: int | None = Field(default=None, ge=0)
    min_free_percent: float | None = Field(default=None, ge=0, le=100)

    def threshold_bytes(self, total_bytes: int) -> int:
        """The free space below which instances are refused, on a disk of ``total_bytes``."""
        if self.min_free_bytes is None and self.min_free_percent is None:
            return max(DEFAULT_MIN_FREE_BYTES, int(total_bytes * DEFAULT_MIN_FREE_PERCENT / 100))
        return max(
            self.min_free_bytes or 0, int(total_bytes * (self.min_free_percent or 0.0) / 100)
        )


class RetentionSettings(_Frozen):
    """How long an idle study's data stays (:mod:`node.retention`); null keeps it."""

    inputs_days: float | None = Field(default=7.0, gt=0)
    """Spooled instances of a study whose jobs were delivered."""
    results_days: float | None = Field(default=30.0, gt=0)
    """Each job's result files (SEG, SR, overlays) of a delivered study."""
    failed_days: float | None = Field(default=14.0, gt=0)
    """Inputs and results of a study a job failed on, or that no model ran on."""
    records_days: float | None = Field(default=90.0, gt=0)
    """Every state DB row of the study (and any file left)."""
    interval_minutes: float = Field(default=60.0, gt=0)
    """How often ``pacsnode run`` makes a cleanup pass (the first a minute after start)."""


class AuditSettings(_Frozen):
    """The audit trail (:mod:`node.audit`): ``<data_dir>/audit/audit.jsonl``."""

    syslog: str | None = None
    """Also send each record to syslog (RFC 5424): ``udp://host:514`` or ``tcp://host:514``."""
    max_bytes: int = Field(default=100 * 1024**2, ge=4096)
    """The file is rotated (``audit.jsonl.1``, ...) when it would grow beyond this."""
    keep_files: int = Field(default=10, ge=1)
    """Rotated files kept; the oldest goes."""

    @field_validator("syslog")
    @classmethod
    def _syslog_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(udp|tcp)://[^:/]+(:\d+)?$", value):
            raise ValueError(f"syslog must be udp://host:port or tcp://host:port. Found {value!r}.")
        return value


class HttpSettings(_Frozen):
    """The web console, JSON API, health checks and metrics (:mod:`node.console`)."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    """Local only by default: the pages show patient IDs and names."""
    port: Port = 8080
    token_file: Path | None = None
    """The bearer token the actions need (retry, cancel, re-send); created with mode
    0600 if missing. Default: ``console.token`` in the data folder."""


class Peer(_Frozen):
    """A DICOM peer allowed to associate with us (a scanner or a PACS)."""

    ae_title: AETitle
    host: str
    complete_on_release: bool = False
    """The peer sends whole studies in one association (a PACS or router): when it
    releases the association normally, every series it carried is complete at once."""
    max_associations: int | None = Field(default=None, ge=1)
    """Associations this peer may hold at once (besides ``node.max_associations``);
    one more is rejected (transient, local limit)."""
    certificate_subject: str | None = None
    """Pin: the peer's TLS certificate must have this subject, in RFC 4514 form as
    ``openssl x509 -noout -subject -nameopt RFC2253`` prints it (``CN=ct1,O=Hospital``)."""
    certificate_sha256: str | None = None
    """Pin: the SHA-256 fingerprint of the peer's TLS certificate, hex (colons allowed),
    as ``openssl x509 -noout -fingerprint -sha256`` prints it."""

    @field_validator("certificate_subject")
    @classmethod
    def _subject_is_rfc4514(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from cryptography import x509  # only a config that pins pays the import

        try:
            return x509.Name.from_rfc4514_string(value.removeprefix("subject=")).rfc4514_string()
        except ValueError:
            raise ValueError(
                "certificate_subject must be an RFC 4514 name, upper-case attribute types "
                f"and no spaces after the commas, e.g. 'CN=ct1,O=Hospital'; found {value!r}"
            ) from None

    @field_validator("certificate_sha256")
    @classmethod
    def _fingerprint_is_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.split("=")[-1].replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digits):
            raise ValueError(
                "certificate_sha256 must be 64 hex digits (colons allowed), as "
                f"'openssl x509 -noout -fingerprint -sha256' prints it; found {value!r}"
            )
        return digits

    @property
    def pins_certificate(self) -> bool:
        return self.certificate_subject is not None or self.certificate_sha256 is not None

    @field_validator("host")
    @classmethod
    def _host_is_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(
                f"peer host must be an IP address (we compare it with the caller's); "
                f"found {value!r}"
            ) from exc
        return value


class Destination(OutputProfile):
    """A DICOM node we send results to by C-STORE, and what it receives
    (:class:`workers.outputs.OutputProfile`: seg, omit_empty_frames, send_empty_seg, sr,
    overlays)."""

    ae_title: AETitle
    host: str
    port: Port
    supersede: Literal["none", "rejection_note"] = "none"
    """When a new version of a job's results replaces one this destination received:
    ``none`` sends only the new version; ``rejection_note`` also sends an IHE IOCM
    rejection note (KOS, "Rejected for Quality Reasons") listing the old objects."""
    tls: ClientTls | None = None
    """DICOM over TLS to this destination; absent: plain DICOM."""

    @property
    def profile(self) -> OutputProfile:
        """What this destination receives, without where it is."""
        return OutputProfile.model_validate(
            self.model_dump(include=set(OutputProfile.model_fields))
        )


class ResultSettings(_Frozen):
    """What every result object shares.

    ``series_description`` may use ``{model}`` (the model name) and ``{kind}`` (SEG, SR
    or Overlay); ``notice`` (e.g. NOT FOR CLINICAL USE) is appended to every result's
    series description and burned into overlay images; empty for none.
    """

    series_description: str = Field(default="{model} {kind}", min_length=1)
    notice: str = Field(default="NOT FOR CLINICAL USE", max_length=40)
    seg_series_number: int = Field(default=901, ge=1)
    sr_series_number: int = Field(default=902, ge=1)
    overlay_series_number: int = Field(default=903, ge=1)
    rejection_series_number: int = Field(default=904, ge=1)

    @field_validator("series_description")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            value.format(model="m", kind="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"series_description may use only {{model}} and {{kind}}. Found {value!r}."
            ) from exc
        return value


class Completion(_Frozen):
    """When a series counts as complete, and what data arriving after that does.

    ``late: rerun``: instances or series that arrive after their study was routed
    re-open it; after the quiet period the study is routed again as a whole and a job
    whose input changed runs again as a new version. ``late: keep``: late instances are
    kept and counted but not processed, and a late series is routed on its own.
    """

    quiet_seconds: float = Field(default=10.0, gt=0)
    late: Literal["rerun", "keep"] = "rerun"


class Delivery(_Frozen):
    """How hard the sender tries before giving up on a destination."""

    first_retry_seconds: float = Field(default=5.0, gt=0)
    max_retry_interval_seconds: float = Field(default=300.0, gt=0)
    give_up_after_seconds: float = Field(default=86400.0, gt=0)
    network_timeout_seconds: float = Field(default=30.0, gt=0)


class WorkerSettings(_Frozen):
    """Workers started by ``pacsnode run`` (embedded) or ``pacsnode worker``."""

    concurrency: int = Field(default=1, ge=1)
    """Jobs whose models run at once (one per GPU whatever this says)."""
    overlap: bool = True
    """Overlap each model's job with the loading of the next and the writing of the
    previous one (three job processes per model slot, :mod:`workers.stages`)."""
    preload: bool = True
    """Decode a series while its quiet period runs, so that its job starts with the
    volume loaded (the node hints the worker once the series is silent for a moment;
    the worker keeps up to two decoded series in shared memory, :mod:`workers.inputs`)."""
    job_timeout_seconds: float = Field(default=3600.0, gt=0)
    """A job running longer than this is dispatched again (the worker is presumed lost)."""
    lease_seconds: float = Field(default=10.0, ge=1)
    """A running job renews a lease this long; one not renewed for this long has lost
    its worker and is dispatched again (:mod:`workers.lease`)."""
    max_attempts: int = Field(default=3, ge=1)


class MatchCondition(_Frozen):
    """One attribute test in a rule; exactly one of the fields is set.

    In YAML a plain value is shorthand for ``{equals: value}``.
    """

    equals: str | float | None = None
    regex: str | None = None
    contains: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str | int | float) and not isinstance(data, bool):
            return {"equals": data}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> MatchCondition:
        kinds = [
            name
            for name, value in (
                ("equals", self.equals),
                ("regex", self.regex),
                ("contains", self.contains),
            )
            if value is not None
        ]
        ranged = self.min is not None or self.max is not None
        if len(kinds) + int(ranged) != 1:
            raise ValueError(
                "a condition needs exactly one of: a value, {regex: ...}, {contains: ...} "
                "or {min: ..., max: ...}"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {self.regex!r}: {exc}") from exc
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Rule(_Frozen):
    """Series that match ``match`` go to ``models``; results go to ``send_to``.

    ``mode: shadow`` runs the models and keeps their results (``pacsnode jobs``,
    ``pacsnode render``) but sends nothing: a model's silent trial before it goes live.
    """

    name: str = Field(min_length=1)
    match: dict[str, MatchCondition] = Field(default_factory=dict)
    min_instances: int = Field(default=1, ge=1)
    models: list[str] = Field(min_length=1)
    send_to: list[str] = Field(default_factory=list)
    mode: Literal["live", "shadow"] = "live"

    @model_validator(mode="before")
    @classmethod
    def _min_instances_inside_match(cls, data: Any) -> Any:
        # `min_instances` reads naturally inside `match:`; accept it there too.
        if isinstance(data, dict) and isinstance(data.get("match"), dict):
            match = dict(data["match"])
            if "min_instances" in match:
                data = {**data, "match": match, "min_instances": match.pop("min_instances")}
        return data

    @field_validator("match")
    @classmethod
    def _keywords_are_dicom(cls, value: dict[str, MatchCondition]) -> dict[str, MatchCondition]:
        from pydicom.datadict import tag_for_keyword

        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
        return value


_REDIS_URL = re.compile(r"^(redis|rediss|redis\+socket)://")


class Config(_Frozen):
    """The whole of config.yaml."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    peers: list[Peer] = Field(default_factory=list)
    accept_unknown_peers: bool = False
    destinations: dict[str, Destination] = Field(default_factory=dict)
    results: ResultSettings = Field(default_factory=ResultSettings)
    completion: Completion = Field(default_factory=Completion)
    rules: list[Rule] = Field(default_factory=list)
    broker: str = "embedded"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: Delivery = Field(default_factory=Delivery)
    models_dir: Path = Path("./models")
    """Model folders (bundles, TorchScript with a pacsnode.yaml) besides the built-in
    models; relative to the config file."""

    @field_validator("broker")
    @classmethod
    def _broker_kind(cls, value: str) -> str:
        if value != "embedded" and not _REDIS_URL.match(value):
            raise ValueError(f"broker must be 'embedded' or a redis:// URL. Found {value!r}.")
        return value

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        """Rules must name destinations that exist, and each rule name is used once; a
        peer pins a certificate only with TLS on. One line per problem, each starting with its YAML path (see ``_format_errors``).
        Models are checked once the models folder is known (:func:`model_problems`)."""
        problems: list[str] = []
        for index, peer in enumerate(self.peers):
            if peer.pins_certificate and self.node.tls is None:
                problems.append(
                    f"peers[{index}]: {peer.ae_title} pins a TLS certificate, but node.tls "
                    "is not set (only a TLS peer has one)"
                )
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            where = f"rules[{index}]"
            if rule.name in seen:
                problems.append(f"{where}.name: rule name {rule.name!r} is used twice")
            seen.add(rule.name)
            for destination in rule.send_to:
                if destination not in self.destinations:
                    defined = ", ".join(sorted(self.destinations)) or "none"
                    problems.append(
                        f"{where}.send_to: rule {rule.name!r} sends to {destination!r}, which "
                        f"is not under destinations; defined: {defined}"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when ``pacsnode run`` starts its own Redis and worker."""
        return self.broker == "embedded"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the log, with broker credentials hidden."""
        data = self.model_dump(mode="json")
        data["broker"] = re.sub(r"//[^@/]*@", "//***@", self.broker)
        return data


def model_problems(config: Config) -> list[str]:
    """What keeps the rules' models from running, one line each, starting with the YAML
    path: a rule naming an unknown model or one that cannot run here."""
    from models.registry import available_models

    known_models = available_models()
    problems: list[str] = []
    for index, rule in enumerate(config.rules):
        where = f"rules[{index}].models"
        for model in rule.models:
            if model not in known_models:
                problems.append(
                    f"{where}: rule {rule.name!r} names model {model!r}, which does "
                    f"not exist; available: {', '.join(sorted(known_models))}"
                )
            elif (missing := known_models[model].missing_requirements()) is not None:
                problems.append(f"{where}: model {model!r} cannot run here: {missing}")
            elif known_models[model].inputs:
                from node.rules import input_conditions

                try:
                    input_conditions(known_models[model].inputs)
                except ValueError as exc:
                    problems.append(f"{where}: model {model!r}: pacsnode.yaml {exc}")
    return problems


def folder_problems(config: Config) -> list[str]:
    """Broken folders in ``models_dir`` that no rule names (a bad pacsnode.yaml or
    bundle, a name another model has), one line each with the file and field.
    ``pacsnode check-config`` fails on them; a running node only warns, so one
    half-copied folder does not stop the others."""
    from models.registry import model_entries, refused_folders

    used = {model for rule in config.rules for model in rule.models}
    problems = [
        f"models_dir: model {entry.cls.name!r}: {entry.problem}"
        for entry in model_entries()
        if entry.problem is not None
        and entry.cls.name not in used
        and not entry.source.startswith("built in")
    ]
    problems.extend(f"models_dir: {reason}" for reason in refused_folders().values())
    return problems


def bundle_build_problems(config: Config) -> list[str]:
    """Bundles running their own chain whose transforms, inferer or evaluator MONAI
    cannot build (imports MONAI, so only ``pacsnode check-config`` asks)."""
    from models.registry import model_entries

    used = {model for rule in config.rules for model in rule.models}
    problems = []
    for entry in model_entries():
        check = getattr(entry.cls, "runtime_problem", None)
        if entry.problem is None and check is not None and (problem := check()) is not None:
            used_by = " (named by a rule)" if entry.cls.name in used else ""
            problems.append(f"models_dir: model {entry.cls.name!r}{used_by}: {problem}")
    return problems


class ConfigError(Exception):
    """config.yaml is unreadable or invalid; ``errors`` holds one line per problem."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__(f"{path}: " + "; ".join(errors))


def _yaml_path(loc: tuple[int | str, ...]) -> str:
    """("rules", 0, "match") -> "rules[0].match"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _format_errors(error: ValidationError) -> Iterator[str]:
    for item in error.errors():
        loc = tuple(
            part
            for part in item["loc"]
            if not (isinstance(part, str) and part.startswith(("function-", "str", "float", "int")))
        )
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of the configuration)"
        if not loc:
            # Whole-file checks already start each line with its own path.
            yield from message.splitlines()
        else:
            yield f"{_yaml_path(loc)}: {message}"


def load_config(path: Path) -> Config:
    """Read and validate a config file, and point the model registry at its
    ``models_dir``.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or does not validate; every problem is listed
        with its YAML path.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the top level must be a mapping of settings"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, list(_format_errors(exc))) from exc
    if not config.node.data_dir.is_absolute():
        # Relative data folders are relative to the config file, not to the current directory.
        node = config.node.model_copy(
            update={"data_dir": (path.parent / config.node.data_dir).resolve()}
        )
        config = config.model_copy(update={"node": node})
    config = config.model_copy(update={"models_dir": (path.parent / config.models_dir).resolve()})
    token_file = config.http.token_file or config.node.data_dir / "console.token"
    http = config.http.model_copy(update={"token_file": (path.parent / token_file).resolve()})
    config = config.model_copy(update={"http": http})
    from models.registry import use_models_dir

    use_models_dir(config.models_dir)  # this process's models: built in and models_dir
    config = _resolve_tls_paths(config, path.parent)
    problems = model_problems(config) + _tls_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _resolve_tls_paths(config: Config, base: Path) -> Config:
    """TLS files relative to the config file, as the other paths."""

    def resolved(tls: _TlsT) -> _TlsT:
        update = {
            key: (base / value).resolve()
            for key in ("certificate", "private_key", "ca_certificates")
            if (value := getattr(tls, key)) is not None
        }
        return tls.model_copy(update=update)

    node = config.node
    if node.tls is not None:
        node = node.model_copy(update={"tls": resolved(node.tls)})
    destinations = {
        name: d.model_copy(update={"tls": resolved(d.tls)}) if d.tls is not None else d
        for name, d in config.destinations.items()
    }
    return config.model_copy(update={"node": node, "destinations": destinations})


def _tls_problems(config: Config) -> list[str]:
    from node.tls import tls_problems

    problems = []
    if config.node.tls is not None:
        problems += tls_problems("node.tls", config.node.tls)
        if config.node.tls.plain_port == config.node.port:
            problems.append("node.tls.plain_port: the same port as node.port")
    for name, destination in config.destinations.items():
        if destination.tls is not None:
            problems += tls_problems(f"destinations.{name}.tls", destination.tls)
    return problems
