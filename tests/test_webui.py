"""llama-server's own chat page (llama_cpp/webui.py, `make webui`), served with --path and used in
headless Chromium (tests/browser.py) as a person would: an image picked in the page's file input, a
question typed and sent, the answer shown; then a follow-up that takes the image from the cache.
The server's own /slots record says what it processed for the page's requests."""
from __future__ import annotations

import json
import os

import pytest

from llava_gguf.llama_cpp import flags, server, toolchain, webui
from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE

pytestmark = pytest.mark.llama_cpp
IMAGE_TOKENS = 2340  # the test image's tokens through the tiny mmproj (test_evaluate's mtmd-cli count)
INPUT = 'textarea, [contenteditable="true"]'
SEND = 'button[type="submit"]'
ANSWERS = '[aria-label="Assistant message with actions"]'
# While it streams, the form shows a Stop button instead of Send (unless something is typed).
STREAMING = "[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Stop')"


def answered(page, n: int, timeout: float) -> str:
    """Wait for the n-th answer, finished: shown with its statistics ("8 tokens"), no Stop button; its text."""
    return page.wait_for(
        f"(() => {{ const a = document.querySelectorAll({ANSWERS!r}); const t = a.length ? a[a.length - 1].innerText "
        f": ''; return a.length === {n} && /\\d+ tokens/.test(t) && !{STREAMING} && t; }})()", timeout,
        f"answer {n}, finished, with its statistics")


@pytest.fixture(scope="module")
def page_dir():
    folder = webui.built_ui()
    if folder is None:
        message = (f"llama-server's chat page is not built in {webui.ui_dir()}: {webui.BUILD_HINT} "
                   "(.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="module")
def page_server(page_dir, tiny_ggufs, llama_tool, tmp_path_factory):
    st = {"model": str(tiny_ggufs["text"]), "mmproj": str(tiny_ggufs["mmproj"]), "threads": 2, "ctx_size": 4096,
          "temperature": 0, "top_k": 1, "chat_template": "vicuna", "ui_path": str(page_dir)}
    # Answers of 8 tokens: the page asks for no length, so the server's own -n caps them (the tiny
    # model never stops by itself); serve-llava.sh leaves -n out (server.SERVE_DROPS).
    s = server.start(llama_tool(flags.SERVER), st, tmp_path_factory.mktemp("webui") / "server.log",
                     extra_args=["-n", "8"], ready_timeout_s=180)
    # What the page needs (server.py's module doc): Jinja, for the tools it sends; the GGUF's template.
    assert "--jinja" in s.argv and "--chat-template" not in s.argv and s.argv[s.argv.index("--path") + 1] == str(page_dir)
    try:
        yield s
    finally:
        s.stop()


def chat_exchange(page, n: int) -> tuple[dict, str, dict]:
    """The page's n-th /v1/chat/completions request: what it sent, the answer text streamed back, and
    the server's own timings (its last chunk)."""
    sent = page.exchanges("/v1/chat/completions")
    assert len(sent) >= n, [x["url"] for x in sent]
    x = sent[n - 1]
    chunks = [json.loads(line[5:]) for line in x["response"].splitlines()
              if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    timings = [c["timings"] for c in chunks if c.get("timings")]
    assert timings, x["response"][-500:]
    return json.loads(x["body"]), text, timings[-1]


def test_the_page_is_the_built_folder(page_server, page_dir):
    status, text = page_server.get("/")
    assert status == 200 and text == (page_dir / "index.html").read_text()
    assert page_server.get("/build.json")[1] == {"version": toolchain.LLAMA_CPP_COMMIT}
    assert page_server.get("/health")[0] == 200  # the API beside it


def test_an_image_uploaded_in_the_chat_page_is_answered(page_server, chromium, tmp_path):
    image = toolchain.source_asset(DEFAULT_IMAGE)
    page = chromium.open(page_server.url + "/")
    try:
        page.record_requests()
        page.wait_for(f"!!(document.querySelector('input[type=file]') && document.querySelector({INPUT!r}))", 60,
                      "the chat form")
        page.set_files("input[type=file]", [image])
        page.wait_for("[...document.images].some(i => i.src.startsWith('data:image/jpeg') || i.src.startsWith('blob:'))",
                      30, "the picked image shown in the form")
        page.type_text(INPUT, "What is in this image?")
        page.wait_for(f"!document.querySelector({SEND!r}).disabled", 30, "the send button enabled")
        page.click(SEND)
        shown = answered(page, 1, 240)
        assert "Server Error" not in page.evaluate("document.body.innerText"), shown
        assert page.evaluate("document.querySelector('[aria-label=\"User message with actions\"] img') !== null")
        body, text, timings = chat_exchange(page, 1)
        # The page sent the image inline and the question; the server processed the image's tokens
        # (the text is a few dozen) and generated the whole answer (-n 8) that the page shows.
        parts = body["messages"][-1]["content"]
        assert any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/jpeg;base64,")
                   for p in parts), parts
        assert any(p.get("type") == "text" and p["text"] == "What is in this image?" for p in parts), parts
        assert timings["prompt_n"] > IMAGE_TOKENS and timings["predicted_n"] == 8, timings
        assert text.strip() and text.strip() in shown and "8 tokens" in shown
        page.screenshot(tmp_path / "answered.png")

        page.type_text(INPUT, "What colour is it?")
        page.wait_for(f"!document.querySelector({SEND!r}).disabled", 30, "the send button enabled again")
        page.click(SEND)
        shown = answered(page, 2, 120)
        body, text, follow = chat_exchange(page, 2)
        assert [m["role"] for m in body["messages"]][-3:] == ["user", "assistant", "user"]
        # The follow-up took the image from the cache: only the new text was processed.
        assert follow["prompt_n"] < 100 and follow["cache_n"] >= timings["prompt_n"], follow
        assert text.strip() in shown
        page.screenshot(tmp_path / "follow-up.png")
    finally:
        page.close()
    assert page_server.get("/health")[0] == 200
