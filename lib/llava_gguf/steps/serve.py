"""Step 08 (`make conversation`; `make serve` is the server itself): a conversation about each evaluate case's image with the run's serve-llava.sh, timed per turn.

The server is started exactly as a user starts it (`serve-llava.sh`, written by step 07 with the
recommended configuration) on a free loopback port, and stopped at the end, also on failure. Per
case: the case's question with its image, then the follow-ups of `FOLLOW_UPS` about the same image,
through the `openai` client (llama_cpp/chat.py). Per turn, from the server's own `timings`: prompt
tokens processed and taken from the cache; measured by the client: time to the first token and in all.

The one-shot reference, per turn: `run-llava.sh --image <the case's image> -p <the turn's question>`
(the recommended configuration, `evaluate.n_predict` tokens), timed from start to exit after the server
has stopped: what a user pays per question without the server. 07_tune's measured median is kept in
the summary too. Answers are capped at the same `evaluate.n_predict` tokens.
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
from ..workspace import Run, write_json
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

    def __str__(self) -> str:
        s = self.summary
        return (f"{len(self.turns)} turns: first answer {s['first_total_s']:.2f} s, follow-up {s['follow_up_total_s']:.2f} s "
                f"(median; time to first token {s['first_ttft_s']:.2f} s vs {s['follow_up_ttft_s']:.2f} s)")


def start_script(run: Run, log_path: Path, ready_timeout_s: float) -> server.Server:
    """serve-llava.sh on a free loopback port, ready (its /health answered)."""
    script = run.dir / server.SCRIPT_NAME
    if not script.exists():
        raise ServeError(f"{script} does not exist: step 07 (tune) writes it; run `make tune` first")
    port = server.free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(["bash", str(script)], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "HOST": server.DEFAULT_HOST, "PORT": str(port)},
                                start_new_session=True)
    srv = server.Server(["bash", str(script)], server.DEFAULT_HOST, port, log_path, proc)
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


def run_serve(run: Run) -> ServeResult:
    """Step 08 (`conversation`): the conversations, conversation/turns.csv and summary.json, the per-turn plot."""
    e = run.params.evaluate
    folder = run.sub("conversation")
    rec_path = run.dir / "tune" / "recommended.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    rows = []
    with start_script(run, folder / "server.log", e.timeout_s) as srv:
        log.info("serve-llava.sh ready at %s after %.1f s", srv.api_url, srv.ready_s)
        for i, (image, prompt) in enumerate(case_inputs(run)):
            conv = chat.Conversation(srv.api_url, max_tokens=e.n_predict, timeout_s=e.timeout_s)
            conv.ask(prompt, [image])
            for question in FOLLOW_UPS:
                conv.ask(question)
            rows += [{"case": i, **t.to_dict()} for t in conv.turns]
        ready_s = srv.ready_s
    cases = case_inputs(run)
    for row in rows:
        row["one_shot_s"] = one_shot(run, cases[row["case"]][0], row["question"],
                                     folder / "one-shot" / f"case{row['case']}-turn{row['turn']}.log", e.timeout_s)
    turns = pd.DataFrame(rows)
    turns["images"] = turns["images"].map(", ".join)
    turns["kind"] = ["first" if t == 1 else "follow-up" for t in turns["turn"]]
    first, follow = turns[turns["kind"] == "first"], turns[turns["kind"] == "follow-up"]
    summary = {
        "cases": int(turns["case"].nunique()), "turns": len(turns), "server_ready_s": ready_s,
        "first_ttft_s": float(first["ttft_s"].median()), "first_total_s": float(first["total_s"].median()),
        "follow_up_ttft_s": float(follow["ttft_s"].median()), "follow_up_total_s": float(follow["total_s"].median()),
        "first_prompt_n": int(first["prompt_n"].median()), "follow_up_prompt_n": int(follow["prompt_n"].median()),
        "follow_up_cache_n": int(follow["cache_n"].median()),
        "one_shot_s": float(turns["one_shot_s"].median()), "tune_answer_s": rec.get("answer_s"),
        "one_shot_config": rec.get("config"),
        "max_tokens": e.n_predict, "follow_ups": list(FOLLOW_UPS)}
    summary["ttft_ratio"] = summary["follow_up_ttft_s"] / summary["first_ttft_s"] if summary["first_ttft_s"] else None
    turns.to_csv(folder / "turns.csv", index=False)
    write_json(folder / "summary.json", summary)
    fig = serve_report.turn_latency(turns, summary.get("one_shot_s"), run)
    run.record("conversation", {"turns": folder / "turns.csv", "summary": folder / "summary.json"})
    return ServeResult(turns, summary, fig)
