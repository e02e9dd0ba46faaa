"""The one settings tree: a frozen pydantic section per stage, loaded from YAML, overridable by environment.

``load_settings(path)`` reads a YAML file (``None``: the embedded default, ``configs/default.yaml``),
applies ``STREAM_SERVICE__SECTION__KEY=value`` environment overrides (``__`` nests, list items by
index, values parsed as YAML), then validates. Every problem becomes one ``ConfigError`` that lists
each bad key by its dotted path, what was expected and what was found::

    cameras.0.source.fps: expected a number > 0, found 'fast'

Relative paths (references, model, video files, image folders) are kept as written and resolved
against the working directory by the module that opens them.
"""

from __future__ import annotations

import importlib.resources
import itertools
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from stream_service.errors import ConfigError

ENV_PREFIX = "STREAM_SERVICE__"
Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
_ENDPOINT = re.compile(r"^(tcp://(\*|[\w.-]+|\[[0-9a-fA-F:]+\]):(\*|\d{1,5})|ipc://\S+|inproc://\S+)$")


class FieldError(ValueError):
    """A validator's complaint about ``key`` (dotted, relative to the model raising it; empty: the field)."""

    def __init__(self, expected: str, found: object, key: str = "") -> None:
        super().__init__(f"expected {expected}, found {found!r}")
        self.expected, self.found, self.key = expected, found, key


_LOOPBACK = re.compile(r"^tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):")


def _endpoint(value: str) -> str:
    if not _ENDPOINT.match(value):
        raise FieldError("a ZeroMQ endpoint like tcp://127.0.0.1:57100, ipc://path or inproc://name", value)
    return value


Endpoint = Annotated[str, AfterValidator(_endpoint)]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
FrameSide = Annotated[int, Field(gt=0, le=65535)]  # the wire's bound on a frame side


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- cameras --------------------------------------------------------------------------------------------
class SyntheticSource(Section):
    """The synthetic PCB camera (``stream_service.sources.synthetic``); it supplies its own reference."""

    kind: Literal["synthetic"]
    width: int = Field(640, ge=72, le=16384)
    height: int = Field(640, ge=72, le=16384)
    fps: PositiveFloat = 10.0
    seed: int = 0
    defect_rate: float = Field(0.5, ge=0, le=1)
    max_defects: PositiveInt = 3
    shift_px: float = Field(2.0, ge=0, le=32)
    jitter: float = Field(0.3, ge=0, le=1)
    lighting_drift: float = Field(0.05, ge=0, le=0.5)
    noise: float = Field(2.0, ge=0)
    truth: bool = True  # attach each frame's ground truth (label, defect boxes) to its header and verdict


class _Reconnecting(Section):
    """Reconnection policy of a live stream: exponential backoff, ``CameraError`` after ``max_retries``."""

    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(0.5, ge=0)
    retry_backoff_max_s: float = Field(5.0, ge=0)


class DeviceSource(_Reconnecting):
    """A local camera by OpenCV device index (V4L2 on Linux)."""

    kind: Literal["device"]
    index: int = Field(0, ge=0)
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    fps: PositiveFloat | None = None


class UrlSource(_Reconnecting):
    """A network stream (RTSP or HTTP/MJPEG) opened with OpenCV's FFmpeg backend."""

    kind: Literal["url"]
    url: str
    open_timeout_ms: PositiveInt = 5000
    read_timeout_ms: PositiveInt = 5000

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(rtsps?|https?)://\S+$", value):
            raise FieldError("an rtsp://, rtsps://, http:// or https:// URL", value)
        return value


class FileSource(Section):
    """A video file, paced at ``fps`` (None: the file's own frame rate)."""

    kind: Literal["file"]
    path: Path
    loop: bool = False
    fps: PositiveFloat | None = None


class FolderSource(Section):
    """Image files of a folder (sorted ``pattern`` matches) replayed at ``fps``."""

    kind: Literal["folder"]
    path: Path
    pattern: str = "*.png"
    fps: PositiveFloat = 10.0
    loop: bool = True


Source = Annotated[SyntheticSource | DeviceSource | UrlSource | FileSource | FolderSource, Field(discriminator="kind")]
SOURCES: dict[str, type[Section]] = {
    "synthetic": SyntheticSource,
    "device": DeviceSource,
    "url": UrlSource,
    "file": FileSource,
    "folder": FolderSource,
}


class CameraSettings(Section):
    """One camera: its source, its golden reference and the polarity of its parts."""

    # Topics are "verdicts.<id>" and ZeroMQ subscriptions match prefixes: no dots in ids.
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    source: Source
    reference: Path | None = None
    polarity: Literal["dark-object", "bright-object"] = "dark-object"
    frame_size: tuple[FrameSide, FrameSide] | None = None  # (width, height) frames are resized to

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """(H, W) of the camera's frames when the settings fix it (``frame_size``, or a synthetic source)."""
        if self.frame_size is not None:
            width, height = self.frame_size
            return height, width
        if isinstance(self.source, SyntheticSource):
            return self.source.height, self.source.width
        return None

    @model_validator(mode="after")
    def _needs_reference(self) -> CameraSettings:
        if self.reference is None and self.source.kind != "synthetic":
            raise FieldError(f"a reference directory for a {self.source.kind} camera", None, "reference")
        return self


# -- stages ---------------------------------------------------------------------------------------------
class TransportSettings(Section):
    """Endpoints of every hop and their bounded queues (ZeroMQ high-water marks, in messages)."""

    # One per camera: a list, or a template with {port} (capture_port + camera index) and/or {camera}.
    capture_out: str | list[Endpoint] = "tcp://127.0.0.1:{port}"
    capture_port: int = Field(57100, ge=1, le=65535)
    features_out: Endpoint = "tcp://127.0.0.1:57200"
    verdicts_pub: Endpoint = "tcp://127.0.0.1:57300"
    journal_rep: Endpoint = "tcp://127.0.0.1:57301"  # the infer stage's journal replay (request/reply)
    capture_hwm: PositiveInt = 4
    features_hwm: PositiveInt = 4
    publish_hwm: PositiveInt = 100
    # auto: pixels of a PUSH hop travel through a shared-memory ring when its endpoint is on this host
    # (ipc://, or tcp:// on a loopback address), as raw bytes over ZeroMQ otherwise.
    shared_memory: Literal["auto"] | bool = "auto"
    shm_slots: int = Field(8, ge=2)
    linger_ms: int = Field(0, ge=0)
    recv_timeout_ms: PositiveInt = 100
    max_drain: PositiveInt = 64

    @field_validator("capture_out")
    @classmethod
    def _template(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            try:
                _endpoint(value.format(port=57100, camera="cam0"))
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
                raise FieldError("an endpoint template using only {port} and {camera}", value) from exc
        return value

    def uses_shared_memory(self, endpoint: str) -> bool:
        """Whether the PUSH hop on ``endpoint`` carries its pixels through a shared-memory ring."""
        if self.shared_memory != "auto":
            return self.shared_memory
        return endpoint.startswith("ipc://") or bool(_LOOPBACK.match(endpoint))

    def endpoints(self, cameras: Sequence[CameraSettings]) -> dict[str, str]:
        """Every endpoint of the pipeline by its setting: the captures', features_out, verdicts_pub."""
        found = {f"transport.capture_out ({c.id})": self.capture_endpoint(i, c.id) for i, c in enumerate(cameras)}
        return found | {"transport.features_out": self.features_out, "transport.verdicts_pub": self.verdicts_pub}

    def capture_endpoint(self, index: int, camera_id: str) -> str:
        """The capture endpoint of the camera at ``index`` in ``Settings.cameras``."""
        if isinstance(self.capture_out, list):
            return self.capture_out[index]
        return self.capture_out.format(port=self.capture_port + index, camera=camera_id)


class LimitsSettings(Section):
    """Bounds on what a peer may send a stage; a message past one is refused or counted and dropped.

    Every receiving socket refuses, inside ZeroMQ (``ZMQ_MAXMSGSIZE``, the peer is disconnected), a
    message part larger than the largest part it can legitimately get: the biggest configured frame
    (``cameras[].frame_size`` or the synthetic size; ``unsized_frame_bytes`` for a camera whose size the
    settings do not fix) or header, plus ``message_margin_bytes``.
    """

    max_header_bytes: int = Field(65536, ge=1024)
    max_json_depth: int = Field(32, ge=4, le=500)  # json.loads recurses once per level: keep far below 1000
    unsized_frame_bytes: PositiveInt = 3840 * 2160 * 3  # a 4K BGR frame
    message_margin_bytes: int = Field(65536, ge=0)


class SoartcSettings(Section):
    """The soartc stage. The feature definition (block, variant, calibration) is the model card's, not a setting."""

    device: Device = "auto"
    # None: the model card's (the front end its figures were measured with; translation for older cards).
    registration: Literal["translation", "affine", "none"] | None = None
    max_shift_px: float = Field(16.0, ge=0)
    workers: PositiveInt = 1


class InferenceSettings(Section):
    model: Path = Path("models/soartc-vit")
    device: Device = "auto"
    threshold: float | None = Field(None, ge=0, le=1)  # None: the model card's threshold
    threads: int = Field(0, ge=0)  # 0: ONNX Runtime's default
    spin_threads: bool = False  # idle ONNX Runtime threads busy-wait: only on a host the infer stage has alone


class HighlightSettings(Section):
    jpeg_quality: int = Field(85, ge=1, le=100)
    color_bgr: tuple[int, int, int] = (0, 0, 255)
    alpha: float = Field(0.45, ge=0, le=1)
    draw_boxes: bool = True
    box_thickness: PositiveInt = 2
    send_mask: bool = False


class SupervisorSettings(Section):
    heartbeat_s: PositiveFloat = 1.0
    heartbeat_timeout_s: PositiveFloat = 5.0
    restart_backoff_s: float = Field(1.0, ge=0)
    max_restarts: int = Field(5, ge=0)
    shutdown_deadline_s: PositiveFloat = 5.0
    startup_timeout_s: PositiveFloat = 60.0  # from start to a stage's first heartbeat (imports, model, JIT)
    log_max_bytes: PositiveInt = 10_000_000  # a stage's log is rotated past this size ...
    log_backups: int = Field(3, ge=0)  # ... keeping this many older ones (<name>.log.1 is the newest)


def default_journal_path() -> Path:
    """``$XDG_STATE_HOME/stream-service/journal.sqlite`` (default ``~/.local/state``): persistent, per user."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "stream-service" / "journal.sqlite"


class JournalSettings(Section):
    """The verdict journal of the infer stage (``runtime.journal``): SQLite in WAL mode, kept by age and size."""

    enabled: bool = True
    path: Path | None = None  # None: default_journal_path()
    max_age_days: PositiveFloat = 30.0
    max_mb: PositiveFloat = 1024.0
    prune_every_s: PositiveFloat = 60.0  # how often retention runs (and once at start)
    synchronous: Literal["normal", "full"] = "normal"  # normal: survives a crash of the process; full: of the host
    busy_timeout_ms: PositiveInt = 1000  # how long a write or read waits for another process's lock on the file
    replay_limit: PositiveInt = 1000  # the most verdicts one replay reply carries (clients ask page by page)
    replay_timeout_ms: PositiveInt = 5000  # how long a client waits for a reply
    max_request_bytes: PositiveInt = 4096  # a longer replay request is refused unread

    @property
    def resolved_path(self) -> Path:
        """``path``, or the per-user default."""
        return self.path if self.path is not None else default_journal_path()


class DashboardSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Host-header names answered besides loopback, `host` and this machine's name ("*": any; web/access.py).
    allowed_hosts: list[str] = Field(default_factory=list)
    token: str | None = Field(None, min_length=16)  # when set, every request needs it (Bearer, or /?token= once)
    request_timeout_s: PositiveFloat = 10.0  # a client silent for this long is disconnected
    # The upper bounds of /metrics' stream_service_latency_seconds buckets: 1 ms to 10 s, finer at 10-100 ms.
    latency_buckets_s: tuple[PositiveFloat, ...] = Field(
        (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        min_length=1,
    )

    @field_validator("latency_buckets_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise FieldError("bucket bounds in increasing order", list(value))
        return value


class SecuritySettings(Section):
    """CURVE on every tcp hop (``keys``: a folder made by ``stream-service keys generate``)."""

    keys: Path | None = None
    # A tcp endpoint off this host without keys: anyone on the network reads and forges verdicts.
    allow_plaintext: bool = False


class LoggingSettings(Section):
    level: LogLevel = "INFO"
    # A flood of the same rejection or error is logged once per this many seconds, with its count.
    repeat_every_s: PositiveFloat = 10.0

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        # Accept any case, but report a bad level as written.
        return value.upper() if isinstance(value, str) and value.upper() in get_args(LogLevel) else value


class HealthSettings(Section):
    """When a camera or a stage counts as unhealthy (``/healthz``, the dashboard, the summary)."""

    camera_stale_s: float = Field(5.0, gt=0)  # a camera with no frame for this long is unhealthy
    status_every_s: float = Field(5.0, gt=0)  # a capture repeats its camera's status this often


class MqttBridgeSettings(Section):
    """The MQTT bridge (``stream-service bridge mqtt``; docs/MQTT.md): verdicts, camera status and
    highlights of the pipeline on an MQTT broker, replayed from the journal after an outage."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = Field("stream-service", pattern=r"^[^#+]+$")  # topics are {prefix}/{camera}/verdict|status|highlight
    # One bridge per id on a broker; each camera's status connection is "{client_id}-{camera}".
    client_id: str = Field("stream-service-bridge", min_length=1, max_length=64)
    highlights: bool = False  # also the newest highlight JPEG of each camera (retained), on {prefix}/{camera}/highlight
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # set: TLS, the broker's certificate checked against this CA
    cert_file: Path | None = None  # with key_file: a client certificate (needs ca_file)
    key_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=65535)
    # A connect without CONNACK for this long is retried; below supervisor.heartbeat_timeout_s (it blocks).
    connect_timeout_s: PositiveFloat = 3.0
    reconnect_backoff_s: PositiveFloat = 0.5  # the wait before a reconnect, doubled after each failure ...
    reconnect_backoff_max_s: PositiveFloat = 10.0  # ... up to this
    max_inflight: PositiveInt = 100  # QoS 1 verdicts sent but not yet acknowledged (PUBACK); more wait
    ack_timeout_s: PositiveFloat = 30.0  # a verdict unacknowledged this long: the connection is dropped, replayed
    state_path: Path | None = None  # the last verdict the broker acknowledged; None: next to the journal
    replay_first_start: bool = False  # without a state file: replay the whole journal first (else start live)

    @model_validator(mode="after")
    def _tls(self) -> MqttBridgeSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise FieldError("cert_file and key_file together", self.key_file, "key_file")
        if self.cert_file is not None and self.ca_file is None:
            raise FieldError("ca_file with a client certificate (TLS)", None, "ca_file")
        if self.password is not None and self.username is None:
            raise FieldError("username with a password", None, "username")
        if self.reconnect_backoff_max_s < self.reconnect_backoff_s:
            raise FieldError(
                f"at least reconnect_backoff_s ({self.reconnect_backoff_s})",
                self.reconnect_backoff_max_s,
                "reconnect_backoff_max_s",
            )
        return self


class OpcuaBridgeSettings(Section):
    """The OPC UA server (``stream-service bridge opcua``; docs/OPCUA.md): one object per camera with its last
    verdict, counts and online state, for PLCs and SCADA to read or subscribe to."""

    host: str = "127.0.0.1"
    port: int = Field(4840, ge=1, le=65535)
    namespace_uri: str = Field(
        "urn:stream-service:inspection", min_length=1
    )  # node ids are ns=<this>;s=<camera>.<Name>
    allow_anonymous: bool = False  # off: a client logs in as one of users (or is refused)
    users: dict[str, Annotated[str, Field(min_length=8)]] = Field(
        default_factory=dict
    )  # username: password (read-only)
    certificate: Path | None = None  # with private_key: the Basic256Sha256 endpoints (Sign, SignAndEncrypt)
    private_key: Path | None = None
    allow_unencrypted: bool = True  # the None security endpoint; false: only Basic256Sha256 (needs certificate)

    @model_validator(mode="after")
    def _access(self) -> OpcuaBridgeSettings:
        if not self.allow_anonymous and not self.users:
            raise FieldError("a user (users: {name: password}) or allow_anonymous: true", {}, "users")
        if (self.certificate is None) != (self.private_key is None):
            raise FieldError("certificate and private_key together", self.private_key, "private_key")
        if not self.allow_unencrypted and self.certificate is None:
            raise FieldError("a certificate when allow_unencrypted is false", None, "certificate")
        return self


class BridgesSettings(Section):
    """Plant-protocol bridges that ``run`` starts next to the stages; each off unless configured."""

    mqtt: MqttBridgeSettings | None = None
    opcua: OpcuaBridgeSettings | None = None


class Settings(Section):
    """The root: each stage receives its own section."""

    cameras: list[CameraSettings] = Field(min_length=1)
    transport: TransportSettings = TransportSettings()
    limits: LimitsSettings = LimitsSettings()
    soartc: SoartcSettings = SoartcSettings()
    inference: InferenceSettings = InferenceSettings()
    highlight: HighlightSettings = HighlightSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    journal: JournalSettings = JournalSettings()
    dashboard: DashboardSettings = DashboardSettings()
    health: HealthSettings = HealthSettings()
    security: SecuritySettings = SecuritySettings()
    logging: LoggingSettings = LoggingSettings()
    bridges: BridgesSettings = BridgesSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        seen: set[str] = set()
        for i, camera in enumerate(self.cameras):
            if camera.id in seen:
                raise FieldError("camera ids to be unique", camera.id, f"cameras.{i}.id")
            seen.add(camera.id)
        out = self.transport.capture_out
        if isinstance(out, list) and len(out) != len(self.cameras):
            raise FieldError(f"one capture endpoint per camera ({len(self.cameras)})", out, "transport.capture_out")
        mqtt, beat = self.bridges.mqtt, self.supervisor.heartbeat_timeout_s
        if mqtt is not None and mqtt.connect_timeout_s >= beat:
            raise FieldError(
                f"less than supervisor.heartbeat_timeout_s ({beat:g}): a connect blocks the bridge's heartbeat",
                mqtt.connect_timeout_s,
                "bridges.mqtt.connect_timeout_s",
            )
        if self.security.keys is None and not self.security.allow_plaintext:
            for key, endpoint in self.transport.endpoints(self.cameras).items():
                # (":*", a port picked at bind, is refused by the topology check: no peer could find it.)
                if endpoint.startswith("tcp://") and not _LOOPBACK.match(endpoint) and not endpoint.endswith(":*"):
                    raise FieldError(
                        "a keys folder (stream-service keys generate DIR) for an endpoint off this host, or "
                        "security.allow_plaintext: true",
                        f"{endpoint} ({key}) without keys",
                        "security.keys",
                    )
        return self


# -- loading ----------------------------------------------------------------------------------------------
def default_config() -> tuple[str, str]:
    """The embedded default config: (where it was found, its text).

    In a wheel it is ``stream_service/configs/default.yaml`` (force-included from the repository's
    ``configs/default.yaml``); in a source checkout it is that repository file itself.
    """
    packaged = importlib.resources.files("stream_service") / "configs" / "default.yaml"
    if packaged.is_file():
        return str(packaged), packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    if checkout.is_file():
        return str(checkout), checkout.read_text(encoding="utf-8")
    raise ConfigError(f"the embedded default config: expected {packaged} or {checkout}, found neither")


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (None: the embedded default), apply ``STREAM_SERVICE__*`` overrides from ``environ``
    (default ``os.environ``), validate. Raises ``ConfigError`` naming the file, line or dotted keys."""
    if path is None:
        name, text = default_config()
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {name}: expected an existing YAML file, found nothing there") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {name}: cannot be read ({exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {name}: YAML syntax error{where}: {problem}") from exc
    except RecursionError as exc:  # PyYAML composes nested collections recursively
        raise ConfigError(f"config file {name}: expected YAML of a sane nesting depth, found deeper") from exc
    except ValueError as exc:  # a value PyYAML cannot construct: a date like 2026-13-45, a 5,000-digit integer
        raise ConfigError(f"config file {name}: expected valid YAML values, found {str(exc)[:200]}") from exc
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {name}: expected a mapping of sections at the top, found {type(raw).__name__}")
    overridden = apply_env(raw, os.environ if environ is None else environ)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        try:
            lines = [_describe(error, overridden) for error in exc.errors()]
        except RecursionError:  # the repr of a value nested too deep to print
            lines = [f"{len(exc.errors())} invalid value(s), nested too deep to show"]
        raise ConfigError(f"invalid settings in {name}:\n  " + "\n  ".join(lines)) from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {name}: expected settings of a sane nesting depth, found deeper") from exc


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply ``STREAM_SERVICE__A__B__0__C=value`` to ``raw`` in place; returns {dotted key: variable}."""
    overridden: dict[str, str] = {}
    for variable in sorted(v for v in environ if v.startswith(ENV_PREFIX)):
        parts = [p.lower() for p in variable[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(f"environment {variable}: expected STREAM_SERVICE__SECTION__KEY, found an empty part")
        try:
            value = yaml.safe_load(environ[variable])
        except (yaml.YAMLError, ValueError, RecursionError):
            value = environ[variable]
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            key: str | int = part
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    found = f"{part!r} ({len(node)} items)"
                    raise ConfigError(
                        f"environment {variable}: expected an index into {'.'.join(parts[:depth])}, found {found}"
                    )
                key = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(
                    f"environment {variable}: expected {'.'.join(parts[:depth])} to be a mapping, found {node!r}"
                )
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(key), dict | list):
                    node[key] = {}
                node = node[key]
        overridden[".".join(parts)] = variable
    return overridden


# -- error messages -----------------------------------------------------------------------------------------
_EXPECTED = {
    "float_parsing": "a number",
    "float_type": "a number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a path",
    "missing": "a value (the key is required)",
}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _describe(error: Any, overridden: Mapping[str, str]) -> str:
    """One line ``dotted.key: expected ..., found ...`` for a pydantic error."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    dotted = [str(p) for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "source" and p in SOURCES)]
    found: str = "nothing" if kind == "missing" else repr(error.get("input"))
    cause = ctx.get("error")
    if isinstance(cause, FieldError):
        dotted += [k for k in cause.key.split(".") if k]
        expected, found = cause.expected, repr(cause.found) if cause.found is not None else "nothing"
    elif kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = ", ".join(model.model_fields) if model is not None else "?"
        expected, found = f"a known key (one of: {known})", f"unknown key {loc[-1]!r}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        dotted.append("kind")
        expected = f"one of {', '.join(repr(k) for k in SOURCES)}"
        found = repr(ctx["tag"]) if "tag" in ctx else "nothing"
    elif kind == "literal_error":
        expected = f"one of {ctx['expected']}"
    elif kind in ("too_short", "too_long"):
        expected = f"at least {ctx['min_length']} item(s)" if kind == "too_short" else f"at most {ctx['max_length']}"
        found = f"{ctx.get('actual_length')} item(s)"
    elif kind == "string_pattern_mismatch":
        expected = f"a string matching {ctx['pattern']}"
    else:
        expected = _EXPECTED.get(kind, error["msg"])
        bounds = _bounds(loc) or [f"{sym} {ctx[k]}" for k, sym in _BOUNDS if k in ctx]
        if bounds and expected in ("a number", "an integer", error["msg"]):
            members = _members(_annotation_at(loc))
            number = "an integer" if int in members and float not in members else "a number"
            expected = f"{number} {' and '.join(bounds)}"
    key = ".".join(dotted) or "(top)"
    line = f"{key}: expected {expected}, found {found}"
    source = next((v for k, v in overridden.items() if key == k or key.startswith(k + ".")), None)
    return f"{line} (set by {source})" if source else line


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The type annotation of the value at ``loc`` (pydantic's loc, union tags included); None: unknown."""
    annotation: Any = Settings
    for part in loc:
        annotation = _step(annotation, part)
    return annotation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class validating the mapping at ``loc``."""
    models = [a for a in _members(_annotation_at(loc)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _members(annotation: Any) -> list[Any]:
    """``annotation`` without Annotated, split into its union members."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    """The annotation of ``part`` (a field name, list index or union tag) inside ``annotation``; None: unknown."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            kind = member.model_fields.get("kind")
            if kind is not None and get_args(kind.annotation) == (part,):
                return member
            if isinstance(part, str) and part in member.model_fields:
                return member.model_fields[part].annotation
        elif get_origin(member) in (list, tuple) and isinstance(part, int):
            return get_args(member)[0]
    return None


def _bounds(loc: tuple[Any, ...]) -> list[str]:
    """The numeric bounds declared on the field at ``loc``, e.g. ['> 0'] (empty when none or unknown)."""
    model = _model_at(loc[:-1]) if loc else None
    field: FieldInfo | None = model.model_fields.get(str(loc[-1])) if model is not None else None
    if field is None:
        return []
    pending: list[Any] = [*field.metadata, field.annotation]
    out: list[str] = []
    while pending:
        item = pending.pop(0)
        if get_origin(item) in (Annotated, Union, types.UnionType):
            pending += get_args(item)
        elif isinstance(item, FieldInfo):
            pending += item.metadata
        else:
            out += [
                f"{sym} {getattr(item, k)}"
                for k, sym in _BOUNDS
                if isinstance(item, getattr(annotated_types, k.capitalize()))
            ]
    return out
