"""Settings: the embedded default, the examples, environment overrides and errors naming dotted keys."""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import pydantic
import pytest
import yaml
from hypothesis import strategies as st

from stream_service.errors import ConfigError
from stream_service.settings import (
    DeviceSource,
    Settings,
    SyntheticSource,
    UrlSource,
    default_config,
    load_settings,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_loads() -> None:
    settings = load_settings(None, environ={})
    (camera,) = settings.cameras
    assert camera.id == "cam0" and camera.polarity == "dark-object"
    assert isinstance(camera.source, SyntheticSource)
    assert (camera.source.width, camera.source.height, camera.source.defect_rate) == (640, 640, 0.5)
    assert settings.inference.model == Path("models/soartc-vit")
    assert settings.inference.device == settings.soartc.device == "cpu"
    assert settings.transport.capture_endpoint(0, "cam0") == "tcp://127.0.0.1:57100"
    assert (settings.dashboard.enabled, settings.dashboard.host, settings.dashboard.port) == (True, "127.0.0.1", 8080)


def test_default_is_the_repository_copy() -> None:
    where, text = default_config()
    assert Path(where).resolve() == REPO / "configs" / "default.yaml"
    assert yaml.safe_load(text) == DEFAULT


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_load(path: Path) -> None:
    settings = load_settings(path, environ={})
    assert settings.cameras


def test_examples_cover_usb_rtsp_and_multi_host() -> None:
    examples = REPO / "configs" / "examples"
    assert isinstance(load_settings(examples / "usb-camera.yaml", {}).cameras[0].source, DeviceSource)
    assert isinstance(load_settings(examples / "rtsp-camera.yaml", {}).cameras[0].source, UrlSource)
    multi = load_settings(examples / "multi-host.yaml", {})
    assert [multi.transport.capture_endpoint(i, c.id) for i, c in enumerate(multi.cameras)] == [
        "tcp://10.0.0.10:57101",
        "tcp://10.0.0.10:57102",
    ]


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SERVICE__CAMERAS__0__SOURCE__DEFECT_RATE", "0.1")
    monkeypatch.setenv("STREAM_SERVICE__LOGGING__LEVEL", "debug")
    monkeypatch.setenv("STREAM_SERVICE__DASHBOARD__ENABLED", "false")
    monkeypatch.setenv("STREAM_SERVICE__INFERENCE__THRESHOLD", "0.7")
    monkeypatch.setenv("STREAM_SERVICE__TRANSPORT__CAPTURE_OUT", "[ipc:///tmp/cam0]")
    settings = load_settings()
    source = settings.cameras[0].source
    assert isinstance(source, SyntheticSource) and source.defect_rate == 0.1
    assert settings.logging.level == "DEBUG"
    assert settings.dashboard.enabled is False
    assert settings.inference.threshold == 0.7
    assert settings.transport.capture_endpoint(0, "cam0") == "ipc:///tmp/cam0"


def test_environment_overrides_a_file_and_fills_missing_sections(tmp_path: Path) -> None:
    path = write(tmp_path, {"cameras": DEFAULT["cameras"]})
    settings = load_settings(path, {"STREAM_SERVICE__SUPERVISOR__MAX_RESTARTS": "9", "OTHER": "x"})
    assert settings.supervisor.max_restarts == 9
    assert settings.transport.capture_hwm == 4  # a section left out takes its defaults


def test_environment_whole_source_as_yaml() -> None:
    environ = {
        "STREAM_SERVICE__CAMERAS__0__SOURCE": "{kind: folder, path: /data/boards, fps: 2}",
        "STREAM_SERVICE__CAMERAS__0__REFERENCE": "references/boards",
    }
    settings = load_settings(None, environ)
    assert settings.cameras[0].source.kind == "folder"
    assert settings.cameras[0].reference == Path("references/boards")


def test_environment_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"STREAM_SERVICE__CAMERAS__3__ID: expected an index into cameras"):
        load_settings(None, {"STREAM_SERVICE__CAMERAS__3__ID": "x"})


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"soartc\.max_shift_px: .* \(set by STREAM_SERVICE__SOARTC__MAX_SHIFT_PX\)"):
        load_settings(None, {"STREAM_SERVICE__SOARTC__MAX_SHIFT_PX": "-5"})


def source(**changes: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["cameras"][0]["source"].update(changes)

    return mutate


def section(name: str, **changes: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d[name].update(changes)

    return mutate


def camera(**changes: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["cameras"][0].update(changes)

    return mutate


def drop_kind(d: dict[str, Any]) -> None:
    del d["cameras"][0]["source"]["kind"]


def mqtt(**values: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["bridges"] = {"mqtt": values}

    return mutate


def opcua(**values: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["bridges"] = {"opcua": values}

    return mutate


def two_cam0(d: dict[str, Any]) -> None:
    d["cameras"].append(copy.deepcopy(d["cameras"][0]))


BROKEN = [
    (source(fps="fast"), "cameras.0.source.fps", "a number > 0", "'fast'"),
    (source(fps=0), "cameras.0.source.fps", "a number > 0", "0"),
    (source(defect_rate=1.5), "cameras.0.source.defect_rate", "a number >= 0 and <= 1", "1.5"),
    (source(max_defects=1.5), "cameras.0.source.max_defects", "an integer > 0", "1.5"),
    (source(fsp=3), "cameras.0.source.fsp", "a known key (one of: kind, width", "unknown key 'fsp'"),
    (source(kind="webcam"), "cameras.0.source.kind", "one of 'synthetic', 'device'", "'webcam'"),
    (drop_kind, "cameras.0.source.kind", "one of 'synthetic'", "nothing"),
    (camera(source={"kind": "device", "index": 0}), "cameras.0.reference", "a reference directory", "nothing"),
    (camera(source={"kind": "url", "url": "ftp://host/x"}, reference="r"), "cameras.0.source.url", "rtsp://", "ftp"),
    (camera(source={"kind": "device", "index": -1}, reference="r"), "cameras.0.source.index", ">= 0", "-1"),
    (camera(source={"kind": "folder"}), "cameras.0.source.path", "a value", "nothing"),
    (camera(id="cam.0"), "cameras.0.id", "a string matching", "'cam.0'"),
    (camera(polarity="dark"), "cameras.0.polarity", "'dark-object' or 'bright-object'", "'dark'"),
    (camera(frame_size=[640, "x"]), "cameras.0.frame_size.1", "an integer", "'x'"),
    (two_cam0, "cameras.1.id", "camera ids to be unique", "'cam0'"),
    (section("soartc", registration="rigid"), "soartc.registration", "'translation', 'affine' or 'none'", "'rigid'"),
    (section("soartc", device="tpu"), "soartc.device", "'auto', 'cpu' or 'cuda'", "'tpu'"),
    (section("inference", device="gpu"), "inference.device", "'auto', 'cpu' or 'cuda'", "'gpu'"),
    (section("inference", threshold=2), "inference.threshold", "<= 1", "2"),
    (section("transport", capture_hwm=0), "transport.capture_hwm", "an integer > 0", "0"),
    (section("transport", features_out="localhost:5"), "transport.features_out", "a ZeroMQ endpoint", "'localhost:5'"),
    (section("transport", capture_out="tcp://h:{prt}"), "transport.capture_out", "{port} and {camera}", "{prt}"),
    (
        section("transport", capture_out=["tcp://a:1", "tcp://b:2"]),
        "transport.capture_out",
        "one capture",
        "'tcp://a:1'",
    ),
    (section("dashboard", port=70000), "dashboard.port", "<= 65535", "70000"),
    (section("dashboard", enabled="perhaps"), "dashboard.enabled", "true or false", "'perhaps'"),
    (section("dashboard", latency_buckets_s=[0.1, 0.01]), "dashboard.latency_buckets_s", "increasing", "[0.1, 0.01]"),
    (section("dashboard", latency_buckets_s=[0, 1]), "dashboard.latency_buckets_s.0", "a number > 0", "0"),
    (section("highlight", jpeg_quality=0), "highlight.jpeg_quality", ">= 1 and <= 100", "0"),
    (section("supervisor", heartbeat_s=-1), "supervisor.heartbeat_s", "a number > 0", "-1"),
    (section("logging", level="loud"), "logging.level", "'DEBUG', 'INFO'", "'loud'"),
    (lambda d: d.update(extra={}), "extra", "a known key (one of: cameras, transport", "unknown key 'extra'"),
    (lambda d: d.update(cameras=[]), "cameras", "at least 1 item", "0 item"),
    (lambda d: d.pop("cameras"), "cameras", "a value", "nothing"),
    (lambda d: d.update(soartc=3), "soartc", "a mapping", "3"),
    (mqtt(port=0), "bridges.mqtt.port", ">= 1", "0"),
    (mqtt(prefix="line/#"), "bridges.mqtt.prefix", "a string matching", "'line/#'"),
    (mqtt(client_id="x" * 65), "bridges.mqtt.client_id", "at most 64 characters", "'xxxx"),
    (mqtt(connect_timeout_s=5), "bridges.mqtt.connect_timeout_s", "less than supervisor.heartbeat_timeout_s (5)", "5"),
    (mqtt(cert_file="c.pem"), "bridges.mqtt.key_file", "cert_file and key_file together", "nothing"),
    (mqtt(cert_file="c.pem", key_file="k.pem"), "bridges.mqtt.ca_file", "ca_file with a client certificate", "nothing"),
    (mqtt(password="secret"), "bridges.mqtt.username", "username with a password", "nothing"),
    (mqtt(reconnect_backoff_max_s=0.1), "bridges.mqtt.reconnect_backoff_max_s", "at least reconnect_backoff_s", "0.1"),
    (mqtt(qos=2), "bridges.mqtt.qos", "a known key (one of: host, port", "unknown key 'qos'"),
    (opcua(), "bridges.opcua.users", "a user (users: {name: password}) or allow_anonymous: true", "{}"),
    (opcua(users={"plc": "short"}), "bridges.opcua.users.plc", "at least 8 characters", "'short'"),
    (opcua(allow_anonymous=True, certificate="c.der"), "bridges.opcua.private_key", "certificate and private_key", ""),
    (opcua(allow_anonymous=True, allow_unencrypted=False), "bridges.opcua.certificate", "a certificate when", ""),
]


@pytest.mark.parametrize(("mutate", "key", "expected", "found"), BROKEN, ids=[row[1] for row in BROKEN])
def test_broken_config_names_key_expected_and_found(
    tmp_path: Path, mutate: Any, key: str, expected: str, found: str
) -> None:
    data = copy.deepcopy(DEFAULT)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert str(path) in message
    line = next((ln.strip() for ln in message.splitlines() if ln.strip().startswith(f"{key}: ")), None)
    assert line is not None, message
    wanted, got = line.split(": expected ", 1)[1].rsplit(", found ", 1)
    assert expected in wanted and found in got, line


def test_every_bad_key_is_listed(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT)
    data["soartc"]["max_shift_px"] = -5
    data["dashboard"]["port"] = "http"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, data), environ={})
    assert "soartc.max_shift_px:" in str(caught.value) and "dashboard.port:" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("logging:\n  level: INFO\ndashboard:\n  port: [8080\n  host: x\n", 5),
        ("cameras:\n\t- id: x\n", 2),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: YAML syntax error at line {line}, column \d+"):
        load_settings(path, environ={})


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings(missing, environ={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_settings(write(tmp_path, ["cameras"]), environ={})


def test_settings_are_frozen() -> None:
    settings = load_settings(None, environ={})
    with pytest.raises(pydantic.ValidationError):
        settings.dashboard.port = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_capture_endpoint_template_uses_camera_index_and_id(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT)
    data["cameras"].append({"id": "cam1", "source": {"kind": "synthetic", "seed": 1}})
    data["transport"]["capture_out"] = "tcp://127.0.0.1:{port}"
    settings = load_settings(write(tmp_path, data), environ={})
    assert settings.transport.capture_endpoint(1, "cam1") == "tcp://127.0.0.1:57101"
    data["transport"]["capture_out"] = "ipc:///run/stream-service/{camera}"
    settings = load_settings(write(tmp_path, data), environ={})
    assert settings.transport.capture_endpoint(1, "cam1") == "ipc:///run/stream-service/cam1"


# --- hostile or broken config text: only ConfigError comes out ---------------------------------------------

HOSTILE_TEXT = [
    "[" * 5000,
    "{a: " * 5000,
    "- " * 3000 + "x",
    "cameras: " + "[" * 900 + "]" * 900,
    "seq: " + "9" * 5000,
    "when: 2026-13-45",
    "transport: {capture_out: '{port.real.nothing}'}",
    "transport: {capture_out: '{port!z}'}",
    "? [a, b]\n: c",
    "&a [*a]",
    "cameras: [{id: cam0, source: {kind: synthetic, width: " + "9" * 4000 + "}}]",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=[t[:24] for t in HOSTILE_TEXT])
def test_hostile_config_text_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"config|settings"):
        load_settings(path, environ={})


@pytest.mark.parametrize("value", ["[" * 5000, "2026-13-45", "9" * 5000])
def test_hostile_environment_values_are_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(None, environ={"STREAM_SERVICE__TRANSPORT__CAPTURE_HWM": value})


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
SECTIONS = ["cameras", "transport", "limits", "soartc", "inference", "supervisor", "logging", "nonsense"]


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    text=st.text(alphabet="[]{}:,-?&*!|>'\"#\n abc019.", max_size=120)
    | st.dictionaries(st.sampled_from(SECTIONS), yaml_values, max_size=4).map(yaml.safe_dump)
)
def test_random_config_text_raises_only_config_errors(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_text(text)
        with contextlib.suppress(ConfigError):  # the only error allowed
            load_settings(path, environ={})


def test_the_limits_section_has_named_bounds() -> None:
    limits = load_settings(None, environ={}).limits
    assert (limits.max_header_bytes, limits.max_json_depth) == (65536, 32)
    assert load_settings(None, environ={"STREAM_SERVICE__LIMITS__MAX_JSON_DEPTH": "8"}).limits.max_json_depth == 8
    with pytest.raises(ConfigError, match=r"limits\.max_json_depth: expected an integer >= 4 and <= 500, found 5000"):
        load_settings(None, environ={"STREAM_SERVICE__LIMITS__MAX_JSON_DEPTH": "5000"})
