# comm: MQTT client (mqtt), payload codec (codec), flash queue (fqueue), commands
# (commands), the session that wires a Meter to MQTT (session), and transports
# (transport, wifi, nbiot, plc). Protocol: docs/protocol.md.
