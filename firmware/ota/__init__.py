# Signed over-the-air updates (docs/ota.md): verifier (ed25519, sha512), manifest, the
# switch record's writer side (record.py; the reader is the bootstrap, /boot.py), the
# staging of a download into the inactive slot (stage.py) and the agent that drives it
# over MQTT or HTTP (agent.py).
