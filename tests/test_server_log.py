"""The memory figures step 08 reads from llama-server's own log (llama_cpp/server.py `kv_cache`,
`prompt_cache`), on recorded logs of the pinned build (tests/data/logs/README.md), and the memory
table and headline line the report shows (reports/serve.py); the threads' malloc arenas from smaps."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pandas as pd

from llava_gguf.llama_cpp import server
from llava_gguf.reports import serve as serve_report
from llava_gguf.steps.serve import memory_summary

LOGS = Path(__file__).parent / "data" / "logs"


def test_the_kv_cache_and_prompt_cache_of_a_recorded_server_log():
    text = (LOGS / "llama-server-0c1e570-lv4.log").read_text()
    assert server.kv_cache(text) == {
        "kv_cache_mib": 8.0, "kv_cache_k_mib": 4.0, "kv_cache_v_mib": 4.0, "kv_cache_cells": 4096,
        "kv_cache_layers": 2, "kv_cache_seqs": 4, "kv_cache_type_k": "f16", "kv_cache_type_v": "f16", "kv_caches": 1}
    cache = server.prompt_cache(text)
    assert cache["prompt_cache_limit_mib"] == 8192.0 and cache["prompt_cache_prompts"] >= 1
    assert cache["prompt_cache_max_mib"] >= cache["prompt_cache_mib"] > 0


def test_only_the_last_context_counts():
    # At -v the memory-fitting dry run's context comes first (its buffers 0.00 MiB), then the real one.
    text = (LOGS / "mtmd-cli-0c1e570-v-perf.log").read_text()
    assert text.count("llama_kv_cache: size =") == 2
    assert server.kv_cache(text)["kv_cache_mib"] == 8.0
    # A quantized cache, a 7B shape (the pinned format string, filled in) and two caches of one context.
    line = ("0.00.600.000 I llama_kv_cache: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), "
            "K (%s): %7.2f MiB, V (%s): %7.2f MiB\n")
    seven_b = line % (1088.0, 4096, 32, 4, 1, "q8_0", 544.0, "q8_0", 544.0)
    got = server.kv_cache(server.CONTEXT_LINE + "\n" + seven_b + seven_b.replace("4096 cells", " 512 cells"))
    assert got["kv_cache_mib"] == 2176.0 and got["kv_caches"] == 2 and got["kv_cache_cells"] == 4096
    assert got["kv_cache_type_k"] == "q8_0" and got["kv_cache_layers"] == 64


def test_a_log_without_the_lines_gives_none():
    text = (LOGS / "mtmd-cli-0c1e570-default.log").read_text()  # the default log level prints neither
    assert server.kv_cache(text) is None and server.prompt_cache(text) is None
    summary = memory_summary(pd.DataFrame({"case": [0], "rss_mib": [300.0]}), {"rss_mib": 250.0}, text)
    assert summary["kv_cache_mib"] is None and summary["server_rss_mib"] == 300.0
    table = serve_report.memory_table(summary)
    assert "KV cache" not in " ".join(table["what"]) and len(table) == 2


def test_memory_summary_table_and_headline():
    turns = pd.DataFrame({"case": [0, 0, 0, 1], "rss_mib": [300.0, 301.0, 302.5, 400.0],
                          "rss_anon_mib": [40.0, 41.0, 42.0, 90.0], "peak_rss_mib": [310.0, 311.0, 312.0, 405.0]})
    text = (LOGS / "llama-server-0c1e570-lv4.log").read_text()
    s = memory_summary(turns, {"rss_mib": 250.0, "rss_anon_mib": 20.0}, text)
    # After the first case's conversation (its third turn); the peak over the whole step.
    assert s["server_rss_mib"] == 302.5 and s["conversation_turns"] == 3 and s["server_peak_rss_mib"] == 405.0
    table = serve_report.memory_table(s)
    assert table["MiB"].tolist()[:5] == [250.0, 302.5, 42.0, 405.0, 8.0]
    assert table["what"][4] == "KV cache: 4096 cells, K f16, V f16" and "3 turns" in table["what"][1]
    assert table["what"].str.len().max() < 50  # what a notebook's table cell shows uncut
    assert serve_report.memory_line(s) == "server 302 MiB resident after 3 turns (peak 405 MiB, KV cache 8 MiB)"


def test_process_memory_of_this_process():
    m = server.process_memory(os.getpid())
    assert m["rss_mib"] > 10 and 0 < m["rss_anon_mib"] <= m["rss_mib"] and m["peak_rss_mib"] >= m["rss_mib"] - 1


# A /proc/<pid>/smaps excerpt: a thread arena (anonymous, writable, 64 MiB-aligned, with its PROT_NONE
# rest), an anonymous mapping off that boundary, a file mapped at one, and an arena never touched.
SMAPS = """\
7f0000000000-7f0001100000 rw-p 00000000 00:00 0 
Rss:               17408 kB
7f0001100000-7f0004000000 ---p 00000000 00:00 0 
Rss:                   0 kB
7f0004200000-7f0004400000 rw-p 00000000 00:00 0 
Rss:                2048 kB
7f0008000000-7f0008200000 rw-p 00000000 fe:00 1234                       /tmp/model.gguf
Rss:                2048 kB
7f000c000000-7f000c021000 rw-p 00000000 00:00 0 
Rss:                   0 kB
7f0010000000-7f0010001000 rw-p 00000000 00:00 0                          [stack:42]
Rss:                   4 kB
"""


def test_thread_arenas_of_an_smaps_text():
    assert server.thread_arenas(SMAPS) == {"rss_arenas_mib": 17.0, "arenas": 1}
    assert server.thread_arenas("") == {"rss_arenas_mib": 0.0, "arenas": 0}


def test_the_arenas_of_a_process_with_a_thread_that_allocates():
    keep = []
    # A thread's allocations come from its own arena (below the 128 KiB mmap threshold); bytearray
    # zero-fills them, so all 16 MiB are resident there while kept, whatever the arena held before.
    t = threading.Thread(target=lambda: keep.append([bytearray(64 << 10) for _ in range(256)]))
    t.start()
    t.join()
    m = server.process_memory(os.getpid())
    assert 16 <= m["rss_arenas_mib"] <= m["rss_anon_mib"] and m["arenas"] >= 1, m


def test_the_summary_and_table_carry_the_arenas_of_the_first_conversation():
    turns = pd.DataFrame({"case": [0, 0, 0, 1], "rss_mib": [90.0, 107.0, 125.0, 212.0],
                          "rss_arenas_mib": [17.0, 34.5, 52.0, 140.0]})
    s = memory_summary(turns, {"rss_mib": 49.0}, "")
    assert s["server_rss_arenas_mib"] == 52.0  # case 0's last turn, like server_rss_mib
    table = serve_report.memory_table(s)
    assert table.set_index("what")["MiB"]["... of it in malloc's thread arenas"] == 52.0
