"""llama-server on the tiny model: started on a free loopback port and always stopped, follow-ups that
take the image from the cache (the server's own token counts), a second image, bad requests, the
image-token count against llama-mtmd-cli's, and serve-llava.sh (port check, addresses, Ctrl-C)."""
from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time

import pytest

from llava_gguf.llama_cpp import chat, flags, server, toolchain, webui
from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE, MtmdOptions, run_mtmd
from llava_gguf.run.params import EvaluateParams

pytestmark = pytest.mark.llama_cpp
# The server caps a slot's context at the model's trained one (4096 for the tiny model as for 7B).
CTX = 4096


def settings(ggufs) -> dict:
    return {"model": str(ggufs["text"]), "mmproj": str(ggufs["mmproj"]), "threads": 2, "ctx_size": CTX,
            "temperature": 0, "top_k": 1, "chat_template": "vicuna"}


@pytest.fixture(scope="module")
def srv(tiny_ggufs, llama_tool, tmp_path_factory):
    s = server.start(llama_tool(flags.SERVER), settings(tiny_ggufs), tmp_path_factory.mktemp("server") / "server.log",
                     ready_timeout_s=180)
    try:
        yield s
    finally:
        rc = s.stop()
        assert rc is not None and s.process.poll() is not None


@pytest.fixture(scope="module")
def test_jpeg():
    return toolchain.source_asset(DEFAULT_IMAGE)


def png(path, size, color):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def test_the_server_runs_the_flag_tables_command_on_loopback(srv, tiny_ggufs, llama_tool):
    assert srv.argv == flags.server_command(llama_tool(flags.SERVER),
                                            server.serve_settings(settings(tiny_ggufs), "127.0.0.1", srv.port))
    assert srv.host == "127.0.0.1" and srv.get("/health")[0] == 200
    assert server.port_in_use("127.0.0.1", srv.port)
    # Its own record of what it was started with: the chat template and the context asked for.
    status, props = srv.get("/props")
    assert status == 200 and props["default_generation_settings"]["n_ctx"] == CTX
    assert props["modalities"]["vision"] is True


def test_a_follow_up_takes_the_image_from_the_cache(srv, test_jpeg):
    c = chat.Conversation(srv.api_url, max_tokens=4)
    first = c.ask("Describe this image.", [test_jpeg])
    second = c.ask("What colour is the sky in it?")
    third = c.ask("And the ground?")
    # The first turn processes the image's 2340 tokens (see test_evaluate's mtmd-cli count) and the text.
    assert first.prompt_n > 2340 and first.ttft_s is not None and first.total_s >= first.ttft_s
    for before, turn in ((first, second), (second, third)):
        # Only the new text is processed: the answer before it and the question (a few dozen tokens).
        assert turn.prompt_n < first.prompt_n / 20, (first, turn)
        assert turn.cache_n >= before.cache_n + before.prompt_n, (before, turn)
    assert [t.turn for t in c.turns] == [1, 2, 3] and len(c.messages) == 6


def test_a_second_image_in_the_conversation_is_encoded_and_answered(srv, tmp_path):
    # Strips: LLaVA 1.6 unpads their tiles to a few rows, so two images fit the tiny model's 4096.
    a, b = png(tmp_path / "a.png", (1000, 100), "red"), png(tmp_path / "b.png", (100, 1000), "blue")
    c = chat.Conversation(srv.api_url, max_tokens=4)
    first = c.ask("What is this?", [a])
    follow = c.ask("Is it bright?")
    second = c.ask("And this one?", [b])
    assert follow.prompt_n < 100
    # The new image is processed (its tokens are hundreds, the question a handful); all before it is cached.
    assert second.prompt_n > 500 and second.cache_n >= first.prompt_n + first.cache_n
    assert second.predicted_n >= 1 and second.finish_reason in ("stop", "length")


def _chat_body(content, max_tokens=2) -> dict:
    return {"model": chat.MODEL_NAME, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}


def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(srv, tmp_path):
    from openai import BadRequestError, OpenAI

    good = _chat_body([{"type": "image_url", "image_url": {"url": chat.image_data_url(png(tmp_path / "g.png", (64, 64),
                                                                                           "green"))}},
                       {"type": "text", "text": "What is this?"}])
    no_image = _chat_body("Hello, what can you see?")
    not_an_image = _chat_body([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"this is not a picture " * 40).decode()}},
        {"type": "text", "text": "What is this?"}])
    too_long = _chat_body("hello " * (CTX + 500))
    # A raw prompt that ends in an image: the pinned server aborted on it; patch 0004 refuses it.
    ends_in_image = {"prompt": {"prompt_string": "Describe " + srv.get("/props")[1]["media_marker"],
                                "multimodal_data": [base64.b64encode((tmp_path / "g.png").read_bytes()).decode()]},
                     "n_predict": 1}
    status, body = srv.post("/v1/chat/completions", no_image)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")  # answered, no image needed
    for path, bad, says in (("/v1/chat/completions", not_an_image, "failed to load image"),
                            ("/v1/chat/completions", too_long, "exceeds the available context size"),
                            ("/completion", ends_in_image, "the prompt ends with an image or audio")):
        status, body = srv.post(path, bad)
        assert status == 400 and says in body["error"]["message"].lower(), body
        status, body = srv.post("/v1/chat/completions", good)
        assert status == 200 and body["usage"]["prompt_tokens"] > 500, body  # still serving, image encoded
    # As a user's client sees it: an exception carrying the server's message.
    client = OpenAI(base_url=srv.api_url, api_key="none", max_retries=0)
    with pytest.raises(BadRequestError, match="exceeds the available context size"):
        client.chat.completions.create(**too_long)
    assert srv.get("/health")[0] == 200


def test_the_server_counts_as_many_image_tokens_as_mtmd_cli(srv, tiny_ggufs, llama_tool, test_jpeg, tmp_path):
    """Patch 0002's faithful LLaVA 1.6 sequence reaches the server: same image, same mmproj, same count."""
    def processed(prompt: str, images=()) -> int:
        status, body = srv.post("/completion", {
            "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(p.read_bytes()).decode()
                                                                    for p in images]},
            "n_predict": 1, "cache_prompt": False})
        assert status == 200, body
        return body["timings"]["prompt_n"]

    def text_tokens(text: str, first: bool) -> int:  # as mtmd tokenizes a text chunk: BOS on the first only
        status, body = srv.post("/tokenize", {"content": text, "add_special": first, "parse_special": True})
        assert status == 200, body
        return len(body["tokens"])

    # Text after the image: a prompt that ends in one is refused (patch 0004; it aborted the pinned server).
    marker = srv.get("/props")[1]["media_marker"]  # where the image's tokens go (random per server)
    before, after = "Describe ", " now."
    text = text_tokens(before, True) + text_tokens(after, False)
    server_tokens = processed(before + marker + after, [test_jpeg]) - text
    r = run_mtmd(llama_tool("llama-mtmd-cli"), tiny_ggufs["text"], tiny_ggufs["mmproj"], test_jpeg, "Describe",
                 MtmdOptions(EvaluateParams(n_predict=1, threads=2, ctx_size=4096)), tmp_path / "mtmd.log")
    assert r.timings.image_tokens and server_tokens == r.timings.image_tokens
    # And a chat request's whole prompt is mtmd-cli's, token for token: the GGUF's Vicuna template with
    # Jinja (serve_settings). The server's non-Jinja path puts a newline after the image (2 more tokens).
    assert "--jinja" in srv.argv and "--chat-template" not in srv.argv
    status, body = srv.post("/v1/chat/completions", {"messages": [chat.user_message("Describe", [test_jpeg])],
                                                     "max_tokens": 1, "cache_prompt": False})
    assert status == 200, body
    assert body["timings"]["prompt_n"] == r.timings.prompt_eval["tokens"]
    other = png(tmp_path / "wide.png", (900, 300), "gray")  # another pinpoint: another count, still equal
    r2 = run_mtmd(llama_tool("llama-mtmd-cli"), tiny_ggufs["text"], tiny_ggufs["mmproj"], other, "Describe",
                  MtmdOptions(EvaluateParams(n_predict=1, threads=2, ctx_size=4096)), tmp_path / "mtmd2.log")
    assert r2.timings.image_tokens != r.timings.image_tokens
    assert processed(before + marker + after, [other]) - text == r2.timings.image_tokens


def test_a_restarted_server_answers_a_follow_up_from_a_saved_slot(tiny_ggufs, llama_tool, test_jpeg, tmp_path):
    """Slot save/restore: the image is not encoded again after a restart (one slot, so it is slot 0)."""
    exe, slots = llama_tool(flags.SERVER), tmp_path / "slots"
    slots.mkdir()
    st = {**settings(tiny_ggufs), "parallel": 1, "slot_save_path": f"{slots}/"}
    with server.start(exe, st, tmp_path / "first.log") as s:
        c = chat.Conversation(s.api_url, max_tokens=4)
        first = c.ask("Describe this image.", [test_jpeg])
        saved = s.slot_action("save", "conversation.bin")
    assert saved["n_saved"] >= first.prompt_n and (slots / "conversation.bin").stat().st_size > 0
    with server.start(exe, st, tmp_path / "second.log") as s:
        restored = s.slot_action("restore", "conversation.bin")
        assert restored["n_restored"] == saved["n_saved"]
        again = chat.Conversation(s.api_url, max_tokens=4, messages=list(c.messages))
        follow = again.ask("What colour is the sky in it?")
        with pytest.raises(server.ServerError, match="HTTP 400"):  # a file that is not there: an error, not a crash
            s.slot_action("restore", "no-such-file.bin")
        assert s.get("/health")[0] == 200
    assert follow.prompt_n < first.prompt_n / 20 and follow.cache_n >= first.prompt_n


def test_a_taken_port_is_refused_before_the_server_starts(srv, tiny_ggufs, llama_tool, tmp_path):
    with pytest.raises(server.PortInUse, match=f"port {srv.port} on 127.0.0.1 is already in use"):
        server.start(llama_tool(flags.SERVER), settings(tiny_ggufs), tmp_path / "s.log", port=srv.port)
    script = tmp_path / server.SCRIPT_NAME
    script.write_text(server.script_text(llama_tool(flags.SERVER), settings(tiny_ggufs)))
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PORT": str(srv.port)})
    assert out.returncode == 1
    assert f"port {srv.port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr
    assert srv.get("/health")[0] == 200  # the running server was left alone


def test_serve_script_binds_loopback_prints_the_addresses_and_stops_on_ctrl_c(tiny_ggufs, llama_tool, tmp_path):
    exe = llama_tool(flags.SERVER)
    script = tmp_path / server.SCRIPT_NAME
    script.write_text(server.script_text(exe, settings(tiny_ggufs)))
    port = server.free_port()
    err = tmp_path / "serve.err"
    with open(err, "w") as errf:
        proc = subprocess.Popen(["bash", str(script), "-c", "2048"], stdout=subprocess.DEVNULL, stderr=errf,
                                env={**os.environ, "PORT": str(port)}, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, err.read_text()[-2000:]
            try:
                if server.request(f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, err.read_text()[-2000:]
            time.sleep(0.3)
        text = err.read_text()
        assert f"OpenAI-compatible API: http://127.0.0.1:{port}/v1" in text and f"http://127.0.0.1:{port}/" in text
        argv = flags.executed_argv(text, server.SCRIPT_NAME)
        # The table's command with PORT and the user's -c in place of the script's own values.
        own = server.serve_settings({**settings(tiny_ggufs), "ctx_size": None})
        page = webui.built_ui()  # and the chat page where `make webui` built it (tests/test_webui.py uses it)
        assert argv == flags.server_command(exe, {**own, "port": None}) + ["--port", str(port), "-c", "2048"] + (
            ["--path", str(page)] if page else [])
        assert ("web page:              http://" if page else "web page:              unavailable") in text
        assert server.request(f"http://127.0.0.1:{port}/props")[1]["default_generation_settings"]["n_ctx"] == 2048
        with socket.socket() as s:  # loopback only: the machine's other addresses are not served
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, port)) != 0
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(60) == 0, err.read_text()[-2000:]
        assert not server.port_in_use("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
