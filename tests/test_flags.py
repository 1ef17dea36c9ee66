"""The flag table (llama_cpp/flags.py): its option names against the pinned llama.cpp parser, the
commands and scripts rendered from it, and a script's overrides (with a stand-in tool; with the
real tool in the llama_cpp-marked tests)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from llava_gguf.llama_cpp import flags, toolchain
from llava_gguf.llama_cpp.mtmd import MtmdOptions
from llava_gguf.run.params import EvaluateParams

EXAMPLE = {flags.MTMD: "LLAMA_EXAMPLE_MTMD", flags.SERVER: "LLAMA_EXAMPLE_SERVER"}


def pinned_options() -> list[dict]:
    """Every option defined in the pinned common/arg.cpp: its spellings, examples and excludes."""
    try:
        text = (toolchain.source_dir() / "common" / "arg.cpp").read_text()
    except Exception as err:  # no cached source and no network: nothing to compare with
        pytest.skip(f"pinned llama.cpp source not available: {err}")
    lists = {m.group(1): set(re.findall(r"LLAMA_EXAMPLE_\w+", m.group(2))) for m in re.finditer(
        r"static std::initializer_list<enum llama_example> (\w+) = \{(.*?)\};", text, re.S)}
    out = []
    for chunk in text.split("add_opt(common_arg(")[1:]:
        names = re.match(r"\s*\{([^}]*)\}", chunk)
        if not names:
            continue
        ex = re.search(r"\.set_examples\((?:\{([^}]*)\}|(\w+))\)", chunk)
        exc = re.search(r"\.set_excludes\(\{([^}]*)\}\)", chunk)
        examples = ({"LLAMA_EXAMPLE_COMMON"} if not ex else
                    set(re.findall(r"LLAMA_EXAMPLE_\w+", ex.group(1))) if ex.group(1) is not None else lists[ex.group(2)])
        out.append({"names": set(re.findall(r'"([^"]+)"', names.group(1))), "examples": examples,
                    "excludes": set(re.findall(r"LLAMA_EXAMPLE_\w+", exc.group(1))) if exc else set()})
    assert len(out) > 200, "the parser of arg.cpp found too few options: its layout changed"
    return out


def takes(options: list[dict], name: str, tool: str) -> set[str] | None:
    """The spellings of the option `name` as this tool's parser has it (None: the tool lacks it)."""
    ex = EXAMPLE[tool]
    for o in options:
        if name in o["names"] and (ex in o["examples"] or "LLAMA_EXAMPLE_COMMON" in o["examples"]) \
                and ex not in o["excludes"]:
            return o["names"]
    return None


def test_the_table_matches_the_pinned_parser():
    options = pinned_options()
    for f in flags.FLAGS:
        for tool in f.tools:
            names = takes(options, f.option, tool)
            assert names == set(f.names), (f.key, tool, names)
            for other in f.replaced_by:
                assert takes(options, other, tool), (f.key, tool, other)
    # Rows not passed to the server are those it lacks (-np is the CLI's too, but means nothing there).
    assert [f.key for f in flags.FLAGS if flags.SERVER not in f.tools and takes(options, f.option, flags.SERVER)] == []
    # The parser check itself can fail: the image is no server option, the prompt is excluded from it.
    assert takes(options, "--image", flags.SERVER) is None and takes(options, "-p", flags.SERVER) is None
    assert takes(options, "-p", flags.MTMD) == {"-p", "--prompt"}


def test_the_table_has_room_for_every_runtime_option():
    need = {"threads", "threads_batch", "cpu_mask", "cpu_mask_batch", "cpu_strict", "flash_attn", "cache_type_k",
            "cache_type_v", "ubatch_size", "image_min_tokens", "image_max_tokens", "mmproj", "chat_template",
            "temperature", "top_k", "seed", "n_predict"}
    assert need <= set(flags.BY_KEY)
    assert len(flags.BY_KEY) == len(flags.FLAGS)  # one row per key
    names = [n for f in flags.FLAGS for n in f.names]
    assert len(names) == len(set(names))  # one row per option


def test_every_evaluate_key_named_like_a_row_reaches_the_tool():
    ev = EvaluateParams(n_predict=64, seed=7, threads=3, threads_batch=4, cpu_mask="0xf0", cpu_mask_batch="ff",
                        cpu_strict=1, batch_size=256, ubatch_size=128, ctx_size=2048, flash_attn="on",
                        cache_type_k="q8_0", cache_type_v="f16", chat_template="vicuna")
    args = MtmdOptions(ev).args()
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs == {"-n": "64", "--seed": "7", "--temp": "0.0", "-c": "2048", "-t": "3", "-tb": "4", "-C": "0xf0",
                     "-Cb": "ff", "--cpu-strict": "1", "-b": "256", "-ub": "128", "-fa": "on", "-ctk": "q8_0",
                     "-ctv": "f16", "--chat-template": "vicuna", "-lv": "4"}
    assert set(flags.params_settings(ev)) == set(flags.BY_KEY) & set(EvaluateParams.model_fields)


def test_commands_in_table_order_and_bad_keys_named():
    s = {"prompt": "Hi", "model": "m.gguf", "threads": 2, "cpu_strict": True, "image": "a.jpg", "mmproj": "p.gguf",
         "flash_attn": None, "n_predict": 8}
    assert flags.command("cli", s, extra_args=["--x"]) == ["cli", "-m", "m.gguf", "--mmproj", "p.gguf", "--image",
                                                          "a.jpg", "-p", "Hi", "-n", "8", "-t", "2", "--cpu-strict",
                                                          "1", "--x"]
    assert flags.server_command("srv", {**s, "parallel": 1}) == ["srv", "-m", "m.gguf", "--mmproj", "p.gguf", "-n",
                                                                  "8", "-t", "2", "--cpu-strict", "1", "-np", "1"]
    assert "-np" not in flags.command("cli", {"parallel": 1})
    assert flags.runtime(s) == {"threads": 2, "cpu_strict": True, "flash_attn": None, "n_predict": 8}
    with pytest.raises(flags.FlagError, match="threadz"):
        flags.command("cli", {"threadz": 2})


# ----------------------------------------------------------------------------- scripts
def _echo_tool(tmp_path: Path) -> Path:
    tool = tmp_path / "llama-mtmd-cli"
    tool.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    tool.chmod(0o755)
    return tool


SETTINGS = {"model": "/m/text.gguf", "mmproj": "/m/mm proj.gguf", "image": "/img/test-1.jpeg",
            "prompt": "Describe this image.", "n_predict": 32, "seed": 42, "temperature": 0.0, "threads": 2,
            "threads_batch": 2, "cpu_mask": "0xf0", "cpu_strict": 1, "chat_template": "vicuna", "log_verbosity": 4}


def _run(script: Path, *args: str) -> tuple[list[str], list[str]]:
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines(), flags.executed_argv(out.stderr, script.name)


def test_a_bare_script_runs_exactly_the_command(tmp_path):
    tool = _echo_tool(tmp_path)
    script = tmp_path / "run-llava.sh"
    script.write_text(flags.script_text(tool, SETTINGS, ["--extra", "x y"], ["a header"], name=script.name))
    got, printed = _run(script)
    expected = flags.command(tool, SETTINGS, extra_args=["--extra", "x y"])
    assert [str(tool), *got] == expected and printed == expected
    assert "# a header" in script.read_text()


def test_a_user_option_replaces_the_scripts_own(tmp_path):
    tool = _echo_tool(tmp_path)
    script = tmp_path / "run-llava.sh"
    script.write_text(flags.script_text(tool, SETTINGS, name=script.name))
    got, printed = _run(script, "-n", "4", "--threads", "1", "--cpu-range", "0-1", "--image", "mine.png",
                        "--chat_template", "chatml")
    assert printed == [str(tool), *got]
    # Each given option is passed once, the user's value; the rest keep the script's values.
    assert got.count("-n") + got.count("--predict") == 1 and got[got.index("-n") + 1] == "4"
    assert "-t" not in got and got[got.index("--threads") + 1] == "1" and got[got.index("-tb") + 1] == "2"
    assert "-C" not in got and "--cpu-range" in got  # a CPU mask is OR-ed, never passed twice
    assert got.count("--image") == 1 and got[got.index("--image") + 1] == "mine.png"
    assert "--chat-template" not in got  # --chat_template is the same option to llama.cpp
    assert got[got.index("-p") + 1] == "Describe this image." and got[got.index("--seed") + 1] == "42"
    got, _ = _run(script, "-f", "prompt.txt")
    assert "-p" not in got and got[-2:] == ["-f", "prompt.txt"]


def test_serve_script_is_the_same_configuration_on_loopback(tmp_path):
    """serve-llava.sh (llama_cpp/server.py): the run's files and runtime flags, the server's rows, no -n
    and log level, Jinja with the GGUF's template for `vicuna`; HOST/PORT from the environment, an option on
    the command line wins."""
    import os

    from llava_gguf.llama_cpp import server

    tool = _echo_tool(tmp_path)
    script = tmp_path / server.SCRIPT_NAME
    script.write_text(server.script_text(tool, SETTINGS, name=script.name, ui_dir=tmp_path / "no-page"))
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PORT": str(server.free_port())})
    got, printed = out.stdout.splitlines(), flags.executed_argv(out.stderr, script.name)
    assert printed == [str(tool), *got]
    for option in ("-n", "-lv", "--image", "-p", "--no-jinja", "--chat-template"):
        assert option not in got, option
    assert got[got.index("-m") + 1] == "/m/text.gguf" and got[got.index("-C") + 1] == "0xf0"
    assert "--jinja" in got
    assert got[got.index("--host") + 1] == "127.0.0.1" and got.count("--port") == 1
    assert "OpenAI-compatible API: http://127.0.0.1:" in out.stderr
    out = subprocess.run(["bash", str(script), "--host", "::1", "--port", "1"], capture_output=True, text=True,
                         env={**os.environ, "HOST": "0.0.0.0", "PORT": "2"})
    got = flags.executed_argv(out.stderr, script.name)
    assert got.count("--host") == 1 and got[got.index("--host") + 1] == "::1" and got[-2:] == ["--port", "1"]
    assert "http://[::1]:1/v1" in out.stderr


def test_serve_script_serves_the_chat_page_once_it_is_built(tmp_path):
    """Row ui_path: --path <the page> only when a complete build is there when the script starts (it may
    be built after the script was written); otherwise the script says how to build it. A user's --path wins."""
    import os

    from llava_gguf.llama_cpp import server, webui

    tool, page = _echo_tool(tmp_path), tmp_path / "page dir"
    script = tmp_path / server.SCRIPT_NAME
    script.write_text(server.script_text(tool, SETTINGS, name=script.name, ui_dir=page))

    def serve(*args):
        out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=True,
                             env={**os.environ, "PORT": str(server.free_port())})
        return flags.executed_argv(out.stderr, script.name), out.stderr

    got, err = serve()
    assert "--path" not in got and "web page:              unavailable" in err and "make webui" in err
    page.mkdir()
    (page / "index.html").write_text("<html></html>")
    got, err = serve()
    assert "--path" not in got, "a build without its .built record is one stopped half way"
    (page / webui.MARKER).write_text("{}")
    assert webui.built_ui(page) == page
    got, err = serve()
    assert got[got.index("--path") + 1] == str(page) and got.count("--path") == 1
    assert "/ (llama-server's chat page, from " + str(page) in err
    got, err = serve("--path", "/mine")
    assert got.count("--path") == 1 and got[-2:] == ["--path", "/mine"] and "from /mine" in err


@pytest.mark.llama_cpp
def test_a_later_option_wins_and_masks_add_up_in_the_pinned_build(tiny_ggufs, llama_tool, tmp_path):
    """Why scripts drop their own value instead of passing both: a repeated -t takes its last value
    with a warning; a repeated -C is OR-ed into the first (the log's strict-CPU check shows the mask)."""
    from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE, run_mtmd

    cli = llama_tool("llama-mtmd-cli")
    r = run_mtmd(cli, tiny_ggufs["text"], tiny_ggufs["mmproj"], toolchain.source_asset(DEFAULT_IMAGE), "Hi",
                 MtmdOptions(EvaluateParams(n_predict=6, threads=2), extra_args=["-n", "3", "-t", "1"]),
                 tmp_path / "last.log")
    log = Path(r.log_path).read_text()
    assert r.n_tokens <= 3 and r.timings.eval["runs"] <= 2 and "n_threads = 1" in log
    assert "specified multiple times" in log


@pytest.mark.llama_cpp
def test_a_script_override_reaches_the_tool(tiny_ggufs, llama_tool, tmp_path):
    from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE

    cli = llama_tool("llama-mtmd-cli")
    # No CPU mask: the machine running the tests may lack CPUs 4-7.
    settings = {**{k: v for k, v in SETTINGS.items() if k not in ("cpu_mask", "cpu_strict")},
                "model": str(tiny_ggufs["text"]), "mmproj": str(tiny_ggufs["mmproj"]),
                "image": str(toolchain.source_asset(DEFAULT_IMAGE)), "n_predict": 6}
    script = tmp_path / "run-llava.sh"
    script.write_text(flags.script_text(cli, settings, name=script.name))
    script.chmod(0o755)
    out = subprocess.run([str(script), "-n", "2", "-t", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    argv = flags.executed_argv(out.stderr, script.name)
    assert argv[argv.index("-n") + 1] == "2" and argv.count("-n") == 1 and argv.count("-t") == 1
    assert "n_threads = 1" in out.stderr and "specified multiple times" not in out.stderr
