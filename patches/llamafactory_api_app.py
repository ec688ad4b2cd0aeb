"""Patch of ``llamafactory.api.app``: the OpenAI-compatible server answers bad requests, stays responsive, stops.

What changes, for ``llamafactory-cli api`` (any model):
- A chat request is checked before it reaches the engine: an image that is not valid base64, not
  an image, or a data URL of another type, and a message with empty content, get HTTP 400 saying
  which message and part; ``max_tokens`` above the model's context gets 400 naming the context.
  (Upstream answers the first with 500 from deep inside PIL and the second with 200.)
- At most ``MAX_CONCURRENT`` requests (the engine's own limit, default 1) are served at once; one
  that waits longer than ``VPT_API_QUEUE_TIMEOUT`` seconds (default 60) for its turn gets 503 with
  ``Retry-After``, instead of waiting behind a long decode without limit.
- SIGTERM (and Ctrl-C) stop the server: generation in flight ends at its next token
  (``vpt_plugin.generation.STOP_REQUESTED``, for VPT models; others finish their decode, bounded by
  ``max_tokens``) and uvicorn's graceful shutdown is bounded by ``VPT_API_SHUTDOWN_TIMEOUT`` seconds
  (default 30), after which in-flight requests are cancelled.

Why no public hook serves: ``create_app`` builds its routes around ``create_chat_completion_response``
and ``create_stream_chat_completion_response`` (this module's names, bound from ``api.chat``) with
no validation hook; ``run_api`` calls ``uvicorn.run`` with fixed arguments and no signal hook. The
admission limit is a FastAPI middleware added to the app ``create_app`` returns (FastAPI's public hook).
"""

import asyncio
import base64
import binascii
import io
import os
import re

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.api.app"
CHECKED_AGAINST = {"create_app": "fe6605827491edb9", "run_api": "8c0fdc35694699f7"}
CHAT_TARGET = "llamafactory.api.chat"
# The request handling the checks below front; they assume its image and message rules.
CHAT_CHECKED_AGAINST = {"_process_request": "bff9ece7cf79e515",
                        "create_chat_completion_response": "8145d86bd9c0af9c",
                        "create_stream_chat_completion_response": "c22998938bf2cad6"}

QUEUE_TIMEOUT_VARIABLE = "VPT_API_QUEUE_TIMEOUT"
SHUTDOWN_TIMEOUT_VARIABLE = "VPT_API_SHUTDOWN_TIMEOUT"
# Upstream's own pattern for a base64 image (api/chat.py); other data URLs it would fetch as web URLs.
BASE64_IMAGE = re.compile(r"^data:image\/(png|jpg|jpeg|gif|bmp);base64,(.+)$")


def check_chat_request(request, context_length: int | None) -> None:
    """Raise HTTP 400 naming what is wrong with a chat request, before any of it is decoded upstream."""
    from fastapi import HTTPException, status
    from PIL import Image, UnidentifiedImageError

    def refuse(detail: str):
        raise HTTPException(status_code=status.HTTP_400_BAD_REQUEST, detail=detail)

    if request.max_tokens is not None and context_length is not None and request.max_tokens >= context_length:
        refuse(f"max_tokens {request.max_tokens} does not fit the model's context of {context_length} tokens "
               "(the prompt included)")
    for i, message in enumerate(request.messages):
        content = message.content
        if getattr(message, "tool_calls", None) or message.role == "system":
            continue
        parts = content if isinstance(content, list) else [content]
        if all(part is None or (isinstance(part, str) and not part.strip())
               or (getattr(part, "type", None) == "text" and not (part.text or "").strip()) for part in parts):
            refuse(f"messages[{i}] ({message.role}) has empty content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part.type != "image_url":
                continue
            where, url = f"messages[{i}].content[{j}].image_url", part.image_url.url
            if url.startswith("data:"):
                match = BASE64_IMAGE.match(url)
                if match is None:
                    refuse(f"{where}: a data URL must be data:image/(png|jpg|jpeg|gif|bmp);base64,<data>, "
                           f"got {url[:40]!r}")
                try:
                    data = base64.b64decode(match.group(2), validate=True)
                except (binascii.Error, ValueError) as error:
                    refuse(f"{where}: the image is not valid base64 ({error})")
                source = io.BytesIO(data)
            elif os.path.isfile(url):
                source = url
            else:
                continue  # a web URL: upstream's SSRF checks and fetch apply
            try:
                with Image.open(source) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as error:
                refuse(f"{where}: not an image PIL can read ({error})")


def apply_api_app_patch(app_module) -> None:
    check_upstream(app_module, CHECKED_AGAINST, __name__)
    from llamafactory.api import chat

    check_upstream(chat, CHAT_CHECKED_AGAINST, __name__)
    import uvicorn
    from fastapi.responses import JSONResponse

    from vpt_plugin.generation import STOP_REQUESTED

    upstream_create_app = app_module.create_app
    upstream_response = chat.create_chat_completion_response
    upstream_stream = chat.create_stream_chat_completion_response

    def context_length(chat_model) -> int | None:
        config = getattr(getattr(chat_model.engine, "model", None), "config", None)
        return getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None

    async def create_chat_completion_response(request, chat_model):
        check_chat_request(request, context_length(chat_model))
        return await upstream_response(request, chat_model)

    def create_stream_chat_completion_response(request, chat_model):
        check_chat_request(request, context_length(chat_model))  # before the stream's 200 goes out
        return upstream_stream(request, chat_model)

    def create_app(chat_model):
        app = upstream_create_app(chat_model)
        limit = int(os.getenv("MAX_CONCURRENT", "1"))  # the engine's own semaphore, which would queue without limit
        admitted = asyncio.Semaphore(limit)
        wait_s = float(os.getenv(QUEUE_TIMEOUT_VARIABLE, "60"))

        @app.middleware("http")
        async def admit(request, call_next):
            if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
                return await call_next(request)
            try:
                await asyncio.wait_for(admitted.acquire(), timeout=wait_s)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                return JSONResponse(status_code=503, headers={"Retry-After": str(max(1, round(wait_s)))}, content={
                    "detail": f"the model is busy ({limit} request(s) at a time) and this one waited {wait_s:g} s "
                              f"({QUEUE_TIMEOUT_VARIABLE}); retry later"})
            try:
                response = await call_next(request)
            except BaseException:
                admitted.release()
                raise
            body = response.body_iterator

            async def body_then_release():  # a streamed answer holds its place until its last chunk
                try:
                    async for chunk in body:
                        yield chunk
                finally:
                    admitted.release()

            response.body_iterator = body_then_release()
            return response

        return app

    class StoppingServer(uvicorn.Server):
        """uvicorn's server; a stop signal also ends generation in flight."""

        def handle_exit(self, sig, frame):
            STOP_REQUESTED.set()
            super().handle_exit(sig, frame)

    def run_api() -> None:  # upstream's, restated: uvicorn.run takes no Server class
        chat_model = app_module.ChatModel()
        app = create_app(chat_model)
        api_host = os.getenv("API_HOST", "0.0.0.0")
        api_port = int(os.getenv("API_PORT", "8000"))
        print(f"Visit http://localhost:{api_port}/docs for API document.")
        config = uvicorn.Config(app, host=api_host, port=api_port,
                                timeout_graceful_shutdown=float(os.getenv(SHUTDOWN_TIMEOUT_VARIABLE, "30")))
        StoppingServer(config).run()

    app_module.create_chat_completion_response = create_chat_completion_response
    app_module.create_stream_chat_completion_response = create_stream_chat_completion_response
    app_module.create_app = create_app
    app_module.run_api = run_api
