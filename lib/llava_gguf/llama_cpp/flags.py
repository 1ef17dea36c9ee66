"""The one table of llama.cpp options this project passes, and everything rendered from it.

A run is described by *settings*: a dict from a row's `key` to a value (None, or a key left out:
the option is not passed, the tool's default applies). Where an `evaluate` params key exists it has
the row's name (`params_settings`). From settings are rendered:

- the argv of a `llama-mtmd-cli` run (`command`; `llama_cpp/mtmd.py` runs it, step 06 and 07 measure it);
- the argv of `llama-server` for the same configuration (`server_command`);
- the `run-llava*.sh` scripts (`script_text`), which run exactly the measured argv when given no options.

Each row lists every spelling the pinned parser (common/arg.cpp) accepts for its option, and which
tools take it; tests/test_flags.py checks both against the pinned source. The first spelling is the
one written.

Why a script drops its own value of an option the user gives instead of passing both: the pinned
parser warns about a repeated option ("DEPRECATED: ... specified multiple times"), and a repeated
CPU mask is OR-ed into the previous one (`parse_cpu_mask`), so a later `-C` would not replace an
earlier one. `replaced_by` names the other options that set the same thing (`-Cr` for `-C`,
`-f` for `-p`).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

MTMD = "llama-mtmd-cli"
SERVER = "llama-server"
BOTH = (MTMD, SERVER)


@dataclass(frozen=True)
class Flag:
    key: str
    names: tuple[str, ...]
    group: str  # files | input | sampling | threads | runtime | network | log
    tools: tuple[str, ...] = BOTH  # the tools it is passed to

    replaced_by: tuple[str, ...] = ()
    about: str = ""
    # An on/off switch without a value (--jinja / --no-jinja): True writes `option`, False `negative[0]`.
    negative: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return self.names[0]

    @property
    def overridden_by(self) -> tuple[str, ...]:
        """The options on a script's command line that drop the script's own value of this one."""
        return self.names + self.negative + self.replaced_by

    def args(self, value: Any) -> list[str]:
        if self.negative:
            return [self.option if value else self.negative[0]]
        return [self.option, value_text(value)]


FLAGS: tuple[Flag, ...] = (
    Flag("model", ("-m", "--model"), "files", about="text GGUF"),
    Flag("mmproj", ("--mmproj", "-mm"), "files", about="vision projector GGUF; its pinpoints are the image budget"),
    Flag("image", ("--image", "--audio", "--video"), "input", (MTMD,),
         about="each occurrence adds an image (comma-separated values too)"),
    Flag("prompt", ("-p", "--prompt"), "input", (MTMD,), replaced_by=("-f", "--file")),
    Flag("n_predict", ("-n", "--predict", "--n-predict"), "sampling",
         about="tokens to generate; without it the tool generates until the context is full"),
    Flag("seed", ("--seed", "-s"), "sampling"),
    Flag("temperature", ("--temp", "--temperature"), "sampling",
         about="0: greedy (llama-mtmd-cli's own default is 0.2, sampled)"),
    Flag("top_k", ("--top-k",), "sampling", about="1: greedy as well"),
    Flag("ctx_size", ("-c", "--ctx-size"), "runtime"),
    Flag("threads", ("-t", "--threads"), "threads", about="generation threads"),
    Flag("threads_batch", ("-tb", "--threads-batch"), "threads",
         about="prompt and image-token threads (default: as -t)"),
    Flag("cpu_mask", ("-C", "--cpu-mask"), "threads", replaced_by=("-Cr", "--cpu-range"),
         about="hex affinity mask of the generation threads"),
    Flag("cpu_mask_batch", ("-Cb", "--cpu-mask-batch"), "threads", replaced_by=("-Crb", "--cpu-range-batch"),
         about="hex affinity mask of the batch threads (default: as -C)"),
    Flag("cpu_strict", ("--cpu-strict",), "threads", about="0|1: one thread per CPU of the mask"),
    Flag("cpu_strict_batch", ("--cpu-strict-batch",), "threads", about="0|1 (default: as --cpu-strict)"),
    Flag("batch_size", ("-b", "--batch-size"), "runtime"),
    Flag("ubatch_size", ("-ub", "--ubatch-size"), "runtime"),
    Flag("flash_attn", ("-fa", "--flash-attn"), "runtime", about="on|off|auto"),
    Flag("cache_type_k", ("-ctk", "--cache-type-k"), "runtime"),
    Flag("cache_type_v", ("-ctv", "--cache-type-v"), "runtime", about="a quantized V cache needs flash attention"),
    Flag("image_min_tokens", ("--image-min-tokens",), "runtime",
         about="dynamic-resolution towers only; LLaVA 1.6's budget is the mmproj's pinpoints"),
    Flag("image_max_tokens", ("--image-max-tokens",), "runtime", about="as --image-min-tokens"),
    Flag("chat_template", ("--chat-template",), "runtime"),
    # With Jinja (llama-server's default) a built-in template's name ("vicuna") would be read as a Jinja
    # template and the prompt would be that word: the server takes the GGUF's own template instead
    # (llama_cpp/server.py serve_settings).
    Flag("jinja", ("--jinja",), "runtime", (SERVER,), negative=("--no-jinja",),
         about="on: the GGUF's Vicuna template, rendered as llama-mtmd-cli renders it; the chat page needs it"),
    Flag("parallel", ("-np", "--parallel"), "runtime", (SERVER,), about="server slots"),
    Flag("slot_save_path", ("--slot-save-path",), "runtime", (SERVER,),
         about="folder of saved slots (/slots/<id>?action=save|restore): a conversation outlives the server"),
    Flag("host", ("--host",), "network", (SERVER,), about="address the server binds (serve-llava.sh: 127.0.0.1)"),
    Flag("port", ("--port",), "network", (SERVER,)),
    Flag("ui_path", ("--path",), "network", (SERVER,),
         about="folder of static files served at /: llama-server's chat page, built by `make webui`"),
    # 4 ("trace") makes the pinned build print the library's INFO lines: image batch decode times
    # and the final perf block, which the timings are read from. At its default (3) neither is printed.
    Flag("log_verbosity", ("-lv", "--verbosity", "--log-verbosity"), "log"),
)
BY_KEY: dict[str, Flag] = {f.key: f for f in FLAGS}
# What a configuration is, apart from the files and the image/prompt it is run on.
RUNTIME_GROUPS = ("sampling", "threads", "runtime", "log")


class FlagError(ValueError):
    """Settings that name no row of the flag table."""


def _check(settings: Mapping[str, Any]) -> None:
    unknown = [k for k in settings if k not in BY_KEY]
    if unknown:
        raise FlagError(f"settings {unknown} are no llama.cpp option of the flag table "
                        f"(llama_cpp/flags.py FLAGS; known: {', '.join(BY_KEY)}); add a row or fix the key")


def value_text(value: Any) -> str:
    """An option's value as the tool's argv holds it (booleans as the 0|1 the parser takes)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def pairs(settings: Mapping[str, Any], tool: str = MTMD) -> list[tuple[Flag, str]]:
    """(row, value) in table order: the settings this tool takes, None left out."""
    _check(settings)
    return [(f, value_text(settings[f.key])) for f in FLAGS
            if tool in f.tools and settings.get(f.key) is not None]


def flag_args(settings: Mapping[str, Any], tool: str = MTMD) -> list[str]:
    return [a for f, _ in pairs(settings, tool) for a in f.args(settings[f.key])]


def command(executable: str | Path, settings: Mapping[str, Any], tool: str = MTMD,
            extra_args: Iterable[str] = ()) -> list[str]:
    """The argv: the executable, the table's options in table order, then extra_args."""
    return [str(executable), *flag_args(settings, tool), *extra_args]


def server_command(server: str | Path, settings: Mapping[str, Any], extra_args: Iterable[str] = ()) -> list[str]:
    """llama-server with the same configuration (image and prompt are per request: left out)."""
    return command(server, settings, SERVER, extra_args)


def runtime(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings without the files and the image/prompt."""
    _check(settings)
    return {k: v for k, v in settings.items() if BY_KEY[k].group in RUNTIME_GROUPS}


def params_settings(evaluate) -> dict[str, Any]:
    """The settings an `evaluate` params section holds (its keys named after the table's rows)."""
    return {f.key: getattr(evaluate, f.key) for f in FLAGS if f.key in type(evaluate).model_fields}


def table(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per option set, for reports: its value, params key and which tools take it."""
    _check(settings)
    return [{"option": f.option, "value": value_text(settings[f.key]), "key": f.key, MTMD: MTMD in f.tools,
             SERVER: SERVER in f.tools, "about": f.about} for f in FLAGS if settings.get(f.key) is not None]


def script_text(executable: str | Path, settings: Mapping[str, Any], extra_args: Iterable[str] = (),
                header: Iterable[str] = (), tool: str = MTMD, name: str = "run-llava.sh",
                prelude: Iterable[str] = (), before_exec: Iterable[str] = ()) -> str:
    """A bash script running `command(executable, settings, tool, extra_args)` when given no options.

    Options on its command line come after its own; each one the user gives drops the script's own
    value of that option (see the module doc). The exact argv is printed to stderr before the exec.
    `prelude` lines run before the command is assembled (they may add to `user`, the script's
    arguments, and call `given`); `before_exec` lines run on the finished `cmd` array.
    """
    q = shlex.quote
    lines = ["#!/usr/bin/env bash", *[f"# {h}" for h in header],
             "# Run bare, this is the measured command. Each option given on this script's command line",
             "# replaces the script's own value of it (--image FILE replaces the default image, -f FILE the",
             "# prompt). The command run is printed to stderr first.",
             "set -euo pipefail",
             'user=("$@")',
             "given() {  # given OPTION...: does the command line name one of them (--a_b as --a-b)?",
             "  local a o",
             '  for a in ${user[@]+"${user[@]}"}; do',
             '    case "$a" in --*) a="${a//_/-}";; esac',
             '    for o in "$@"; do [ "$a" = "$o" ] && return 0; done',
             "  done",
             "  return 1",
             "}",
             *prelude,
             f"cmd=({q(str(executable))})"]
    for f, _ in pairs(settings, tool):
        args = " ".join(q(a) for a in f.args(settings[f.key]))
        lines.append(f"given {' '.join(q(o) for o in f.overridden_by)} || cmd+=({args})")
    extra = [q(a) for a in extra_args]
    if extra:
        lines.append(f"cmd+=({' '.join(extra)})")
    lines += ['cmd+=(${user[@]+"${user[@]}"})', *before_exec,
              f"printf '%s:' {q(name)} >&2; printf ' %q' \"${{cmd[@]}}\" >&2; printf '\\n' >&2",
              'exec "${cmd[@]}"', ""]
    return "\n".join(lines)


def executed_argv(stderr: str, name: str = "run-llava.sh") -> list[str]:
    """The argv a script printed before its exec (the first line starting with its name)."""
    prefix = f"{name}:"
    for line in stderr.splitlines():
        if line.startswith(prefix):
            return shlex.split(line[len(prefix):])
    raise ValueError(f"no '{prefix}' line in the script's stderr")
