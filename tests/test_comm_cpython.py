"""The comm firmware modules also import and work under CPython (fast host tests; the
same code runs on micropython in the other test files)."""
import asyncio
import json
import sys

from comm_harness import ROOT, SAMPLE_INTERVAL
from conftest_broker import mosquitto  # noqa: F401

sys.path.insert(0, ROOT + "/firmware")
sys.path.insert(0, ROOT + "/tests")
from comm import codec, commands, fqueue, mqtt, session  # noqa: E402,F401
import comm_sockconn  # noqa: E402
from comm_fakemeter import FakeMeter  # noqa: E402
from headend.codec import decode  # noqa: E402
from headend.mqttcmd import build_request  # noqa: E402


def test_fqueue_on_the_host_filesystem(tmp_path):
    q = fqueue.FlashQueue(str(tmp_path / "q"), seg_bytes=200, max_segs=3)
    for i in range(12):
        q.append(1, b"rec%02d" % i + b"." * 40)
    assert q.stats()["dropped"] == 3 and len(q) == 9
    q.ack()
    q2 = fqueue.FlashQueue(str(tmp_path / "q"), seg_bytes=200, max_segs=3)
    assert len(q2) == 8 and q2.peek()[1][:5] == b"rec04" and q2.dropped == 3


def test_commands_signed_by_the_headend_helper(tmp_path):
    key = b"k" * 32
    c = commands.Commands(FakeMeter(), key=key, state_path=str(tmp_path / "ctr"))
    rid, req = build_request("preset", {"ai_wh": 9}, key=key, ctr=5)
    got = asyncio.run(c.handle(req))
    assert got[0] == rid and json.loads(got[1])["ok"] is True
    rid, req = build_request("preset", {"ai_wh": 9}, key=key, ctr=5)     # replay
    assert json.loads(asyncio.run(c.handle(req))[1])["error"] == "replay"
    assert open(tmp_path / "ctr").read() == "5"


def test_client_publishes_under_cpython(mosquitto):
    got = []

    async def main():
        c = mqtt.MQTTClient({"client_id": "m1", "host": "127.0.0.1", "port": mosquitto.port,
                             "password": "m1-pw"}, comm_sockconn.connect)
        t = asyncio.create_task(c.run())
        assert await c.wait_connected(5000)
        await c.publish("lipari/v1/m1/interval",
                        codec.encode("interval", SAMPLE_INTERVAL), 1, False, 5000)
        got.append(c.stats["connects"])
        await c.disconnect()
        await t

    asyncio.run(asyncio.wait_for(main(), 20))
    assert got == [1]
    assert decode(codec.encode("interval", SAMPLE_INTERVAL))[1]["ai_wh"] == 5123456


def test_retired_session_key_is_ignored_and_an_unknown_one_refused(tmp_path, capsys):
    """A stored config from older firmware (resend_bytes, retired: docs/decisions/0016)
    must not stop a meter from booting after an update; any other unknown key is still
    a clear error."""
    q = fqueue.FlashQueue(str(tmp_path / "q"))
    s = session.Session("m1", {"host": "x"}, None, q, cfg={"resend_bytes": 2048, "resend_s": 7},
                        info={"fw": "t"})
    assert s.retired == ["resend_bytes"] and "resend_bytes" not in s.cfg
    assert q.hold_ms == 7000                        # resend_s is the queue's hold
    assert "resend_bytes is no longer used" in capsys.readouterr().out
    events = []

    class M(FakeMeter):
        def event(self, kind, phase=0, value=0):
            events.append((kind, phase, value))
    s.attach(M())
    assert events == [("config_ignored", 0, "resend_bytes")]
    try:
        session.Session("m1", {"host": "x"}, None, q, cfg={"resend_byte": 1})
        raise AssertionError("an unknown key was accepted")
    except session.SessionError as e:
        assert "unknown key 'resend_byte'" in str(e) and "resend_s" in str(e)


def test_a_command_task_that_dies_is_restarted_and_counted(tmp_path):
    """A MemoryError while a reply is published (seen at an 80 KiB heap) used to end the
    command task for good: every later command went unanswered, nothing counted. The
    session restarts it, counts it in the status and keeps the error."""
    q = fqueue.FlashQueue(str(tmp_path / "q"))
    s = session.Session("m1", {"host": "x"}, None, q, info={"fw": "t"})
    calls, sent = [], []

    class Cmds:
        after = None

        async def answer(self, payload, head=None):      # what the session calls
            calls.append(payload)
            return "r%d" % len(calls), b"reply-%d" % len(calls)

    async def publish(topic, payload, qos=0, retain=False, timeout_ms=None):
        if not sent:
            sent.append(None)
            raise MemoryError("memory allocation failed, allocating 872 bytes")
        sent.append((topic, payload))

    s.commands = Cmds()
    s.client.publish = publish

    async def main():
        t = asyncio.create_task(s._guard("commands", s._cmd_task))
        s._cmds += [b"one", b"two"]
        s._cmd_wake.set()
        for _ in range(40):                 # the restart waits 1 s
            await asyncio.sleep(0.05)
            if len(sent) == 2:
                break
        t.cancel()

    asyncio.run(main())
    assert calls == [b"one", b"two"], calls
    assert sent[1] == ("lipari/v1/m1/resp", b"reply-2"), sent
    assert s.stats["task_errors"] == 1 and s.status()["task_errors"] == 1
    assert "commands task: MemoryError" in s.client.stats["last_error"]


def test_a_memory_error_right_after_a_connect_drops_the_link_and_is_counted(tmp_path):
    """At a reconnect the heap is at its tightest: a MemoryError while the status is
    published or the command topic subscribed (the connect's on_connect task) ended that
    task, printed as an unretrieved task exception, and the session could stay deaf to
    commands. It drops the link (connected again after the backoff, which publishes and
    subscribes again) and is counted in the status' task_errors."""
    q = fqueue.FlashQueue(str(tmp_path / "q"))
    s = session.Session("m1", {"host": "x"}, None, q, info={"fw": "t"})
    closed = []

    class Conn:
        name = "fake"

        def close(self):
            closed.append(True)

    async def publish(topic, payload, qos=0, retain=False, timeout_ms=None):
        raise MemoryError("memory allocation failed, allocating 263 bytes")

    s.client._conn = Conn()
    s.client._ready = True
    s.client.publish = publish
    asyncio.run(s._on_connect(False))
    assert closed == [True] and not s.client.isconnected()
    assert s.client.stats["mem_errors"] == 1 and s.status()["task_errors"] == 1
    assert "out of memory" in s.client.stats["last_error"]


def test_a_memory_error_in_a_meter_call_is_tried_again_when_the_call_can_be_repeated():
    """At a 64 KiB heap `set rt_s` was answered "config_set failed: MemoryError" (the call
    imports metering.api): a call that gives the same result when made twice (settings,
    readings, presets, time) is made again up to 3 times, 200 ms apart, counted in the
    commands' mem_errors; calibrate is made once (a second calibration step is not the
    same as one) and its MemoryError is the "failed" reply, as before."""
    calls = []

    class Meter:
        def config_set(self, key, value):
            calls.append(("set", key, value))
            if len(calls) == 1:
                raise MemoryError("memory allocation failed, allocating 184 bytes")

        def calibrate(self, args):
            calls.append(("cal",))
            raise MemoryError("memory allocation failed, allocating 184 bytes")

    c = commands.Commands(Meter())
    rep = json.loads(asyncio.run(c.handle(b'{"id": "s1", "cmd": "set", "args": {"rt_s": 5}}'))[1])
    assert rep == {"id": "s1", "ok": True, "result": {"set": ["rt_s"]}}, rep
    assert calls == [("set", "rt_s", 5)] * 2 and c.stats["mem_errors"] == 1
    c.key = b"k" * 32
    _, req = build_request("calibrate", {"phase": 1, "action": "measure"}, key=c.key, ctr=1,
                           rid="c1")
    rep = json.loads(asyncio.run(c.handle(req))[1])
    assert rep["ok"] is False and rep["error"] == "failed" and "MemoryError" in rep["msg"], rep
    assert calls[2:] == [("cal",)] and c.stats["mem_errors"] == 2
