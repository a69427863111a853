"""An OTA offer must fit the meter's resting MQTT receive buffer (docs/ota.md: at most
OFFER_MAX_BYTES of payload): the head-end refuses to publish a larger one with a clear
error instead of letting every meter refuse it."""
import json
import os

import pytest

from headend.ota import OFFER_MAX_BYTES, OtaError, Release


def _release(d, boards):
    os.makedirs(d)
    m = {"v": 1, "version": "1.2.3", "min_version": "1.2.3", "boards": boards,
         "kind": "mpy", "created": 1767225600, "expires": 1769817600, "block": 1024,
         "dir_size": 100, "body_size": 5000, "files": 40, "table_sha256": "ab" * 32,
         "body_sha256": "cd" * 32, "trial_s": 600}
    with open(os.path.join(d, "manifest.json"), "wb") as f:
        f.write(json.dumps(m, sort_keys=True, separators=(",", ":")).encode())
    with open(os.path.join(d, "manifest.sig"), "w") as f:
        f.write("ee" * 64 + "\n")
    return Release(d)


def test_an_offer_larger_than_the_meters_buffer_is_refused_with_the_reason(tmp_path):
    small = _release(str(tmp_path / "small"), ["stm32_stpm34_33_ct"])
    body = small.offer("r1.meter-0001", "https://ota.example.net/ota/1.2.3/image.bin")
    assert len(body) <= OFFER_MAX_BYTES and json.loads(body)["id"] == "r1.meter-0001"
    big = _release(str(tmp_path / "big"), ["board_with_a_long_name_%02d" % i for i in range(20)])
    with pytest.raises(OtaError) as e:
        big.offer("r1.meter-0001")
    assert "more than the %d a meter takes" % OFFER_MAX_BYTES in str(e.value)


def test_the_bound_is_the_meters(tmp_path):
    """OFFER_MAX_BYTES is the payload the meter's resting buffer takes on ota/offer
    (firmware/comm/mqtt.py: rx_rest is sized for the cmd topic, 6 bytes shorter)."""
    import re
    src = open(os.path.join(os.path.dirname(__file__), "..", "firmware", "comm",
                            "mqtt.py")).read()
    cmd = int(re.search(r"_CMD_BYTES = const\((\d+)\)", src).group(1))
    # same prefix and id: the offer topic (ota/offer) is 6 bytes longer than cmd, and the
    # QoS 1 packet's other parts are the same
    assert OFFER_MAX_BYTES == cmd - len("ota/offer") + len("cmd")
