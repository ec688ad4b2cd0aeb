"""``llamafactory-cli api`` serving a VPT model, on loopback: good requests answered, bad ones refused
with what was wrong, a long decode neither blocks the server without limit nor outlives SIGTERM.

A real server process (uvicorn, FastAPI, LLaMA-Factory's engine) with a tiny random clip-branch
VPT model; requests are sent concurrently from threads.
"""

import base64
import io
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from PIL import Image
from test_llamafactory import ENV, REPO

from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.tiny import build_tiny_fixtures

QUEUE_TIMEOUT_S = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, content, max_tokens: int = 4, timeout: float = 120, **options) -> requests.Response:
    body = {"model": "vpt", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **options}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def question(image_url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What colour is it?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tiny = build_tiny_fixtures(root / "tiny", bases=("qwen2_vl",))
    model = init_vpt_checkpoint(str(tiny["qwen2_vl"]), root / "model", ["clip"])
    port = free_port()
    env = {**os.environ, **ENV, "API_HOST": "127.0.0.1", "API_PORT": str(port), "MAX_CONCURRENT": "2",
           "VPT_API_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT_S), "VPT_API_SHUTDOWN_TIMEOUT": "20"}
    log = open(root / "server.log", "w")
    (root / "serve.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": str(model), "template": "vpt_qwen2_vl", "infer_backend": "huggingface",
        "image_max_pixels": 12544, "infer_dtype": "float32"}))
    process = subprocess.Popen(["llamafactory-cli", "api", str(root / "serve.yaml")], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            requests.get(f"{url}/v1/models", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(1)
    else:
        raise AssertionError("the server did not start:\n" + (root / "server.log").read_text()[-5000:])
    yield url, process, root / "server.log"
    if process.poll() is None:
        process.kill()
    log.close()


def test_concurrent_good_requests_are_answered_and_bad_ones_get_400(server):
    url, _, _ = server
    good = question(png_data_url())
    bad = {
        "not base64": (question("data:image/png;base64,@@not-base64@@"), "the image is not valid base64"),
        "not an image": (question("data:image/png;base64," + base64.b64encode(b"plain text, no image").decode()),
                         "not an image PIL can read"),
        "other data URL": (question("data:text/plain;base64,aGVsbG8="), "a data URL must be data:image/"),
        "empty content": ([], "messages[0] (user) has empty content"),
        "empty text": ([{"type": "text", "text": "  "}], "messages[0] (user) has empty content"),
    }
    with ThreadPoolExecutor(max_workers=12) as pool:
        answered = [pool.submit(chat, url, good) for _ in range(6)]
        refused = {name: pool.submit(chat, url, content) for name, (content, _) in bad.items()}
        too_long = pool.submit(chat, url, good, 10**6)
    for reply in answered:
        response = reply.result()
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
    for name, reply in refused.items():
        response = reply.result()
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert bad[name][1] in response.json()["detail"], (name, response.text)
    response = too_long.result()
    assert response.status_code == 400 and "max_tokens 1000000 does not fit the model's context of" in response.text


def test_a_long_decode_bounds_the_wait_and_sigterm_stops_the_server(server):
    url, process, log = server
    good = question(png_data_url())
    with ThreadPoolExecutor(max_workers=3) as pool:
        # Greedy decodes of 4000 tokens (this random model writes no eos; about 10 s each). Beside one,
        # a short request is served; when both places are taken, it waits the queue timeout and gets 503.
        long = [pool.submit(chat, url, good, 4000, 300, do_sample=False)]
        time.sleep(1)
        assert chat(url, good).status_code == 200
        long.append(pool.submit(chat, url, good, 4000, 300, do_sample=False))
        time.sleep(1)
        started = time.monotonic()
        waited = chat(url, good)
        assert waited.status_code == 503, waited.text
        assert time.monotonic() - started < QUEUE_TIMEOUT_S + 5
        assert waited.headers["Retry-After"] == str(QUEUE_TIMEOUT_S) and "the model is busy" in waited.text
        assert not any(reply.done() for reply in long), "the long decodes ended too soon to test SIGTERM"
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert time.monotonic() - stopped < 8, "SIGTERM did not stop the decodes in flight"
        for reply in long:  # answered with what was decoded so far, or cut off with the server
            try:
                assert reply.result().status_code == 200
            except requests.ConnectionError:
                pass
    assert "Shutting down" in log.read_text()
