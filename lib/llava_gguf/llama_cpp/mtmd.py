"""Run `llama-mtmd-cli` on every variant x image/prompt case, with per-token timings.

How the tool writes (pinned build, and upstream since mtmd-cli exists): generated pieces go to
stdout, one `fprintf` + `fflush` per token, from the log thread; everything else goes to stderr.
The stdout stream of a single-turn run is

    "\\n"  (end of prompt processing)  piece_1 ... piece_k  ["\\n" if stopped by end-of-generation]  "\\n\\n"

so reading the stdout pipe in small unbuffered reads, each read is one token piece (a read
holding several pieces only happens if this reader falls behind by a whole token; it is
detected by the count check below). Each piece is stamped with `time.perf_counter()` (the
spawn and the read loop are mtmd_stream.py's).

Count check: the tool's `eval time = ... / N runs` counts decodes that a later sampling
synchronized. The last generated token is decoded, but when generation stops at `n_predict`
nothing synchronizes that decode before the perf print, so N = pieces - 1; when it stops at
end-of-generation the EOG sample synchronizes it, so N = pieces. The first piece is sampled
from the prompt-eval logits (no eval run of its own); the inter-token latencies (pieces - 1 of
them) each cover one eval run plus sampling.

Peak memory is the child's `ru_maxrss` from `wait4` (the kernel's high-water mark of resident
memory, including the mapped model pages that were touched; child processes included). The load the run
ran under (load average, other processes' CPU time from /proc/stat) is its `load` (machine_load.py).
"""
from __future__ import annotations

import logging
import math
import re
import signal
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from . import flags
from .mtmd_stream import Streamed, stream_run
from .timings import Timings, parse_timings
from ..model.gguf_io import GGUFError, open_gguf
from ..run.machine_load import row_fields
from ..run.params import EvaluateParams

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "tools/mtmd/test-1.jpeg"
# What llama-mtmd-cli decodes itself (stb_image), as Pillow names the formats. WebP and video go
# through ffmpeg, when the build has it and ffmpeg is installed: not counted on here.
READABLE_IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "TGA", "PSD", "PPM")
# The tool's log when it could not decode an image (it then tries video, "is ffprobe in PATH?").
_UNREADABLE_IMAGE = re.compile(r"failed to decode .*image|ffprobe failed|failed to load image|unable to load image", re.I)


class EvaluationError(RuntimeError):
    """A `llama-mtmd-cli` run failed; the message names the run's log, which is kept."""


@dataclass
class MtmdOptions:
    """How llama-mtmd-cli is run: the `evaluate` params (override keys with
    `evaluate.model_copy(update=...)`) plus the options that are no params keys. Every option goes
    through the flag table (`flags.FLAGS`)."""

    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    # 4 ("trace"): the log lines the timings are read from (see flags.FLAGS).
    log_verbosity: int | None = 4
    extra_args: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """The flag table's settings of a run (files and image/prompt apart)."""
        return {**flags.params_settings(self.evaluate), "log_verbosity": self.log_verbosity}

    def args(self) -> list[str]:
        return flags.flag_args(self.settings()) + list(self.extra_args)

    def run_settings(self, text_gguf: str | Path, mmproj: str | Path, image: str | Path, prompt: str) -> dict[str, Any]:
        """The settings of one run, files and image/prompt included: what `command` and scripts render."""
        return {"model": str(text_gguf), "mmproj": str(mmproj), "image": str(image), "prompt": prompt,
                **self.settings()}

    def command(self, cli_path: str | Path, text_gguf: str | Path, mmproj: str | Path, image: str | Path,
                prompt: str) -> list[str]:
        return flags.command(cli_path, self.run_settings(text_gguf, mmproj, image, prompt), flags.MTMD,
                             self.extra_args)

    def to_dict(self) -> dict[str, Any]:
        """What a run used, for its metrics record."""
        return {**self.settings(), "timeout_s": self.evaluate.timeout_s, "extra_args": list(self.extra_args)}


@dataclass
class EvalRun:
    """One llama-mtmd-cli run: its answer, the tool's timings and the stream's token timings."""

    command: list[str]
    log_path: str
    returncode: int
    answer: str
    timings: Timings
    wall_s: float
    peak_rss_mib: float | None
    # Arrival of each generated piece, seconds since the process was started.
    token_times_s: list[float]
    pieces: list[str]
    # Spawn -> first generated piece (model load, image encode, prompt eval, first sample).
    ttft_ms: float | None
    # The tool's "main: loading model" line (printed once both models are loaded) -> first piece.
    ttft_after_load_ms: float | None
    itl_ms: list[float]
    stop: str  # "n_predict" | "eog" | "unknown"
    token_check: str
    token_check_ok: bool
    load: dict = field(default_factory=dict)  # what the run ran under (machine_load.py)

    @property
    def n_tokens(self) -> int:
        return len(self.pieces)

    def itl_stats(self) -> dict[str, float | None]:
        if not self.itl_ms:
            return {"itl_mean_ms": None, "itl_median_ms": None, "itl_p90_ms": None, "itl_max_ms": None}
        s = sorted(self.itl_ms)
        return {"itl_mean_ms": statistics.fmean(s), "itl_median_ms": statistics.median(s),
                "itl_p90_ms": s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)], "itl_max_ms": s[-1]}

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {"answer": self.answer, "n_tokens": self.n_tokens, "stop": self.stop,
                               "ttft_ms": self.ttft_ms, "ttft_after_load_ms": self.ttft_after_load_ms}
        row.update(self.itl_stats())
        row["stream_tokens_per_s"] = (1000.0 / row["itl_mean_ms"]) if row["itl_mean_ms"] else None
        row.update(self.timings.summary())
        row.update({"peak_rss_mib": self.peak_rss_mib, "wall_s": self.wall_s,
                    "token_check_ok": self.token_check_ok, "log": self.log_path, **row_fields(self.load)})
        return row

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timings"] = self.timings.to_dict()
        data["n_tokens"] = self.n_tokens
        data.update(self.itl_stats())
        return data


# ----------------------------------------------------------------------------- one run
def image_problem(path: Path | str) -> str | None:
    """Why llama-mtmd-cli cannot read this file as an image, phrased to follow the path (None: it can)."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not an image file"
    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # decodes it: a cut-off file fails here
    except UnidentifiedImageError:
        return "is not an image (no image format recognises it); give a JPEG or PNG file"
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's errors for damaged files
        return f"is not an image llama-mtmd-cli can read ({err}); give an intact JPEG or PNG file"
    if fmt not in READABLE_IMAGE_FORMATS:
        return (f"is a {fmt} image, which llama-mtmd-cli's image loader does not read "
                f"(it reads {', '.join(READABLE_IMAGE_FORMATS)}); convert it to PNG or JPEG")
    return None


def check_input(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def run_mtmd(cli_path: str | Path, text_gguf: str | Path, mmproj: str | Path, image: str | Path,
             prompt: str, opts: MtmdOptions | None = None, log_path: str | Path = "mtmd.log") -> EvalRun:
    """Run llama-mtmd-cli once; the full log (stdout and stderr as they arrived) goes to log_path."""
    opts = opts or MtmdOptions()
    cmd = _checked_command(cli_path, text_gguf, mmproj, image, prompt, opts)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("llama-mtmd-cli %s on %s (log %s)", Path(text_gguf).name, Path(image).name, log_path)
    streamed = stream_run(cmd, log_path, opts.evaluate)
    if streamed.timed_out:
        raise _timed_out(opts.evaluate.timeout_s, log_path)
    _raise_for_status(streamed.returncode, cmd, log_path, {"text GGUF": Path(text_gguf), "mmproj": Path(mmproj)},
                      Path(image))
    return _eval_run(cmd, log_path, streamed, opts.evaluate.n_predict)


def _checked_command(cli_path: str | Path, text_gguf: str | Path, mmproj: str | Path, image: str | Path,
                     prompt: str, opts: MtmdOptions) -> list[str]:
    """The run's argv, once its four files are known to exist: a missing one is named here, as what
    it is (the image with its params key), before a process is started."""
    check_input(Path(image), "image (params evaluate.cases[].image)")
    check_input(Path(text_gguf), "text GGUF")
    check_input(Path(mmproj), "mmproj GGUF")
    check_input(Path(cli_path), "llama-mtmd-cli")
    return opts.command(cli_path, text_gguf, mmproj, image, prompt)


def _eval_run(cmd: list[str], log_path: Path, streamed: Streamed, n_predict: int) -> EvalRun:
    """A successful run's record, from its log and its stamped stdout reads.

    The tool's own timings come from the log; the pieces and their times from the reads, split by how
    generation stopped (`_split_pieces`). The piece count is checked against the log's eval runs
    (`_check_count`): a mismatch means some read held more than one token, so the per-token times
    are only approximate, which the record says (token_check_ok) rather than hides.
    """
    timings = parse_timings(log_path.read_text(encoding="utf-8", errors="replace"))
    for u in timings.unparsed:
        log.warning("%s:%d: looks like a timing but did not parse: %s", log_path, u["line"], u["text"])
    pieces, times, stop = _split_pieces(streamed.chunks, n_predict,
                                        timings.eval["runs"] if timings.eval else None)
    answer = b"".join(pieces).decode("utf-8", errors="replace").strip()
    ok, check = _check_count(len(pieces), stop, timings, n_predict)
    if not ok:
        log.warning("%s: %s", log_path, check)
    itl = [1000.0 * (b - a) for a, b in zip(times, times[1:])]
    loaded_at = streamed.loaded_at
    return EvalRun(
        command=cmd, log_path=str(log_path), returncode=streamed.returncode, answer=answer, timings=timings,
        wall_s=streamed.wall_s, peak_rss_mib=streamed.peak_rss_mib, token_times_s=times,
        pieces=[p.decode("utf-8", errors="replace") for p in pieces],
        ttft_ms=1000.0 * times[0] if times else None,
        ttft_after_load_ms=1000.0 * (times[0] - loaded_at) if times and loaded_at is not None else None,
        itl_ms=itl, stop=stop, token_check=check, token_check_ok=ok, load=streamed.load)


def _timed_out(timeout_s: float, log_path: Path) -> EvaluationError:
    """The error for a run killed at its limit, with the log's last lines: they show where it hung."""
    tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
    return EvaluationError(f"llama-mtmd-cli ran past its limit of {timeout_s} s (evaluate.timeout_s) and was "
                           f"stopped (its process group killed); log kept at {log_path}\nlast lines:\n"
                           + "\n".join(tail))


def _error_lines(log_path: Path, n: int = 6) -> str:
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    picked = [ln for ln in lines if re.search(r"(?:^|\s)E\s|(?i:\b(?:error|failed|abort|exception)\b)", ln)]
    return "\n    ".join((picked or lines)[-n:])


def _gguf_problems(files: dict[str, Path]) -> list[str]:
    """Why a GGUF the tool could not load is unreadable (only read after a failure)."""
    problems = []
    for label, path in files.items():
        try:
            open_gguf(path, label)
        except GGUFError as err:
            problems.append(f"{label} {path} is not a readable GGUF: it {err.problem}")
    return problems


def _raise_for_status(rc: int, cmd: list[str], log_path: Path, inputs: dict[str, Path],
                      image: Path | None = None) -> None:
    if rc == 0:
        return
    if image is not None and rc > 0 and \
            _UNREADABLE_IMAGE.search(log_path.read_text(encoding="utf-8", errors="replace")):
        # Its last words are about ffprobe (its video fallback), which is not what to fix.
        problem = image_problem(image) or ("is in a form its image loader does not decode (e.g. a CMYK or 12-bit "
                                           "JPEG); convert it to an 8-bit RGB PNG or JPEG")
        raise EvaluationError(f"llama-mtmd-cli could not read {image} as an image: it "
                              f"{problem if problem.startswith('is ') else 'was ' + problem}; full log kept at "
                              f"{log_path}\n  command: {' '.join(cmd)}")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        what = f"crashed ({name})"
    else:
        what = f"failed (exit status {rc})"
    tail = _error_lines(log_path)
    # This build can exit(1) before its log thread has written anything.
    shown = f"Last error lines:\n    {tail}" if tail else "The tool wrote nothing to its log."
    problems = _gguf_problems(inputs) if rc > 0 else []
    hint = ("\n  " + "\n  ".join(problems) + "\n  (re-export it, or point the params at a complete file)"
            if problems else "")
    raise EvaluationError(f"llama-mtmd-cli {what}; full log kept at {log_path}. {shown}{hint}\n"
                          f"  command: {' '.join(cmd)}")


def _split_pieces(chunks: list[tuple[float, bytes]], n_predict: int,
                  eval_runs: int | None = None) -> tuple[list[bytes], list[float], str]:
    """The generated pieces and their arrival times, from the stdout reads (see module doc).

    How generation stopped decides whether a newline before the final "\\n\\n" is the tool's
    end-of-generation newline: with the log's eval run count, eval_runs = n_predict - 1 means the
    n_predict stop (an EOG sampled exactly at the last step is told apart by timing, below);
    fewer runs mean EOG. Without the count (a log without the perf block), a lone newline read
    with fewer pieces than n_predict is taken as the EOG newline.
    """
    chunks = [(t, b) for t, b in chunks if b]
    end_t = chunks[-1][0] if chunks else 0.0
    # The newline that ends prompt processing.
    if chunks and chunks[0][1].startswith(b"\n"):
        chunks[0] = (chunks[0][0], chunks[0][1][1:])
        chunks = [(t, b) for t, b in chunks if b]
    # The "\n\n" printed before the perf block (may share a read with the last piece).
    chunks = _strip_trailing_newlines(chunks, 2)
    n = len(chunks)
    lone_newline_last = n > 0 and chunks[-1][1] == b"\n"
    if n_predict < 0:  # no limit: only end-of-generation (or a full context) stops it
        stop = "eog"
    elif eval_runs is not None and eval_runs + 1 < n_predict:
        stop = "eog"
    elif eval_runs is not None or n == n_predict:
        stop = "n_predict"
        if lone_newline_last and n > 2:
            # n_predict - 1 pieces + the EOG newline, or n_predict pieces of which the last is a
            # newline token? The EOG newline is written right before "\n\n" (no decode in
            # between); a last token is followed by one more decode before "\n\n".
            gaps = sorted(b[0] - a[0] for a, b in zip(chunks[:-1], chunks[1:-1]))
            if end_t - chunks[-1][0] < 0.25 * gaps[len(gaps) // 2]:
                stop = "eog"
    else:
        stop = "eog" if n < n_predict else "unknown"
    if stop == "eog" and (lone_newline_last or eval_runs is not None):
        chunks = _strip_trailing_newlines(chunks, 1)
    return [b for _, b in chunks], [t for t, _ in chunks], stop


def _strip_trailing_newlines(chunks: list[tuple[float, bytes]], count: int) -> list[tuple[float, bytes]]:
    chunks = list(chunks)
    while count and chunks:
        t, b = chunks[-1]
        cut = min(count, len(b) - len(b.rstrip(b"\n")))
        if cut == 0:
            break
        count -= cut
        chunks[-1] = (t, b[:len(b) - cut])
        if not chunks[-1][1]:
            chunks.pop()
    return chunks


def _check_count(n_pieces: int, stop: str, timings: Timings, n_predict: int) -> tuple[bool, str]:
    if timings.eval is None:
        return False, (f"{n_pieces} pieces streamed; the log has no 'eval time' line to check them against "
                       "(run with -lv 4 or -v)")
    runs = timings.eval["runs"]
    expected = runs + 1 if stop == "n_predict" else runs
    if n_pieces == expected:
        return True, (f"{n_pieces} pieces = eval runs {runs}" + (" + 1 (the n_predict-th token's decode is "
                      "never synchronized before the perf print)" if stop == "n_predict" else ""))
    if n_pieces < expected:
        return False, (f"{n_pieces} pieces but {expected} tokens expected from eval runs {runs} (stop: {stop}): "
                       "some reads held more than one token; per-token times are approximate")
    return False, f"{n_pieces} pieces but only {expected} expected from eval runs {runs} (stop: {stop})"
