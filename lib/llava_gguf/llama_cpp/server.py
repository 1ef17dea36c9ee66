"""llama-server for a run's recommended configuration: serve-llava.sh, and a server started from Python.

Both take their argv from the flag table (`flags.server_command` / `flags.script_text` with the
server as the tool), so the server runs with exactly the files, threads, masks, image budget and
chat template that 07_tune measured for `run-llava.sh`.

What a server run leaves out of the measured settings, and why (`SERVE_DROPS`):
- `n_predict`: tune measures answers of a fixed length; as a server default it would cut every chat
  answer there (a client asks for `max_tokens` per request);
- `log_verbosity`: level 4 is for the timing lines of mtmd-cli's log; the server's own `timings`
  object in each response carries what is measured here.
And how it applies the chat template (row `jinja`): a run's `chat_template: vicuna` (or none) becomes
`--jinja` with no `--chat-template`, so the server renders the Vicuna template every project GGUF
carries (text_model.VICUNA_CHAT_TEMPLATE, the text of llama.cpp's built-in "vicuna"). That is llama-mtmd-cli's
prompt token for token, image included (tests/test_server.py): the server's non-Jinja path joins an
image and the text after it with a newline that mtmd-cli does not put there (2 more tokens, another
answer). And the chat page needs it: it sends its own tools (get_datetime, ...) with every message,
which the pinned server refuses without Jinja ("tools param requires --jinja flag"). Given the name
"vicuna" with Jinja the server would read the word as the template. Any other template name keeps
`--no-jinja --chat-template NAME` (the page then cannot send).

The chat page (llama_cpp/webui.py, `make webui`): serve-llava.sh passes `--path <the built page>`
(row `ui_path`) when the page is built at the time it starts, and says so either way; the API does
not need it.

The server binds 127.0.0.1 (loopback) unless asked otherwise. The pinned llama-server only finds
out that its port is taken after loading the model ("couldn't bind HTTP server socket"), so both
the script and `start` check the port first and say which one and what to do.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil

from . import flags, webui

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
SCRIPT_NAME = "serve-llava.sh"
SERVE_DROPS = ("n_predict", "log_verbosity")
# The template every project text GGUF carries in Jinja form (text_model.VICUNA_CHAT_TEMPLATE).
GGUF_TEMPLATE = "vicuna"


class ServerError(RuntimeError):
    """llama-server could not be started, did not get ready, or its port is taken; names its log."""


class PortInUse(ServerError):
    pass


def serve_settings(settings: Mapping[str, Any], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> dict[str, Any]:
    """The settings of a run (files included) as the server takes them: SERVE_DROPS left out, the
    Vicuna template as the GGUF's own with Jinja (see the module doc)."""
    out = {k: v for k, v in settings.items() if k not in SERVE_DROPS}
    gguf_template = out.get("chat_template") in (None, GGUF_TEMPLATE)
    if gguf_template:
        out["chat_template"] = None
    return {**out, "jinja": gguf_template, "host": host, "port": port}


def port_taken_message(host: str, port: int, how: str = "") -> str:
    return (f"port {port} on {host} is already in use (another llama-server, or a second `make serve`?). "
            f"Stop the process listening there (`ss -ltnp 'sport = :{port}'` names it) or choose another "
            f"port: {how or f'PORT={port + 1} make serve'}")


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because the address is taken (what llama-server would hit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # llama-server's httplib sets SO_REUSEADDR too: a port in TIME_WAIT is not "in use" for it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nothing listens on now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the script
# serve-llava.sh's own lines around flags.script_text's: HOST/PORT from the environment, the port
# check, the addresses. `exec` hands the terminal's Ctrl-C straight to llama-server, whose handler
# stops it cleanly (slots finish, sockets close).
_PRELUDE = [
    "# HOST / PORT in the environment stand for --host / --port (an option on the command line wins).",
    'if [ -n "${HOST:-}" ] && ! given --host; then user=(--host "$HOST" ${user[@]+"${user[@]}"}); fi',
    'if [ -n "${PORT:-}" ] && ! given --port; then user=(--port "$PORT" ${user[@]+"${user[@]}"}); fi',
]
_VALUE = [
    "value() {  # value OPTION: the last value the command gives it",
    '  local i v=""',
    '  for ((i = 1; i < ${#cmd[@]} - 1; i++)); do [ "${cmd[i]}" = "$1" ] && v="${cmd[i+1]}"; done',
    "  printf '%s' \"$v\"",
    "}",
]
_BEFORE_EXEC = [
    'host="$(value --host)"; port="$(value --port)"',
    'probe="$host"; case "$probe" in 0.0.0.0|"") probe=127.0.0.1;; "::") probe=::1;; esac',
    "# A connection that succeeds means something already listens there: llama-server would load the",
    "# model first and only then fail to bind.",
    'if (exec 3<>"/dev/tcp/$probe/$port") 2>/dev/null; then',
    f"  echo \"{SCRIPT_NAME}: port $port on $host is already in use (another llama-server, or a second"
    " make serve?). Stop the process listening there (ss -ltnp 'sport = :$port' names it) or choose another"
    " port: PORT=$((port + 1)) $0, or $0 --port $((port + 1))\" >&2",
    "  exit 1",
    "fi",
    'show="$host"; case "$show" in *:*) show="[$show]";; esac',
    "echo \"  OpenAI-compatible API: http://$show:$port/v1 (chat: /v1/chat/completions; any api_key)\" >&2",
    'if [ -n "$page" ]; then',
    "  echo \"  web page:              http://$show:$port/ (llama-server's chat page, from $page)\" >&2",
    "else",
    f"  echo \"  web page:              unavailable: the chat page is not built; {webui.BUILD_HINT}, then restart"
    " this script (the API above works without it)\" >&2",
    "fi",
    "echo \"  ready once it logs 'listening on'; Ctrl-C stops it\" >&2",
]


def _page_lines(folder: str | Path) -> list[str]:
    """The chat page's lines: row `ui_path`'s option with the built page's folder, if it is built when
    the script starts (a user's own --path wins); `page` names what is served, empty for none."""
    row = flags.BY_KEY["ui_path"]
    q = shlex.quote
    return [f"ui={q(str(folder))}  # llama-server's chat page: `make webui` builds it there",
            'page=""',
            f"if given {' '.join(q(o) for o in row.overridden_by)}; then page=\"$(value {q(row.option)})\"",
            f'elif [ -f "$ui/index.html" ] && [ -f "$ui/{webui.MARKER}" ]; then cmd+=({q(row.option)} "$ui"); page="$ui"',
            "fi"]


def script_text(server: str | Path, settings: Mapping[str, Any], extra_args: Iterable[str] = (),
                header: Iterable[str] = (), name: str = SCRIPT_NAME, ui_dir: str | Path | None = None) -> str:
    """serve-llava.sh: llama-server on a run's settings (files included), bound to 127.0.0.1:8080
    unless HOST/PORT or --host/--port say otherwise; with the chat page in `ui_dir` (default: where
    `make webui` builds it) once that is built."""
    header = [*header, "Starts llama-server with this configuration; HOST=0.0.0.0 PORT=9000 or --host/--port",
              "choose the address (default 127.0.0.1:8080, this machine only)."]
    served = {**serve_settings(settings), "ui_path": None}  # rendered by _page_lines, when built
    before = [*_VALUE, *_page_lines(ui_dir or webui.ui_dir()), *_BEFORE_EXEC]
    return flags.script_text(server, served, extra_args, header, tool=flags.SERVER, name=name,
                             prelude=_PRELUDE, before_exec=before)


# ----------------------------------------------------------------------------- a server process
@dataclass
class Server:
    """A running llama-server; `stop()` (or leaving the `with` block) ends it."""

    argv: list[str]
    host: str
    port: int
    log_path: Path
    process: subprocess.Popen
    started_s: float = field(default_factory=time.perf_counter)
    ready_s: float | None = None  # spawn -> /health answered 200

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def log_tail(self, n: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 10) -> tuple[int, Any]:
        """GET a server endpoint: (HTTP status, decoded JSON or text)."""
        return request(self.url + path, timeout=timeout)

    def post(self, path: str, body: Mapping[str, Any], timeout: float = 300) -> tuple[int, Any]:
        return request(self.url + path, body, timeout=timeout)

    def slot_action(self, action: str, filename: str, slot: int = 0) -> dict[str, Any]:
        """Save or restore a slot's KV cache and tokens (image chunks included) as a file in the
        server's `--slot-save-path` folder (row `slot_save_path`); the server's answer, with its timings."""
        status, body = self.post(f"/slots/{slot}?action={action}", {"filename": filename})
        if status != 200:
            raise ServerError(f"slot {slot} {action} of {filename} failed: HTTP {status}: {body}")
        return body

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system, all its threads): a turn's load record takes
        it out of the machine's busy time, as run_mtmd does with the tool's rusage."""
        t = psutil.Process(self.process.pid).cpu_times()
        return t.user + t.system

    def memory(self) -> dict[str, float]:
        """The server process's resident memory now (`process_memory`)."""
        return process_memory(self.process.pid)

    def stop(self, timeout: float = 30) -> int:
        """SIGINT (llama-server's clean shutdown), then SIGKILL if it has not ended within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("llama-server on port %d did not stop within %.0f s of SIGINT; killing it", self.port, timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- memory
# The server's own log lines on memory, as the pinned tree prints them at log level 4 (`-lv 4`; at its
# default level neither is printed): the KV cache allocated at load (src/llama-kv-cache.cpp; one line
# per cache, a model with sliding-window layers has two), and the host-memory prompt cache after each
# update (tools/server/server-task.cpp; idle slots' prompts, images included, saved for a later hit,
# up to `--cache-ram` MiB, 8192 by default).
KV_CACHE_LINE = re.compile(
    r"llama_kv_cache: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells, +(?P<layers>\d+) layers, +"
    r"(?P<seqs>\d+)/(?P<streams>\d+) seqs\), K \((?P<type_k>\w+)\): +(?P<k_mib>[\d.]+) MiB, "
    r"V \((?P<type_v>\w+)\): +(?P<v_mib>[\d.]+) MiB")
PROMPT_CACHE_LINE = re.compile(r" - cache state: (?P<prompts>\d+) prompts, (?P<mib>[\d.]+) MiB \(limits: "
                               r"(?P<limit_mib>[\d.]+) MiB")
MEMORY_LOG_VERBOSITY = 4


CONTEXT_LINE = "llama_context: constructing llama_context"


def kv_cache(log_text: str) -> dict[str, Any] | None:
    """The KV cache(s) a server (or any llama.cpp tool) allocated, from its log: MiB in all, cells,
    layers, K/V types and MiB; None when the log has no such line (a log level below 4).

    Only the last context's: at debug level (-v) the log also has the memory-fitting dry run's context
    (common_fit_params, its buffers 0.00 MiB) before the real one."""
    last = log_text.rfind(CONTEXT_LINE)
    caches = [m.groupdict() for m in KV_CACHE_LINE.finditer(log_text, max(last, 0))]
    if not caches:
        return None
    num = {k: sum(float(c[k]) for c in caches) for k in ("mib", "k_mib", "v_mib")}
    return {"kv_cache_mib": num["mib"], "kv_cache_k_mib": num["k_mib"], "kv_cache_v_mib": num["v_mib"],
            "kv_cache_cells": max(int(c["cells"]) for c in caches),
            "kv_cache_layers": sum(int(c["layers"]) for c in caches), "kv_cache_seqs": int(caches[0]["seqs"]),
            "kv_cache_type_k": caches[0]["type_k"], "kv_cache_type_v": caches[0]["type_v"], "kv_caches": len(caches)}


def prompt_cache(log_text: str) -> dict[str, Any] | None:
    """The host-memory prompt cache as the log last reported it, and its largest size; None without such lines."""
    states = [m.groupdict() for m in PROMPT_CACHE_LINE.finditer(log_text)]
    if not states:
        return None
    return {"prompt_cache_prompts": int(states[-1]["prompts"]), "prompt_cache_mib": float(states[-1]["mib"]),
            "prompt_cache_max_mib": max(float(s["mib"]) for s in states),
            "prompt_cache_limit_mib": float(states[-1]["limit_mib"])}


# glibc gives each thread that allocates its own malloc arena: a heap reserved as 64 MiB (HEAP_MAX_SIZE
# on 64-bit) at a 64 MiB-aligned address. Their resident part is what llama-server's HTTP threads keep
# of the requests they served, one arena per thread, hence its growth per turn (README, server memory).
# A ggml buffer that happened to be mmap-ed at such an address would be counted too (not seen).
ARENA_BYTES = 64 << 20
_SMAPS_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(\S*)$")


def thread_arenas(smaps: str) -> dict[str, float]:
    """From a /proc/<pid>/smaps text: the resident MiB of glibc's thread arenas (anonymous writable
    mappings of at most 64 MiB at a 64 MiB boundary) and how many have resident pages."""
    kib, count, arena = 0, 0, False
    for line in smaps.splitlines():
        m = _SMAPS_MAPPING.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            arena = (m.group(4) == "0" and not m.group(5) and m.group(3).startswith("rw")
                     and start % ARENA_BYTES == 0 and end - start <= ARENA_BYTES)
        elif arena and line.startswith("Rss:"):
            rss = int(line.split()[1])
            kib, count = kib + rss, count + (rss > 0)
    return {"rss_arenas_mib": kib / 1024, "arenas": count}


def process_memory(pid: int) -> dict[str, float]:
    """A process's resident memory now (psutil): in all, and the part not backed by files (the model's
    mmap-ed weights are file-backed; the KV cache, compute buffers and prompt cache are not), plus the
    peak resident size and the threads' malloc arenas where /proc has them (Linux: VmHWM, smaps). MiB."""
    info = psutil.Process(pid).memory_info()
    out = {"rss_mib": info.rss / 2**20}
    if getattr(info, "shared", None) is not None:
        out["rss_anon_mib"] = (info.rss - info.shared) / 2**20
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        if m:
            out["peak_rss_mib"] = int(m.group(1)) / 1024
        out.update(thread_arenas(Path(f"/proc/{pid}/smaps").read_text()))
    except OSError:
        pass
    return out


def request(url: str, body: Mapping[str, Any] | None = None, timeout: float = 300) -> tuple[int, Any]:
    """One HTTP request; an error status is returned, not raised (its JSON body says why)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def start(server: str | Path, settings: Mapping[str, Any], log_path: str | Path, host: str = DEFAULT_HOST,
          port: int | None = None, extra_args: Iterable[str] = (), ready_timeout_s: float = 300) -> Server:
    """Start llama-server on a run's settings (files included); returns once /health says ready.

    `port=None` takes a free port. The server's output goes to `log_path`. A taken port raises
    PortInUse before anything starts; a server that exits or is not ready within `ready_timeout_s`
    is stopped and raises ServerError with its log's last lines.
    """
    port = port or free_port(host)
    if port_in_use(host, port):
        raise PortInUse(port_taken_message(host, port, "start(..., port=None) takes a free one"))
    argv = flags.server_command(server, serve_settings(settings, host, port), extra_args)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting llama-server on %s:%d (log %s)", host, port, log_path)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(argv, host, port, log_path, proc)
    try:
        wait_ready(srv, ready_timeout_s)
    except BaseException:
        srv.stop(timeout=10)
        raise
    return srv


def wait_ready(srv: Server, timeout_s: float) -> None:
    """Poll /health: 503 while the model loads, 200 once the server takes requests."""
    deadline = time.perf_counter() + timeout_s
    while True:
        rc = srv.process.poll()
        if rc is not None:
            raise ServerError(f"llama-server exited with status {rc} before it was ready; log {srv.log_path}\n"
                              f"command: {' '.join(srv.argv)}\nlast lines:\n{srv.log_tail()}")
        try:
            status, _ = srv.get("/health", timeout=5)
            if status == 200:
                srv.ready_s = time.perf_counter() - srv.started_s
                log.info("llama-server ready at %s after %.1f s", srv.url, srv.ready_s)
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            pass  # not listening yet
        if time.perf_counter() > deadline:
            raise ServerError(f"llama-server at {srv.url} not ready after {timeout_s:.0f} s; log {srv.log_path}\n"
                              f"last lines:\n{srv.log_tail()}")
        time.sleep(0.25)
