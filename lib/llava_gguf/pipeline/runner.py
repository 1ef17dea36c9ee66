"""Run the steps' notebooks in order with papermill, skipping steps that are up to date.

The steps and what they need come from the registry (each notebook's own declaration). A step
runs when its fingerprint (fingerprint.py) changed or one of its products is missing; `force`
reruns it. Before anything runs, the run folder is locked (one pipeline per run at a time) and
what earlier, interrupted runs left half-written is removed.

Executed notebooks are records: papermill injects the resolved params (every value, defaults
included) beside the params file's path, and writes the executed copy to
`outputs/<run>/notebooks/`, rendered to `reports/` (also when a cell fails). A rerun first moves
the previous executed notebook and its report to `outputs/<run>/history/<time>/`.

The kernel talks over IPC (no TCP ports, no plain-text warning), in its own session, with its
own output in `logs/kernel-<step>.log`; on SIGINT/SIGTERM or a failure the kernel and every
tool it started are killed before the step is reported.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..llama_cpp import toolchain
from ..llama_cpp.runner import kill_tree
from . import preflight
from ..reports import html
from ..reports.display import EXEC_LINE
from ..run import registry
from ..run.fingerprint import fingerprint
from ..run.workspace import Run, forcing, resolve, write_json

log = logging.getLogger(__name__)

HISTORY_KEEP = 10


class StepFailed(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops after killing its kernel and tools."""


def available_steps() -> list[str]:
    return list(registry.steps())


def applicable(step: registry.Step, run: Run) -> bool:
    return not (step.checkpoint_only and run.params.model.format == "gguf")


def needs(step: registry.Step, run: Run) -> tuple[str, ...]:
    steps = registry.steps()
    found = tuple(n for n in step.needs if applicable(steps[n], run))
    if not found and step.needs:
        return ("download",)  # the ready-GGUF path: everything comes from the download
    return found


def plan(targets: list[str], run: Run) -> list[registry.Step]:
    """The targets and the steps they need, in dependency order."""
    order: list[str] = []

    def visit(name: str) -> None:
        step = registry.get(name)
        for need in needs(step, run):
            visit(need)
        if name not in order:
            order.append(name)

    for t in targets:
        visit(t)
    steps = registry.steps()
    return [steps[n] for n in order if applicable(steps[n], run)]


def step_fingerprint(step: registry.Step, run: Run, done: dict[str, str], llama_cpp: dict | None) -> str:
    model = run.params.model
    local = resolve(model.path) if step.name == "download" and model.source == "local" and model.path else None
    return fingerprint(step, run.params.model_dump(mode="json"), [done.get(n, "") for n in needs(step, run)],
                       llama_cpp, local)


# ----------------------------------------------------------------------------- state
def _state_file(run: Run) -> Path:
    return run.dir / "steps.json"


def load_state(run: Run) -> dict:
    f = _state_file(run)
    return run.read_json(f) if f.exists() else {}


def products_exist(step: registry.Step, run: Run) -> bool:
    artifacts = run.artifacts()
    for name in step.products_for(run.params.model.format):
        value = artifacts.get(name)
        if value is None:
            return False
        paths = value.values() if isinstance(value, dict) else [value]
        if not all(run.resolve(p).exists() for p in paths if isinstance(p, str)):
            return False
    return True


# ----------------------------------------------------------------------------- records
def executed_path(step: registry.Step, run: Run) -> Path:
    return run.dir / "notebooks" / step.notebook


def keep_previous(step: registry.Step, run: Run) -> Path | None:
    """Move the step's previous executed notebook and report into history/<its time>/."""
    old = executed_path(step, run)
    if not old.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
    dest = run.dir / "history" / stamp
    dest.mkdir(parents=True, exist_ok=True)
    report = run.dir / "reports" / f"{old.stem}.html"
    os.replace(old, dest / old.name)
    if report.exists():
        html.move_report(report, dest)  # with the stylesheet it links
    folders = sorted(p for p in (run.dir / "history").iterdir() if p.is_dir())
    for stale in folders[:-HISTORY_KEEP]:
        shutil.rmtree(stale, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------- the kernel
HEADLESS_BAR_INTERVAL = 10  # seconds between tqdm refreshes in a headless step's kernel


def headless_kernel_cmd(kernel_cmd: list[str]) -> list[str]:
    """The kernel's command line plus the line it runs before the first cell (text progress bars,
    readable numbers: reports/display.py). Only an ipykernel takes the option."""
    if not any("ipykernel" in str(a) for a in kernel_cmd):
        return list(kernel_cmd)
    return [*kernel_cmd, f"--IPKernelApp.exec_lines={EXEC_LINE}"]


def kernel_manager_class(log_file: Path, ipc_dir: Path, started: list):
    """The kernel manager nbclient makes: IPC in a private folder, the kernel's own output in
    `log_file`, each instance appended to `started` so that it can be killed from outside.

    nbclient owns it and shuts the kernel down when the notebook ends; `stop()` is for the other
    cases: it kills the kernel's session (jupyter_client starts the kernel with
    start_new_session, so its pid is the group), which takes every tool it started with it."""
    from jupyter_client.manager import AsyncKernelManager

    class StepKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            kw.update(transport="ipc", ip=str(ipc_dir / "kernel"), connection_file=str(ipc_dir / "kernel.json"))
            super().__init__(**kw)
            started.append(self)

        async def _async_interrupt_kernel(self):
            # jupyter_client interrupts before every shutdown; the kernel of a finished notebook is
            # idle, so that SIGINT would only log "KeyboardInterrupt caught in kernel" in a good run.
            if not getattr(self, "shutting_down", False):
                await super()._async_interrupt_kernel()

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            self._log = open(log_file, "ab")  # noqa: SIM115 (closed in stop())
            # The executed notebook keeps every progress-bar refresh as its own output (a 7B export
            # made ~150 of them); headless, one every HEADLESS_BAR_INTERVAL s says as much.
            env = {**(kw.get("env") or os.environ)}
            env.setdefault("TQDM_MININTERVAL", str(HEADLESS_BAR_INTERVAL))
            kw.update(stdout=self._log, stderr=self._log, env=env)
            await super()._async_launch_kernel(headless_kernel_cmd(kernel_cmd), **kw)

        async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
            # nbclient shuts the kernel down when the notebook ends, a cell fails or runs past
            # pipeline.cell_timeout_s; what its cells started (tools in groups or sessions of their
            # own included) goes first, while the kernel is still their parent.
            process = getattr(self.provisioner, "process", None) if self.provisioner else None
            if process is not None and process.poll() is None:
                kill_tree(process.pid, include_root=False)
            await super().shutdown_kernel(now=now, restart=restart)

        def stop(self) -> None:
            process = getattr(self.provisioner, "process", None) if self.provisioner else None
            if process is not None and process.poll() is None:
                # The kernel's group, and the tools it started in groups of their own (llama_cpp/runner.py).
                kill_tree(process.pid)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if getattr(self, "_log", None):
                self._log.close()

    return StepKernelManager


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def execute_notebook(step: registry.Step, run: Run) -> Path:
    """papermill the step's notebook into the run folder; HTML report even on failure.

    papermill runs in a worker thread, so that nbclient installs no signal handlers of its own
    and SIGINT/SIGTERM reach this (main) thread, which then kills the kernel's process group."""
    import papermill

    out = executed_path(step, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_previous(step, run)
    parameters = {"params_file": str(run.params_file) if run.params_file else None,
                  "params": run.params.model_dump(mode="json")}
    kernel_log = run.sub("logs") / f"kernel-{step.name}.log"
    cell_timeout = run.params.pipeline.cell_timeout_s
    outcome: dict[str, BaseException] = {}

    with tempfile.TemporaryDirectory(prefix="llava-gguf-kernel-") as ipc_dir:
        kernels: list = []
        km_class = kernel_manager_class(kernel_log, Path(ipc_dir), kernels)

        def work() -> None:
            try:
                papermill.execute_notebook(
                    str(step.source), str(out), parameters=parameters, cwd=str(step.source.parent),
                    kernel_name="python3", progress_bar=False, request_save_on_cell_execute=True,
                    kernel_manager_class=km_class, execution_timeout=cell_timeout)
            except BaseException as err:  # handed to the main thread
                outcome["error"] = err

        worker = threading.Thread(target=work, name=f"papermill-{step.name}", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt as err:
            for km in kernels:
                km.stop()
            worker.join(30)
            render_partial(out, run)
            raise Interrupted(f"step '{step.name}' interrupted ({str(err) or 'SIGINT'}); its kernel and tools "
                              f"were stopped; partly executed notebook: {out}") from None
        finally:
            for km in kernels:
                km.stop()
    err = outcome.get("error")
    if err is None:
        html.render_notebook(out, run)
    else:
        render_partial(out, run)
    if isinstance(err, papermill.PapermillExecutionError):
        raise StepFailed(f"step '{step.name}' failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                         f"partly executed notebook: {out}")
    if isinstance(err, TimeoutError):  # nbclient's CellTimeoutError
        raise StepFailed(f"step '{step.name}': a cell ran past its limit of {cell_timeout} s (params "
                         f"pipeline.cell_timeout_s) and was stopped, its kernel and tools killed\n{err}\n"
                         f"partly executed notebook: {out}; kernel log: {kernel_log}\n"
                         f"last lines:\n{last_output_lines(out)}")
    if err is not None:  # the kernel died (e.g. killed for memory) or could not start
        raise StepFailed(f"step '{step.name}' stopped: {type(err).__name__}: {err}\n"
                         f"partly executed notebook: {out}; kernel log: {kernel_log}")
    return out


def render_partial(executed: Path, run: Run) -> Path | None:
    """The report of a step that failed or was interrupted; it must not hide why the step stopped.
    papermill may have been cut off mid-write (a killed kernel leaves the notebook empty)."""
    try:
        return html.render_notebook(executed, run)
    except (OSError, ValueError) as err:  # nbformat's NotJSONError is a ValueError
        log.warning("no report of the partly executed notebook %s: %s", executed, err)
        return None


def last_output_lines(executed: Path, n: int = 8) -> str:
    """The last lines the last cell with output printed (its log), from an executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except (OSError, ValueError) as err:  # not written yet, or cut off mid-write
        return f"(unreadable: {err})"
    for cell in reversed(nb.cells):
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        if text.strip():
            return "\n".join(text.strip().splitlines()[-n:])
    return "(no output)"


def resume_command(run: Run, targets: list[str]) -> str:
    params = f" PARAMS={run.params_file}" if run.params_file else ""
    named = "all" if not targets or list(targets) == available_steps() else " ".join(targets)
    return f"make {named}{params}"


def run_steps(run: Run, targets: list[str], force: bool | set[str] = False) -> list[tuple[str, str]]:
    """Run the targets (and what they need); returns (step, 'ran'|'skipped') in order."""
    steps = plan(targets, run)
    forced = set(targets) if force is True else set(force or ())
    previous = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread (e.g. a notebook's thread): the default handling stays
        previous = {}
    try:
        with run.lock():
            run.remove_stale_partials()
            preflight.check(run, steps)  # every problem the steps would meet, before any of them runs
            return _run_locked(run, steps, forced)
    except Interrupted as err:
        what = str(err) if str(err).startswith("step ") else f"interrupted ({str(err) or 'SIGINT'})"
        raise Interrupted(f"{what}\nto resume: {resume_command(run, targets)} (the steps that finished are "
                          "skipped)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_locked(run: Run, steps: list[registry.Step], forced: set[str]) -> list[tuple[str, str]]:
    state = load_state(run)
    done: list[tuple[str, str]] = []
    fingerprints = {k: v.get("fingerprint", "") for k, v in state.items()}
    llama_cpp = None
    if any(s.uses_llama_cpp for s in steps):
        try:
            llama_cpp = toolchain.llama_cpp_info(run.params.llama_cpp.dir)
        except toolchain.ToolNotFound as err:
            log.warning("%s", err)  # the steps that need the tools will report it
    try:
        for step in steps:
            fp = step_fingerprint(step, run, fingerprints, llama_cpp)
            prev = state.get(step.name, {})
            if step.name not in forced and prev.get("fingerprint") == fp and products_exist(step, run):
                log.info("step %s: up to date, skipped", step.name)
                done.append((step.name, "skipped"))
                fingerprints[step.name] = fp
                continue
            if step.uses_llama_cpp and llama_cpp:
                run.record("llama_cpp", llama_cpp)
            log.info("step %s: running %s", step.name, step.notebook)
            state.pop(step.name, None)
            write_json(_state_file(run), state)
            started = time.time()
            with forcing(step.name in forced):
                execute_notebook(step, run)
            missing = [p for p in step.products_for(run.params.model.format) if p not in run.artifacts()]
            if missing:
                raise StepFailed(f"step '{step.name}' finished without recording {missing} in {run.artifacts_file}")
            fingerprints[step.name] = fp
            state[step.name] = {"fingerprint": fp, "seconds": round(time.time() - started, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_json(_state_file(run), state)
            done.append((step.name, "ran"))
    finally:
        html.render_index(run)
    return done
