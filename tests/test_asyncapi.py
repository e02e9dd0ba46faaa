"""schemas/asyncapi.yaml agrees with the code: the topics the infer stage and the MQTT bridge publish, the
bridge's QoS and retain flags, the camera status fields and states, and the verdict schema it points to."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from stream_service.wire.messages import CameraState, CameraStatus, topic_of

REPO = Path(__file__).resolve().parents[1]
DOC = yaml.safe_load((REPO / "schemas" / "asyncapi.yaml").read_text())


def test_the_zeromq_topics_are_those_the_pipeline_publishes(make_verdict: typing.Any) -> None:
    status = CameraStatus(camera_id="cam0", seq=1, capture_ns=1, state="online", since_ns=1)
    topics = {topic_of(make_verdict("cam0", 1)), topic_of(status)}
    documented = {c.replace("{camera}", "cam0") for c, v in DOC["channels"].items() if v["servers"] == ["zeromq"]}
    assert topics <= documented and "highlights.cam0" in documented


def test_the_mqtt_channels_carry_the_bridges_qos_and_retain_flags() -> None:
    mqtt = {c: v["subscribe"]["bindings"]["mqtt"] for c, v in DOC["channels"].items() if v["servers"] == ["mqtt"]}
    assert mqtt == {
        "{prefix}/{camera}/verdict": {"qos": 1, "retain": False},
        "{prefix}/{camera}/status": {"qos": 1, "retain": True},
        "{prefix}/{camera}/highlight": {"qos": 0, "retain": True},
    }
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is missing: pip install 'stream-service[mqtt]'")
    from stream_service.bridges.mqtt import OFFLINE

    states = DOC["channels"]["{prefix}/{camera}/status"]["subscribe"]["message"]["payload"]["enum"]
    assert states == [*typing.get_args(CameraState), OFFLINE]


def test_the_messages_match_the_models() -> None:
    verdict = DOC["components"]["messages"]["verdict"]["payload"]["$ref"]
    assert (REPO / "schemas" / verdict).is_file()
    status = DOC["components"]["messages"]["cameraStatus"]["payload"]
    assert set(status["properties"]) == set(CameraStatus.model_fields)
    assert status["properties"]["state"]["enum"] == list(typing.get_args(CameraState))
