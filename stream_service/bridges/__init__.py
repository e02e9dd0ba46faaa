"""Plant-protocol bridges: the pipeline's verdicts where PLCs, SCADA and MES already listen.

- ``acks``: which verdicts a broker acknowledged, in order, kept in a small state file;
- ``mqtt``: the MQTT bridge (paho-mqtt), ``stream-service bridge mqtt``;
- ``opcua``: the OPC UA server (asyncua), ``stream-service bridge opcua``.
"""
