"""Headless Chromium for the report tests: a tiny DevTools-protocol client and the page checks.

Chromium talks the DevTools protocol over a pipe (--remote-debugging-pipe: it reads commands on
fd 3 and writes replies on fd 4, each a JSON message ended by a NUL byte), so no port is opened
and no websocket library is needed. Each page is laid out at 1280 x 800 CSS pixels, then
PAGE_CHECKS runs in it and returns what it found.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = (1280, 800)
STDERR_MAX_PX = 400
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "about:blank"]

# What each page must not have; returns {check: [findings]} (an empty list: passed).
PAGE_CHECKS = r"""(() => {
  const vw = %(width)d, out = {wide: [], float_repr: [], dict_repr: [], no_alt: [], tall_stderr: [],
                                tqdm_warning: [], plural: []};
  const describe = e => e.tagName.toLowerCase() + (e.className && typeof e.className === 'string' ?
      '.' + e.className.trim().split(/\s+/).slice(0, 2).join('.') : '') +
      ' "' + (e.innerText || e.getAttribute('src') || '').trim().slice(0, 60).replace(/\s+/g, ' ') + '"';
  for (const e of document.body.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || getComputedStyle(e).visibility === 'hidden') continue;
    if (r.right > vw + 1) out.wide.push(describe(e) + ' right=' + Math.round(r.right));
  }
  if (document.documentElement.scrollWidth > vw + 1)
    out.wide.push('page scrolls sideways: scrollWidth=' + document.documentElement.scrollWidth);
  const text = document.body.innerText;
  // Each finding is the line it is on (at most 240 characters around it).
  const find = (re, key) => { for (const m of text.matchAll(re)) {
    const start = Math.max(text.lastIndexOf('\n', m.index) + 1, m.index - 160);
    const end = text.indexOf('\n', m.index);
    out[key].push(text.slice(start, Math.min(end < 0 ? text.length : end, m.index + 80)).replace(/\s+/g, ' '));
  } };
  find(/\d+\.\d{6,}/g, 'float_repr');
  find(/\{'[^'\n]*':|speedup=/g, 'dict_repr');
  find(/TqdmWarning|IProgress not found/g, 'tqdm_warning');
  find(/(^|[^\d.,])1 (runs|cases|variants|configurations|repetitions|files|steps|images|tokens)\b/g, 'plural');
  for (const img of document.images)
    if (!(img.getAttribute('alt') || '').trim()) out.no_alt.push(describe(img));
  // A cell's log is one red area however many outputs it came in: their heights add up per cell.
  for (const area of document.querySelectorAll('.jp-OutputArea')) {
    const boxes = area.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]');
    const h = [...boxes].reduce((sum, e) => sum + e.getBoundingClientRect().height, 0);
    if (h > %(stderr)d) out.tall_stderr.push(Math.round(h) + ' px in ' + boxes.length + ' boxes: ' + describe(boxes[0]));
  }
  return out;
})()""" % {"width": VIEWPORT[0], "stderr": STDERR_MAX_PX}


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with a new, empty profile; `check(page)` lays a page out and checks it."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="llava-gguf-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        # In the child: the protocol's fds 3 (commands in) and 4 (replies out). close_fds=False, as
        # subprocess would close them after preexec_fn; the pipes' own fds are not inheritable.
        # Moved above 10 first: a pipe's own fd may be 3 or 4, and dup2 onto itself keeps close-on-exec.
        def fds() -> None:
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._log = tempfile.TemporaryFile()  # chromium's own chatter; a pipe could fill and block it
        self.proc = subprocess.Popen([binary, *FLAGS[:-1], f"--user-data-dir={self.profile}",
                                      f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", FLAGS[-1]],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     preexec_fn=fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self._events: list[dict] = []

    # ------------------------------------------------------------------ protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise BrowserError(f"chromium did not answer within {self.timeout:.0f} s")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise BrowserError(f"chromium closed the DevTools pipe (exit {self.proc.poll()}): {err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    # ------------------------------------------------------------------ pages
    def check(self, page: Path) -> dict[str, list[str]]:
        """Load `page` at the viewport's width, wait for its load event (images included), run PAGE_CHECKS."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            self.send("Page.enable", session)
            self.send("Emulation.setDeviceMetricsOverride", session, width=VIEWPORT[0], height=VIEWPORT[1],
                      deviceScaleFactor=1, mobile=False)
            self._events.clear()
            self.send("Page.navigate", session, url=Path(page).resolve().as_uri())
            self.wait_event("Page.loadEventFired", session)
            result = self.send("Runtime.evaluate", session, expression=PAGE_CHECKS, returnByValue=True)
            if "exceptionDetails" in result:
                raise BrowserError(f"{page}: the checks failed in the page: {result['exceptionDetails']}")
            return result["result"]["value"]
        finally:
            self.send("Target.closeTarget", targetId=target)

    def open(self, url: str) -> "Page":
        """A new tab at the viewport's size on `url`, once its load event fired (close it with .close())."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)
        self._events.clear()
        self.send("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired", session)
        return Page(self, session, target)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def _undo_windows_1252(text: str) -> str:
    """A UTF-8 body that Chromium decoded as windows-1252 (a response without a charset, such as
    llama-server's text/event-stream), decoded again as UTF-8; any other text as it is."""
    raw = bytearray()
    for ch in text:
        try:
            raw += ch.encode("cp1252")
        except UnicodeEncodeError:
            if ord(ch) > 0xFF:
                return text  # not a windows-1252 reading
            raw.append(ord(ch))  # the 5 bytes windows-1252 leaves undefined come through as U+0081 ...
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


class Page:
    """One tab driven as a user would: wait for what it shows, pick files, type, click, screenshot."""

    def __init__(self, browser: Chromium, session: str, target: str):
        self.browser, self.session, self.target = browser, session, target

    def evaluate(self, expression: str):
        """The expression's value in the page (JSON-able; a promise is awaited)."""
        result = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                                   awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str = ""):
        """Poll `expression` until it is truthy; its value. BrowserError naming `what` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"not within {timeout:.0f} s: {what or expression}; the page shows: "
                                   f"{(self.evaluate('document.body.innerText') or '')[:600]!r}")
            time.sleep(0.25)

    def _node(self, selector: str) -> str:
        found = self.browser.send("Runtime.evaluate", self.session,
                                  expression=f"document.querySelector({json.dumps(selector)})")["result"]
        if found.get("subtype") != "node":
            raise BrowserError(f"no element matches {selector!r}")
        return found["objectId"]

    def set_files(self, selector: str, paths) -> None:
        """Pick files in a file input (what choosing them in the file dialog does: its change event fires)."""
        self.browser.send("DOM.setFileInputFiles", self.session, files=[str(Path(p).resolve()) for p in paths],
                          objectId=self._node(selector))

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input (a textarea or a contenteditable) and type into it, as the keyboard would."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.browser.send("Input.insertText", self.session, text=text)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def record_requests(self) -> None:
        """Start recording the page's HTTP requests (the DevTools Network domain) for `exchanges`."""
        self.browser.send("Network.enable", self.session)

    def exchanges(self, url_part: str) -> list[dict]:
        """The finished requests since `record_requests` whose URL contains `url_part`, in order: each
        {url, method, body (what the page sent), response (what it got, a stream's whole text)}."""
        self.evaluate("0")  # take in the events sent so far
        events = [e for e in self.browser._events if e.get("sessionId") == self.session]
        finished = {e["params"]["requestId"] for e in events if e.get("method") == "Network.loadingFinished"}
        out = []
        for e in events:
            if e.get("method") != "Network.requestWillBeSent" or url_part not in e["params"]["request"]["url"]:
                continue
            rid, req = e["params"]["requestId"], e["params"]["request"]
            if rid not in finished:
                continue
            body = req.get("postData")
            if body is None and req.get("hasPostData"):
                body = self.browser.send("Network.getRequestPostData", self.session, requestId=rid)["postData"]
            got = self.browser.send("Network.getResponseBody", self.session, requestId=rid)
            response = got["body"]
            if got.get("base64Encoded"):
                import base64

                response = base64.b64decode(response).decode(errors="replace")
            else:
                response = _undo_windows_1252(response)
            out.append({"url": req["url"], "method": req["method"], "body": body, "response": response})
        return out

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.browser.send("Page.captureScreenshot", self.session, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        self.browser.send("Target.closeTarget", targetId=self.target)
