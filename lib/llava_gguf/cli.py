"""`python -m llava_gguf <command>`: the same library functions the notebooks call."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .llama_cpp import toolchain
from .run import registry, workspace

log = logging.getLogger("llava_gguf")


def _cmd_run(args) -> int:
    from .pipeline.runner import StepFailed, available_steps, run_steps

    run = workspace.open_run(args.params)
    targets = available_steps() if args.steps in ([], ["all"]) else args.steps
    try:
        done = run_steps(run, targets, force=bool(args.force))
    except StepFailed as err:
        log.error("%s", err)
        return 1
    for name, what in done:
        log.info("%-9s %s", name, what)
    log.info("reports: %s", run.dir / "reports" / "index.html")
    return 0


def _cmd_step(args) -> int:
    """The step's library entry point, as the notebook's main cell calls it, checks included."""
    from .pipeline import preflight
    from .checks.acceptance import CheckFailed

    step = registry.get(args.name)
    run = workspace.open_run(args.params)
    with run.lock(), workspace.forcing(args.force):
        run.remove_stale_partials()
        preflight.check(run, [step.name])
        try:
            result = step.entry_point()(run)
        except CheckFailed as err:  # the step's acceptance checks: each failed one named with its bound
            log.error("%s", err)
            return 1
    log.info("%s: %s", args.name, result)
    if getattr(result, "ok", True) is False:
        log.error("step %s: checks failed: %s", args.name, getattr(result, "message", result))
        return 1
    return 0


def _cmd_make_tiny(args) -> int:
    from .model.tiny import make_tiny
    from .model.tokenizer import VOCAB_GGUF

    make_tiny(args.dir, size=args.size, fmt=args.format, shards=args.shards, seed=args.seed, variant=args.variant,
              layout=args.layout, vocab_gguf=toolchain.source_asset(VOCAB_GGUF))
    return 0


def _cmd_build(args) -> int:
    if os.environ.get(toolchain.ENV_DIR) and not args.unpatched:
        info = toolchain.llama_cpp_info()
        missing = [t for t in toolchain.TOOLS if not _has(t)]
        log.info("using %s=%s (%s); not building", toolchain.ENV_DIR, info["bin_dir"], info["version"])
        if missing:
            log.warning("that build lacks %s; the steps that need them will say so", ", ".join(missing))
        return 0
    bin_dir = toolchain.build_llama_cpp(jobs=args.jobs, force=args.force, unpatched=args.unpatched)
    log.info("llama.cpp tools in %s", bin_dir)
    return 0


def _cmd_build_webui(args) -> int:
    from .llama_cpp import webui

    try:
        folder = webui.build_ui(force=args.force)
    except webui.WebUIError as err:
        log.error("%s", err)
        return 1
    log.info("llama-server's chat page in %s (serve-llava.sh serves it with --path)", folder)
    return 0


def _has(tool: str) -> bool:
    try:
        toolchain.find_tool(tool)
        return True
    except toolchain.ToolNotFound:
        return False


def _cmd_patches_check(args) -> int:
    """Which of the project's llama.cpp patches (and which hunks) apply to a tree; 1 if any fails."""
    from .llama_cpp import patches

    tree = args.tree or toolchain.source_dir()
    try:
        report = patches.check(tree, [Path(p) for p in args.patch] or toolchain.patch_files(),
                               dry_run=args.dry_run)
    except patches.PatchCheckError as err:  # no verdict at all: neither "applies" (0) nor "fails" (1)
        log.error("%s", err)
        return 2
    sys.stdout.write(report.text() + "\n")
    return 0 if report.ok else 1


def _cmd_timings(args) -> int:
    from .llama_cpp.timings import timings_command

    sys.stdout.write(timings_command(args.logfile) + "\n")
    return 0


def _cmd_repacks(args) -> int:
    from .llama_cpp import repack
    from .steps.evaluate import variants_for_run

    run = workspace.open_run(args.params)
    bench = toolchain.find_tool("llama-bench", run.params.llama_cpp.dir)
    found = {name: repack.probe(path, bench, run.sub("repack") / f"{name}.log")
             for name, path in variants_for_run(run).items()}
    log.info("%s", workspace.write_json(run.dir / "repack.json", found))
    return 0


def _cmd_rehearse(args) -> int:
    from .pipeline.rehearsal import rehearse

    return 0 if rehearse(jobs=args.jobs, record=args.record, keep_clone=args.keep_clone,
                             keep_run=args.keep_run) else 1


def _cmd_summarize(args) -> int:
    from .reports.crosscheck import format_checks, own_checks, record, run_summary

    summary = record(args.run_dir, args.out) if args.out else run_summary(args.run_dir)
    checks = own_checks(summary)
    sys.stdout.write(format_checks(checks) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


def _cmd_report(args) -> int:
    from .reports import html as report

    run = workspace.open_run(args.params)
    for step in registry.steps().values():
        report.render_notebook(run.dir / "notebooks" / step.notebook, run)
    log.info("%s", report.render_index(run))
    return 0


def _cmd_serve(args) -> int:
    """Exec the run's serve-llava.sh (written by step 07, tune) with the remaining arguments."""
    from .llama_cpp import server

    run = workspace.open_run(args.params)
    script = run.dir / server.SCRIPT_NAME
    if not script.exists():
        raise FileNotFoundError(f"{script} does not exist: step 07 (tune) writes it beside run-llava.sh; "
                                f"run `make tune PARAMS={args.params or 'params/default.yaml'}` first")
    extra = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    sys.stdout.flush()
    os.execv("/bin/bash", ["bash", str(script), *extra])


def _cmd_bench(args) -> int:
    from .bench.measure import run_bench

    run_bench(args.params)
    return 0


def _cmd_compare(args) -> int:
    from .reports.compare import render_comparison

    log.info("%s", render_comparison(args.run_dirs, args.out))
    return 0


def _cmd_publish(args) -> int:
    from .pipeline.publish import PublishError, publish

    try:
        result = publish(workspace.open_run(args.params), upload=args.upload)
    except PublishError as err:
        log.error("%s", err)
        return 1
    log.info("%s", result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_gguf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run steps' notebooks with papermill (skipping up-to-date ones)")
    p.add_argument("steps", nargs="*", help="steps to run (default: all)")
    p.add_argument("--params", default=None, help="params YAML (default: $LLAVA_GGUF_PARAMS or params/default.yaml)")
    p.add_argument("--force", action="store_true", help="rerun the named steps even if up to date")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("step", help="call one step's library function directly (no notebook)")
    p.add_argument("name", help=f"one of: {', '.join(registry.steps())}")
    p.add_argument("--params", default=None)
    p.add_argument("--force", action="store_true", help="make again what the step would reuse")
    p.set_defaults(func=_cmd_step)

    p = sub.add_parser("make-tiny", help="write a synthetic LLaVA 1.6 checkpoint")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["1.6", "1.5"], default="1.6")
    p.add_argument("--layout", choices=["llava", "hf"], default="llava",
                   help="llava: as liuhaotian/llava-v1.6-vicuna-7b; hf: as llava-hf/llava-v1.6-vicuna-7b-hf")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("build-llama-cpp", help="build the pinned, patched llama.cpp tools into the cache")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--unpatched", action="store_true",
                   help="build llama-mtmd-cli from the pinned source without the project's patches "
                        "(the published recipe; tune's second baseline), beside the patched build")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("build-webui", help="build llama-server's chat page (npm) into the cache, "
                       "beside the llama.cpp build; serve-llava.sh serves it")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_build_webui)

    p = sub.add_parser("patches", help="the project's llama.cpp patches: `patches check --tree DIR` reports, per "
                       "patch and hunk, which apply to a llama.cpp tree (never written to)")
    pp = p.add_subparsers(dest="patches_command", required=True)
    c = pp.add_parser("check", help="apply the patches to a temporary copy of the files they touch in --tree")
    c.add_argument("--tree", default=None, help="a llama.cpp source tree (default: the pinned source, "
                   "~/.cache/llava-gguf/llama.cpp-<commit>-src)")
    c.add_argument("--dry-run", action="store_true", help="run `patch --dry-run` in the tree instead of a copy "
                   "(each patch then checked against the unpatched files)")
    c.add_argument("--patch", action="append", default=[], help="check this patch file instead of "
                   "patches/llama.cpp/*.patch (repeatable, applied in the order given)")
    c.set_defaults(func=_cmd_patches_check)

    p = sub.add_parser("timings", help="parse a llama-mtmd-cli log and print its timings as JSON")
    p.add_argument("logfile")
    p.set_defaults(func=_cmd_timings)

    p = sub.add_parser("repacks", help="which weights llama.cpp repacks on this CPU, per variant (repack.json)")
    p.add_argument("--params", default=None)
    p.set_defaults(func=_cmd_repacks)

    p = sub.add_parser("rehearse-arm64", help="make setup + make all in an emulated arm64 Debian 12 root (root only)")
    p.add_argument("--jobs", type=int, default=None, help="jobs of the llama.cpp cross build")
    p.add_argument("--record", action="store_true", help="also write the summary to tests/data/rehearsal/arm64.json")
    p.add_argument("--keep-clone", action="store_true", help="reuse the root's clone and its .venv (reruns)")
    p.add_argument("--keep-run", action="store_true",
                   help="with --keep-clone: keep its run folder too, so make all resumes (skips unchanged steps)")
    p.set_defaults(func=_cmd_rehearse)

    p = sub.add_parser("crosscheck", help="a run folder's numeric checks as JSON (what the rehearsal compares)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="JSON file to write (e.g. tests/data/rehearsal/x86_64.json)")
    p.set_defaults(func=_cmd_summarize)

    p = sub.add_parser("report", help="re-render a run's HTML reports and index")
    p.add_argument("--params", default=None)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="one HTML page comparing run folders (machines, variants, latency)")
    p.add_argument("run_dirs", nargs="*", help="run folders (default: every run with metrics under outputs/)")
    p.add_argument("--out", default=None, help="page to write (default: outputs/compare.html, or "
                   "outputs/index.html over all runs)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("publish", help="write a run's model card (outputs/<run>/publish/) and optionally upload")
    p.add_argument("--params", default=None)
    p.add_argument("--upload", action="store_true", help="upload to params publish.repo (token from the environment)")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("serve", help="start llama-server with the run's recommended configuration "
                       "(outputs/<run>/serve-llava.sh; HOST/PORT in the environment or --host/--port)")
    p.add_argument("--params", default=None)
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="more llama-server options")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("bench", help="conversion and inference benchmarks at the 7B scale")
    p.add_argument("--params", default="params/bench.yaml")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace.setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    from .model.checkpoint import CheckpointError
    from .run.diskspace import DiskFullError
    from .run.params import ParamsError

    # SIGTERM (a service stop, a killed make) unwinds like Ctrl-C: kernels and tools are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        log.error("%s", str(err) if "to resume:" in str(err) else f"interrupted ({str(err) or 'SIGINT'})")
        return 130
    except (ParamsError, CheckpointError, toolchain.ToolNotFound, FileNotFoundError, ValueError, DiskFullError,
            KeyError, workspace.RunBusy, workspace.CacheBusy, workspace.RunStateError,
            registry.StepDeclarationError) as err:
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 2


def _interrupt(signum, _frame):
    from .pipeline.runner import Interrupted

    raise Interrupted(signal.Signals(signum).name)
