"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver), driven
through Selenium (the maintained WebDriver client).

Checks what a person sees: the login page, the fleet table and chart, a live update arriving
on screen without a reload (SSE), the meter page's per-phase values, bill, events,
firmware/OTA and the command controls (reply and time-out); then roles: a viewer who cannot
send a command, an operator who can, an admin who calibrates, and the meter page's audit
log showing all three. With LIPARI_SCREENSHOTS=1 the screenshots are also
written to docs/screenshots/ (fleet.png, meter.png); otherwise to the test's temp dir.
"""
import os
import shutil
import time

import pytest

from headend_harness import FLEET_MORE, ROOT, fill, rt_record
from headend.store import Store
from headend.web import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1"]


class Browser:
    """A headless Chromium through Selenium, with the few helpers the tests use: go, js,
    wait for a JS condition (failing with the page text), size, screenshot."""

    def __init__(self, tmp):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        opts.page_load_strategy = "eager"
        for f in FLAGS + ["--user-data-dir=%s" % os.path.join(tmp, "chr"),
                          "--window-size=1280,1000"]:
            opts.add_argument(f)
        # the Debian driver, never a download (Selenium Manager is not used with a path)
        self.d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)

    def go(self, url):
        self.d.get(url)

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def wait(self, script, timeout_s=10, what=""):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.js(script)
            if last:
                return last
            time.sleep(0.1)
        pytest.fail("waited %s s for %s; last value %r; page text: %s" % (
            timeout_s, what or script, last, (self.js("return document.body.innerText") or "")[:600]))

    def size(self, w, h):
        self.d.set_window_size(w, h)

    def screenshot(self, path):
        png = self.d.get_screenshot_as_png()
        with open(path, "wb") as f:
            f.write(png)
        return png

    def close(self):
        self.d.quit()

    def login(self, base, user, password, then="/"):
        """Log in through the login form as a person would; lands on `then`."""
        self.go("about:blank")                 # never fill the previous page's form
        self.d.delete_all_cookies()
        self.go(base + "/login?next=" + then)
        self.wait("return document.querySelector('#login-form')", what="the login form")
        self.js("const f = document.querySelector('#login-form'); f.username.value = arguments[0];"
                "f.password.value = arguments[1]; f.submit()", user, password)
        self.wait("return location.pathname == %r && document.readyState != 'loading'" % then,
                  what="landing on %s after the login" % then)


PASSWORDS = {"ada": "admin-password-1", "otto": "operator-password-1",
             "vera": "viewer-password-1"}


class FakeCommander:
    def send(self, meter_id, cmd, args, timeout_s):
        if cmd == "calibrate":
            return {"ok": True, "result": {"phase": args.get("phase"), "chv": 2061}}
        if cmd == "slow":
            raise TimeoutError("no reply")
        if cmd == "reset":
            return {"ok": False, "error": "unauthorised", "msg": "reset needs a signed request"}
        return {"ok": True, "echo": cmd, "args": args, "meter": meter_id}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("browser"))
    store = Store("sqlite:///" + os.path.join(tmp, "web.db"))
    fill(store, days=3)
    fill(store, days=3, fleet=FLEET_MORE)
    store.set_status("m-flat-5", {"online": False})      # one meter gone quiet
    store.commit()
    srv = serve(store, port=0, poll_s=0.25)
    srv.state.commander = FakeCommander()
    for name, role in (("ada", "admin"), ("otto", "operator"), ("vera", "viewer")):
        srv.state.users.add(name, role, PASSWORDS[name])
    b = Browser(tmp)
    yield srv, store, b, tmp
    b.close()
    srv.stop()
    store.close()


def shots_dir(tmp):
    if os.environ.get("LIPARI_SCREENSHOTS") == "1":
        d = os.path.join(ROOT, "docs", "screenshots")
        os.makedirs(d, exist_ok=True)
        return d
    return tmp


def test_login_page(site):
    srv, store, b, tmp = site
    b.d.delete_all_cookies()
    b.go(srv.url + "/meter/m-pv-2")                # no session: the login page, then back
    b.wait("return location.pathname == '/login' && document.querySelector('#login-form')",
           what="redirect to the login page")
    b.js("const f = document.querySelector('#login-form'); f.username.value = 'ada';"
         "f.password.value = 'wrong-password'; f.submit()")
    b.wait("return document.querySelector('#login-message') && document.querySelector("
           "'#login-message').textContent.includes('Wrong user name or password')",
           what="the refusal on the login page")
    b.login(srv.url, "ada", PASSWORDS["ada"], "/meter/m-pv-2")
    b.wait("return document.querySelector('#who') && document.querySelector('#who')"
           ".textContent.includes('ada (admin)')", what="the user in the header")


def test_fleet_page_live_update(site):
    srv, store, b, tmp = site
    b.login(srv.url, "ada", PASSWORDS["ada"])
    b.wait("return document.querySelectorAll('#fleet-table tbody tr[data-meter]').length == 5",
           what="five meters in the fleet table")
    cell = "return document.querySelector('tr[data-meter=\"m-house-1\"] td.p_w').textContent"
    assert b.js(cell) == "250 W"
    assert "online" in b.js("return document.querySelector('tr[data-meter=\"m-house-1\"] "
                            "td.state').textContent")
    b.wait("return window.Chart && Chart.getChart('energy-chart') && "
           "Chart.getChart('energy-chart').data.labels.length == 96", what="fleet energy chart")
    total = b.js("return Chart.getChart('energy-chart').data.datasets[0].data"
                 ".reduce((a, b) => a + b, 0)")
    assert total > 10                       # kWh over a day for five meters
    assert "offline" in b.js("return document.querySelector('tr[data-meter=\"m-flat-5\"] "
                             "td.state').textContent")
    b.js("window.__noReload = 42")
    # a new live reading enters the database (as ingest would write it) ...
    store.add_rt("m-house-1", rt_record(1767484900, 4321.0))
    store.commit()
    # ... and shows up on screen through SSE, without a reload
    b.wait("return document.querySelector('tr[data-meter=\"m-house-1\"] td.p_w').textContent "
           "== '4,321 W'", timeout_s=8, what="live power update on the fleet page")
    assert b.js("return window.__noReload") == 42
    assert b.js("return document.querySelector('#live-state').textContent") == "live"
    # the meter goes offline (last will): the state flips on screen
    store.set_status("m-pv-2", {"online": False})
    store.commit()
    b.wait("return document.querySelector('tr[data-meter=\"m-pv-2\"] td.state')"
           ".textContent.includes('offline')", timeout_s=8, what="offline state on screen")
    store.set_status("m-pv-2", {"online": True})
    store.commit()
    b.wait("return !document.querySelector('tr[data-meter=\"m-pv-2\"] td.state')"
           ".textContent.includes('offline')", timeout_s=8, what="back online")
    time.sleep(1.2)                         # the row flash animation ends
    png = b.screenshot(os.path.join(shots_dir(tmp), "fleet.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000


def test_meter_page(site):
    srv, store, b, tmp = site
    b.size(1280, 1500)
    b.login(srv.url, "ada", PASSWORDS["ada"], "/meter/m-plant-3")
    b.wait("return document.querySelectorAll('#phases tr.ph').length == 3",
           what="three phase rows")
    assert b.js("return document.querySelector('#phases tr[data-phase=\"2\"] td.v')"
                ".textContent") == "230.8 V"
    assert b.js("return document.querySelector('#phases tr[data-phase=\"1\"] td.f')"
                ".textContent") == "50.012 Hz"
    b.wait("return document.querySelector('#bill-projected')", what="projected bill")
    assert b.js("return document.querySelector('#bill-projected').textContent").startswith("EUR ")
    b.wait("return window.Chart && Chart.getChart('energy-chart') && "
           "Chart.getChart('energy-chart').data.labels.length == 96", what="meter energy chart")
    # week view: hourly buckets
    b.js("document.querySelector('#period button[data-period=\"week\"]').click()")
    b.wait("return Chart.getChart('energy-chart').data.labels.length == 168", what="week chart")
    text = b.js("return document.body.innerText")
    assert "sag" in text and "power_up" in text          # events
    assert "0.3.1" in text and "plc" in text             # firmware, transport
    # live per-phase update
    store.add_rt("m-plant-3", dict(rt_record(1767484950, 9000.0, phases=3), v_mv=[241000, 242000,
                                                                                 243000]))
    store.commit()
    b.wait("return document.querySelector('#phases tr[data-phase=\"3\"] td.v').textContent "
           "== '243.0 V'", timeout_s=8, what="live voltage update")
    # the live power chart got a second point per phase, 3 kW each
    b.wait("return Chart.getChart('power-chart').data.labels.length == 2", what="power chart")
    assert b.js("return Chart.getChart('power-chart').data.datasets.map(d => d.data[1])") == \
        [3000, 3000, 3000]
    # a run of readings, each of which must arrive on screen in turn
    import math
    for k in range(8):
        p_w = 9000 + 3000 * math.sin(k / 2.0)
        store.add_rt("m-plant-3", rt_record(1767484960 + 10 * k, p_w, phases=3))
        store.commit()
        b.wait("return Chart.getChart('power-chart').data.labels.length == %d" % (k + 3),
               timeout_s=5, what="live reading %d in the power chart" % k)
    # commands: a reply, then a time-out, both shown
    b.js("const f = document.querySelector('#cmd-form'); f.cmd.value = 'status';"
         "f.args.value = '{\"x\": 1}'; f.requestSubmit()")
    b.wait("return document.querySelector('#cmd-reply').textContent.includes('\"echo\": "
           "\"status\"')", what="command reply on screen")
    b.js("const f = document.querySelector('#cmd-form'); f.cmd.value = 'slow';"
         "f.args.value = ''; f.requestSubmit()")
    b.wait("return document.querySelector('#cmd-reply').textContent.startsWith('time-out:')",
           what="command time-out on screen")
    assert "did not answer" in b.js("return document.querySelector('#cmd-reply').textContent")
    b.js("const f = document.querySelector('#cmd-form'); f.cmd.value = 'reset';"
         "f.args.value = ''; f.requestSubmit()")
    b.wait("return document.querySelector('#cmd-reply').textContent.startsWith('the meter "
           "refused it') && document.querySelector('#cmd-reply').className.includes('err')",
           what="refusal shown as an error")
    b.js("const f = document.querySelector('#cmd-form'); f.cmd.value = 'status';"
         "f.args.value = ''; f.requestSubmit()")
    b.wait("return document.querySelector('#cmd-reply').textContent.includes('reply after')",
           what="reply again")
    b.js("document.querySelector('#period button[data-period=\"day\"]').click()")
    b.wait("return Chart.getChart('energy-chart').data.labels.length == 96", what="day chart")
    png = b.screenshot(os.path.join(shots_dir(tmp), "meter.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000


def send(b, cmd, args=""):
    b.js("const f = document.querySelector('#cmd-form'); f.cmd.value = arguments[0];"
         "f.args.value = arguments[1]; document.querySelector('#cmd-reply').textContent = '';"
         "f.requestSubmit()", cmd, args)
    return b.wait("const t = document.querySelector('#cmd-reply').textContent;"
                  "return !t.startsWith('sending') && t", what="the answer to %s" % cmd)


def test_roles_and_the_audit_log(site):
    """A viewer cannot send a command, an operator can (but cannot calibrate), an admin
    calibrates; the meter page's audit log shows all three, with who and the answer."""
    srv, store, b, tmp = site
    b.size(1280, 1800)
    page = "/meter/m-house-1"
    b.login(srv.url, "vera", PASSWORDS["vera"], page)
    b.wait("return document.querySelector('#cmd-role').textContent.includes('You are a viewer')",
           what="the viewer's note")
    assert send(b, "ping").startswith("not allowed: 'ping' needs the operator role; vera is "
                                      "viewer")
    b.js("document.querySelector('#logout').click()")
    b.wait("return location.pathname == '/login'", what="logged out")
    b.login(srv.url, "otto", PASSWORDS["otto"], page)
    reply = send(b, "ping")
    assert reply.startswith("reply after") and '"echo": "ping"' in reply
    assert send(b, "calibrate", '{"phase": 1, "v_mv": 230000}').startswith(
        "not allowed: 'calibrate' needs the admin role; otto is operator")
    b.login(srv.url, "ada", PASSWORDS["ada"], page)
    reply = send(b, "calibrate", '{"phase": 1, "v_mv": 230000, "action": "apply"}')
    assert reply.startswith("reply after") and '"chv": 2061' in reply
    b.wait("return document.querySelectorAll('#audit tbody tr[data-user]').length >= 6",
           what="the audit log on the meter page")
    rows = b.js("return [...document.querySelectorAll('#audit tbody tr[data-user]')].map("
                "r => [...r.cells].map(c => c.textContent))")
    seen = [(r[1], r[2], r[3], r[5]) for r in rows]          # user, role, command, outcome
    assert seen == [("ada", "admin", "calibrate", "ok"), ("ada", "admin", "calibrate", "sent"),
                    ("otto", "operator", "calibrate", "denied"),
                    ("otto", "operator", "ping", "ok"), ("otto", "operator", "ping", "sent"),
                    ("vera", "viewer", "ping", "denied")]
    assert '"chv":2061' in rows[0][6] and '"v_mv":230000' in rows[0][4]
    png = b.screenshot(os.path.join(shots_dir(tmp), "audit.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
