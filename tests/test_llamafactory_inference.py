"""VPT answers wherever LLaMA-Factory generates: predict, the chat engine, and the OpenAI-compatible API.

Each runs the real ``llamafactory-cli`` (or LLaMA-Factory's ChatModel) in a fresh subprocess
on a tiny random VPT model; the API test serves it on loopback and sends it 32 concurrent
image questions through the openai client.
"""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from PIL import Image

from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.tiny import build_tiny_base, tiny_encoder_configs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def vpt_model(tmp_path_factory):
    base = build_tiny_base(tmp_path_factory.mktemp("base"), seed=0)
    return init_vpt_checkpoint(str(base), tmp_path_factory.mktemp("vpt"), ["clip", "dino", "sam"],
                               encoder_configs=tiny_encoder_configs())


def test_predict_writes_final_answers_and_traces(vpt_model, tmp_path):
    out = tmp_path / "predict"
    result = subprocess.run(
        ["llamafactory-cli", "train", "configs/demo/clip_vpt_predict.yaml", f"model_name_or_path={vpt_model}",
         f"output_dir={out}", "max_new_tokens=8"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = check_predictions(out)
    assert any(line["vpt_trace"]["rounds"] for line in lines), "the random model asks for perception on some rows"


def check_predictions(out: Path) -> list[dict]:
    """generated_predictions.jsonl of predicting the demo clip split: one line per row, with its trace."""
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    rows = json.loads((REPO / "data" / "demo" / "vpt_demo_clip_test.json").read_text())
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        # The prompt is the row's question only; the label its final answer.
        assert line["prompt"].count("<|im_start|>user") == 1
        assert line["label"].strip() == row["messages"][-1]["content"]
        assert set(line["vpt_trace"]) == {"rounds", "first_turn", "problem", "truncated"}
    return lines


# Appended to scripts that stream through LLaMA-Factory's ChatModel: it generates in a daemon thread it never
# joins (`Thread(target=model.generate)`, named "Thread-N (generate)"), and a thread still returning out of torch
# while the interpreter shuts down aborts the process ("terminate called without an active exception", seen once
# in CI), so the script waits for it before exiting. Its other threads (event loop, executor workers) idle forever.
JOIN_STREAM_THREADS = """
import threading
for thread in threading.enumerate():
    if thread.name.endswith("(generate)"):
        thread.join(timeout=60)
"""

CHAT_SCRIPT = """
import json, sys
from PIL import Image
from llamafactory.chat import ChatModel
chat = ChatModel(dict(model_name_or_path=sys.argv[1], template="vpt_qwen2_vl", infer_backend="huggingface",
                      max_new_tokens=8, do_sample=False, image_max_pixels=12544))
image = Image.new("RGB", (224, 224), (200, 40, 40))
messages = [{"role": "user", "content": "<image>What colour is it?"}]
[reply] = chat.chat(messages, images=[image])
streamed = "".join(chat.stream_chat(messages, images=[image]))
print(json.dumps({"reply": reply.response_text, "streamed": streamed,
                  "traces": chat.engine.model.vpt_last_traces}))
""" + JOIN_STREAM_THREADS


def test_chat_engine_answers_with_vpt_and_streams_the_same_text(vpt_model):
    result = subprocess.run([sys.executable, "-c", CHAT_SCRIPT, str(vpt_model)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["reply"] == found["streamed"]
    assert len(found["traces"]) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def api_server(vpt_model, tmp_path):
    port = _free_port()
    log = open(tmp_path / "api.log", "w")
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(f"model_name_or_path: {vpt_model}\ntemplate: vpt_qwen2_vl\ninfer_backend: huggingface\n"
                      "max_new_tokens: 8\nimage_max_pixels: 12544\n")
    server = subprocess.Popen(
        ["llamafactory-cli", "api", str(recipe)],
        cwd=REPO, env={**ENV, "API_HOST": "127.0.0.1", "API_PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=5)
    deadline = time.time() + 180
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise AssertionError("llamafactory-cli api did not start:\n" + (tmp_path / "api.log").read_text()[-3000:])
            time.sleep(1)
    yield f"http://127.0.0.1:{port}/v1"
    server.terminate()
    server.wait(timeout=60)
    log.close()


def _image_url(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_api_answers_32_concurrent_image_questions(api_server):
    async def ask_all():
        client = openai.AsyncOpenAI(base_url=api_server, api_key="none", max_retries=0, timeout=300)

        async def ask(k):
            content = [{"type": "text", "text": f"Question {k}: what colour is the picture?"},
                       {"type": "image_url", "image_url": {"url": _image_url((8 * k, 100, 200 - 4 * k))}}]
            return await client.chat.completions.create(model="vpt", messages=[{"role": "user", "content": content}])

        return await asyncio.gather(*(ask(k) for k in range(32)), return_exceptions=True)

    replies = asyncio.run(ask_all())
    errors = [reply for reply in replies if isinstance(reply, Exception)]
    assert not errors, errors[:3]
    assert len(replies) == 32
    assert all(reply.choices and reply.choices[0].message.content is not None for reply in replies)
