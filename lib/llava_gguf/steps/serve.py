"""Step 08 (`make conversation`; `make serve` is the server itself): a conversation about each evaluate case's image with the run's serve-llava.sh, timed per turn.

The server is started exactly as a user starts it (`serve-llava.sh`, written by step 07 with the
recommended configuration) on a free loopback port, and stopped at the end, also on failure. Per
case: the case's question with its image, then the follow-ups of `FOLLOW_UPS` about the same image,
through the `openai` client (llama_cpp/chat.py). Per turn, from the server's own `timings`: prompt
tokens processed and taken from the cache; measured by the client: time to the first token and in all.

Memory, per turn: the server's resident memory after the answer (psutil: in all, and the part not
backed by the model's mmap-ed files, the part in glibc's per-thread malloc arenas: what grows per
turn, up to one arena per HTTP thread), its peak, the KV cache it allocated at load and its host-memory
prompt cache, the last two from its own log lines (llama_cpp/server.py `kv_cache`, `prompt_cache`),
which the pinned server prints at log level 4: the script is started with `-lv 4` (its only change to
the user's command; the level adds log lines per request, not per token).

The one-shot reference, per turn: `run-llava.sh --image <the case's image> -p <the turn's question>`
(the recommended configuration, `evaluate.n_predict` tokens), timed from start to exit after the server
has stopped: what a user pays per question without the server. 07_tune's measured median is kept in
the summary too. Answers are capped at the same `evaluate.n_predict` tokens.

A conversation that outlives the server (`restart_summary`): on the first case, a one-slot server
with `--slot-save-path` answers the first question, saves slot 0 and stops; a new server restores
the file and answers the first follow-up. Recorded: the file's size, the server's save and restore
times, and the follow-up's prompt tokens and time to first token, against the fresh first answer's.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..llama_cpp import chat, server, toolchain
from ..reports import serve as serve_report
from ..reports.tables import plural
from ..run import machine_load as load
from ..run.workspace import Run, write_json
from .evaluate import case_inputs

log = logging.getLogger(__name__)

FOLLOW_UPS = ("What else can you see in it?", "Describe its colours in one sentence.")


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:
    return ["llama-server"], []


class ServeError(RuntimeError):
    pass


@dataclass
class ServeResult:
    turns: pd.DataFrame
    summary: dict
    figure: object
    checks: pd.DataFrame

    def __str__(self) -> str:
        s = self.summary
        return (f"{len(self.turns)} turns: first answer {s['first_total_s']:.2f} s, follow-up {s['follow_up_total_s']:.2f} s "
                f"(median; time to first token {s['first_ttft_s']:.2f} s vs {s['follow_up_ttft_s']:.2f} s)")


# A case's first question about an image the server has already seen (an earlier case with the
# same image): the server finds the system prompt and the image in a slot or its prompt cache and
# reuses them across conversations, so it is neither a cold first answer nor a follow-up.
CACHED_IMAGE = "new question, cached image"


def turn_kinds(turns: pd.DataFrame) -> list[str]:
    """Per turn: "first" (the first question about an image new to this server), CACHED_IMAGE, or
    "follow-up". Decided from what was sent (the turn's images), so the checks can test the outcome."""
    seen: set[str] = set()
    kinds = []
    for turn, images in zip(turns["turn"], turns["images"]):
        new = [i for i in images if i not in seen]
        seen.update(images)
        kinds.append("first" if new else CACHED_IMAGE if turn == 1 else "follow-up")
    return kinds


def check_turns(turns: pd.DataFrame) -> pd.DataFrame:
    """The step's acceptance checks, one row each; raises ServeError naming the failed ones.

    A turn that is not "first" must not have encoded its image again: it processed under 1/10 of the
    prompt tokens of the turn that first sent the image, and took at least 90 % of them from the cache
    (the image is the bulk of that prompt; only the question and the earlier answers are new).
    """
    rows = [{"check": "every case asked its first question and all follow-ups",
             "ok": bool((turns.groupby("case")["turn"].max() == 1 + len(FOLLOW_UPS)).all()),
             "detail": f"{plural(turns['case'].nunique(), 'case')}, {plural(len(turns), 'turn')}"}]
    encoded = {}  # image -> prompt tokens of the turn that first sent it
    for row in turns.itertuples():
        if row.kind == "first":
            encoded.update({i: row.prompt_n for i in row.images})
            continue
        base = max(encoded[i] for i in (row.images or turns[turns["case"] == row.case]["images"].iloc[0]))
        ok = row.prompt_n < base / 10 and row.cache_n >= 0.9 * base
        rows.append({"check": f"case {row.case} turn {row.turn} ({row.kind}) took the image from the cache",
                     "ok": bool(ok), "detail": f"{row.prompt_n} new, {row.cache_n} cached; the image's turn had {base}"})
    checks = pd.DataFrame(rows)
    failed = checks[~checks["ok"]]
    if len(failed):
        raise ServeError("conversation checks failed:\n" + "\n".join(f"- {c}: {d}" for c, d in
                                                                      zip(failed["check"], failed["detail"])))
    return checks


def start_script(run: Run, log_path: Path, ready_timeout_s: float, args: tuple[str, ...] = ()) -> server.Server:
    """serve-llava.sh on a free loopback port, ready (its /health answered); `args` go to the script.
    The script execs llama-server: the process is the server itself (its pid, its memory)."""
    script = run.dir / server.SCRIPT_NAME
    if not script.exists():
        raise ServeError(f"{script} does not exist: step 07 (tune) writes it; run `make tune` first")
    port = server.free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["bash", str(script), *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "HOST": server.DEFAULT_HOST, "PORT": str(port)},
                                start_new_session=True)
    srv = server.Server(argv, server.DEFAULT_HOST, port, log_path, proc)
    try:
        server.wait_ready(srv, ready_timeout_s)
    except BaseException:
        srv.stop(timeout=10)
        raise
    return srv


def one_shot(run: Run, image: Path, question: str, log_path: Path, timeout_s: float) -> float:
    """Seconds from start to exit of the run's run-llava.sh on this image and question."""
    started = time.perf_counter()
    toolchain.run_tool(["bash", run.dir / "run-llava.sh", "--image", image, "-p", question], log_path, timeout_s,
                       "run-llava.sh")
    return time.perf_counter() - started


def memory_summary(turns: pd.DataFrame, ready: dict, server_log: str) -> dict:
    """The server's memory: resident at ready, after the first case's conversation (its last turn), the
    part of it in malloc's thread arenas, and at its peak; the KV cache and the prompt cache from its log
    (None where the log lacks the lines)."""
    first = turns[turns["case"] == turns["case"].min()]
    out = {"server_rss_ready_mib": ready.get("rss_mib"), "server_rss_anon_ready_mib": ready.get("rss_anon_mib"),
           "conversation_turns": len(first),
           "server_rss_mib": float(first["rss_mib"].iloc[-1]),
           "server_rss_anon_mib": float(first["rss_anon_mib"].iloc[-1]) if "rss_anon_mib" in first else None,
           # glibc's per-thread arenas: the part that grows per turn, up to one per HTTP thread
           "server_rss_arenas_mib": float(first["rss_arenas_mib"].iloc[-1]) if "rss_arenas_mib" in first else None,
           "server_peak_rss_mib": float(turns["peak_rss_mib"].max()) if "peak_rss_mib" in turns else None}
    kv = server.kv_cache(server_log)
    if kv is None:
        log.warning("the server's log has no 'llama_kv_cache: size = ...' line (started without -lv %d?)",
                    server.MEMORY_LOG_VERBOSITY)
    out.update(kv or {"kv_cache_mib": None})
    out.update(server.prompt_cache(server_log) or {"prompt_cache_mib": None})
    return out


RESTART_FILE = "conversation.bin"


def restart_summary(run: Run, image: Path, question: str, folder: Path, timeout_s: float, max_tokens: int) -> dict:
    """The first question on a one-slot server with `--slot-save-path`, slot 0 saved; a new server
    restores it and answers FOLLOW_UPS[0]. The server's own timings and token counts, the file's size."""
    slots = folder / "slots"
    slots.mkdir(parents=True, exist_ok=True)
    args = ("-np", "1", "--slot-save-path", f"{slots}/")
    with start_script(run, folder / "restart-first.log", timeout_s, args) as srv:
        conv = chat.Conversation(srv.api_url, max_tokens=max_tokens, timeout_s=timeout_s)
        first = conv.ask(question, [image])
        saved = srv.slot_action("save", RESTART_FILE)
    with start_script(run, folder / "restart-second.log", timeout_s, args) as srv:
        restored = srv.slot_action("restore", RESTART_FILE)
        follow = chat.Conversation(srv.api_url, max_tokens=max_tokens, timeout_s=timeout_s,
                                   messages=list(conv.messages)).ask(FOLLOW_UPS[0])
        ready_s = srv.ready_s
    file = slots / RESTART_FILE
    out = {"restart_first_ttft_s": first.ttft_s, "restart_first_prompt_n": first.prompt_n,
           "slot_saved_tokens": saved.get("n_saved"), "slot_save_ms": saved.get("timings", {}).get("save_ms"),
           "slot_file_mib": file.stat().st_size / 2**20, "restart_ready_s": ready_s,
           "slot_restored_tokens": restored.get("n_restored"),
           "slot_restore_ms": restored.get("timings", {}).get("restore_ms"),
           "restored_follow_up_ttft_s": follow.ttft_s, "restored_follow_up_prompt_n": follow.prompt_n,
           "restored_follow_up_cache_n": follow.cache_n}
    file.unlink()  # the KV cache of the whole image (~1.2 GiB at 7B): measured, not kept
    return out


def check_restart(summary: dict) -> dict:
    """The restarted server took the image from the restored file: the follow-up processed under 1/10
    of the first question's prompt tokens and took the rest from the cache."""
    first, new, cached = (summary[k] for k in ("restart_first_prompt_n", "restored_follow_up_prompt_n",
                                               "restored_follow_up_cache_n"))
    ok = None not in (first, new, cached) and new < first / 10 and cached >= 0.9 * first
    return {"check": "a restarted server answered a follow-up from the saved slot without encoding the image",
            "ok": bool(ok), "detail": f"{new} new, {cached} cached after restoring {summary['slot_restored_tokens']} "
                                      f"tokens; the first question had {first}"}


def run_serve(run: Run) -> ServeResult:
    """Step 08 (`conversation`): the conversations, conversation/turns.csv and summary.json, the per-turn plot."""
    e = run.params.evaluate
    folder = run.sub("conversation")
    rec_path = run.dir / "tune" / "recommended.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    rows = []
    with start_script(run, folder / "server.log", e.timeout_s, ("-lv", str(server.MEMORY_LOG_VERBOSITY))) as srv:
        log.info("serve-llava.sh ready at %s after %.1f s", srv.api_url, srv.ready_s)
        ready_memory = srv.memory()
        for i, (image, prompt) in enumerate(case_inputs(run)):
            conv = chat.Conversation(srv.api_url, max_tokens=e.n_predict, timeout_s=e.timeout_s)
            for question, images in [(prompt, [image]), *((q, []) for q in FOLLOW_UPS)]:
                probe, server_cpu = load.LoadProbe().start(), srv.cpu_seconds()
                turn = conv.ask(question, images)
                turn_load = probe.stop(srv.cpu_seconds() - server_cpu, e.load_threshold)
                rows.append({"case": i, **turn.to_dict(), **srv.memory(), **load.row_fields(turn_load)})
        ready_s = srv.ready_s
    server_log = (folder / "server.log").read_text(errors="replace")
    cases = case_inputs(run)
    for row in rows:
        row["one_shot_s"] = one_shot(run, cases[row["case"]][0], row["question"],
                                     folder / "one-shot" / f"case{row['case']}-turn{row['turn']}.log", e.timeout_s)
    restart = restart_summary(run, *cases[0], folder, e.timeout_s, e.n_predict)
    turns = pd.DataFrame(rows)
    turns["kind"] = turn_kinds(turns)
    checks = check_turns(turns)
    restart_check = check_restart(restart)
    if not restart_check["ok"]:
        raise ServeError(f"conversation checks failed:\n- {restart_check['check']}: {restart_check['detail']}")
    checks = pd.concat([checks, pd.DataFrame([restart_check])], ignore_index=True)
    turns["images"] = turns["images"].map(", ".join)
    first, follow = turns[turns["kind"] == "first"], turns[turns["kind"] == "follow-up"]
    summary = {
        "cases": int(turns["case"].nunique()), "turns": len(turns), "server_ready_s": ready_s,
        "first_ttft_s": float(first["ttft_s"].median()), "first_total_s": float(first["total_s"].median()),
        "follow_up_ttft_s": float(follow["ttft_s"].median()), "follow_up_total_s": float(follow["total_s"].median()),
        "first_prompt_n": int(first["prompt_n"].median()), "follow_up_prompt_n": int(follow["prompt_n"].median()),
        "follow_up_cache_n": int(follow["cache_n"].median()),
        "cached_image_questions": int((turns["kind"] == CACHED_IMAGE).sum()),
        "one_shot_s": float(turns["one_shot_s"].median()), "tune_answer_s": rec.get("answer_s"),
        "one_shot_config": rec.get("config"),
        "max_tokens": e.n_predict, "follow_ups": list(FOLLOW_UPS),
        # What the turns ran under (machine_load.py), as every other timed run records it.
        "load": load.summarize(rows), "load_threshold": e.load_threshold}
    summary["ttft_ratio"] = summary["follow_up_ttft_s"] / summary["first_ttft_s"] if summary["first_ttft_s"] else None
    summary.update(memory_summary(turns, ready_memory, server_log))
    summary.update(restart)
    turns.to_csv(folder / "turns.csv", index=False)
    write_json(folder / "summary.json", summary)
    fig = serve_report.turn_latency(turns, summary.get("one_shot_s"), run)
    run.record("conversation", {"turns": folder / "turns.csv", "summary": folder / "summary.json"})
    return ServeResult(turns, summary, fig, checks)
