"""The paper's LLM judge, through any OpenAI-compatible chat completions endpoint.

The published evaluation of "Introducing Visual Perception Token into MLLM" asks GPT-4o to
score each answer against the standard answer with JUDGE_PROMPT (temperature 0, 64 tokens)
and reads "score: <score>" from the reply. We send the same request, so scores compare with
the paper's, to whatever endpoint the settings name (OpenAI, vLLM, llama.cpp, ...). Unlike
the published code, a request that fails or a reply without a score is reported as
unscored, with the reason, instead of being counted as a score of 0.
"""

import asyncio
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# The paper's prompt, verbatim (evaluation/evaluation.py of yu-rp/VisualPerceptionToken).
JUDGE_PROMPT = (
    "You are responsible for proofreading the answers, you need to give a score to the model's answer by "
    "referring to the standard answer, based on the given question. The full score is 1 point and the minimum "
    "score is 0 points. Please output the score in the form 'score: <score>'. The evaluation criteria require "
    "that the closer the model's answer is to the standard answer, the higher the score.\n"
)
ITEM_TEMPLATE = "\nQuestion: {question}\nStandard answer: {reference}\nModel's answer: {answer}\n"
ITEM_KEYS = ("question", "answer", "reference")

NO_SCORE = "no score in reply"
# Local servers need no key, but the client refuses to start without one.
PLACEHOLDER_API_KEY = "EMPTY"
# Waits between attempts double from this, up to the maximum.
RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
# "score: 0.8", "Score: 1", "**Score:** 0.5"; the last one counts when a reply restates the format.
SCORE_PATTERN = re.compile(r"score\s*:\s*\**\s*([-+]?(?:\d+(?:\.\d+)?|\.\d+))", re.IGNORECASE)


@dataclass
class JudgeConfig:
    """Where the judge runs and how hard to try; temperature and max_tokens are the paper's."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 2
    temperature: float = 0.0
    max_tokens: int = 64

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")

    @classmethod
    def from_settings(cls, settings: dict | None) -> "JudgeConfig":
        """A config from an evaluation settings section, the environment filling in what it lacks."""
        settings = {key: value for key, value in (settings or {}).items() if value is not None}
        base_url = settings.get("base_url") or os.environ.get("VPT_JUDGE_BASE_URL")
        model = settings.get("model") or os.environ.get("VPT_JUDGE_MODEL")
        api_key = settings.get("api_key") or os.environ.get("VPT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        for key, value, variable in (("base_url", base_url, "VPT_JUDGE_BASE_URL"), ("model", model, "VPT_JUDGE_MODEL")):
            if not value:
                raise ValueError(f"the LLM judge needs {key!r}: set it in the evaluation settings or in ${variable}")
        limits = {key: settings[key] for key in ("concurrency", "timeout_s", "max_retries") if key in settings}
        return cls(base_url=base_url, model=model, api_key=api_key, **limits)


@dataclass
class JudgeResult:
    """The judge's verdict on one answer; `error` says why `score` is None."""

    score: float | None
    reply: str | None
    error: str | None
    attempts: int


def judge_query(question: str, reference: str, answer: str) -> str:
    """The user message the paper sends for one answer."""
    return JUDGE_PROMPT + ITEM_TEMPLATE.format(question=question, reference=reference, answer=answer)


def parse_score(reply: str) -> float | None:
    """The score in a "score: <number>" reply, or None if there is none in [0, 1]."""
    matches = SCORE_PATTERN.findall(reply)
    if not matches:
        return None
    score = float(matches[-1])
    return score if 0.0 <= score <= 1.0 else None


def judge_answers(items: list[dict], config: JudgeConfig, progress: bool = True,
                  on_result: Callable[[int, JudgeResult], None] | None = None) -> list[JudgeResult]:
    """Score each {"question", "answer", "reference"} item with the judge; results in item order.

    ``on_result(position, result)`` is called as each result arrives (to write it at once)."""
    items = list(items)
    for index, item in enumerate(items):
        missing = [key for key in ITEM_KEYS if key not in item]
        if missing:
            raise ValueError(f"item {index} lacks {', '.join(missing)}")
    judging = _judge_all(items, config, progress, on_result)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(judging)
    # asyncio.run refuses to nest in a running loop (a notebook, an async caller): use a thread.
    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, judging).result()


def summarize(results: list[JudgeResult]) -> dict:
    """Counts of scored and unscored answers, the mean over scored ones, and unscored ones by error."""
    scores = [result.score for result in results if result.score is not None]
    errors = Counter(error_kind(result.error) for result in results if result.score is None)
    return {
        "scored": len(scores),
        "unscored": len(results) - len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "errors": dict(errors),
    }


def error_kind(error: str) -> str:
    """The kind of an error, without its details: "HTTP 500: ..." -> "HTTP 500"."""
    return error.split(":", 1)[0]


async def _judge_all(items: list[dict], config: JudgeConfig, progress: bool, on_result=None) -> list[JudgeResult]:
    semaphore = asyncio.Semaphore(config.concurrency)
    # Retries are ours (max_retries=0 here), so each result can say how many attempts it took.
    client = openai.AsyncOpenAI(
        base_url=config.base_url,
        api_key=config.api_key or PLACEHOLDER_API_KEY,
        timeout=config.timeout_s,
        max_retries=0,
    )
    async with client:
        with tqdm(total=len(items), desc="LLM judge", unit="answer", disable=not progress) as bar:

            async def judge_and_count(position: int, item: dict) -> JudgeResult:
                result = await _judge_one(client, semaphore, item, config)
                if on_result is not None:
                    on_result(position, result)
                bar.update()
                return result

            results = await asyncio.gather(*(judge_and_count(k, item) for k, item in enumerate(items)))
    summary = summarize(results)
    if summary["unscored"]:
        logger.warning("%d of %d answers unscored: %s", summary["unscored"], len(results), summary["errors"])
    return results


async def _judge_one(
    client: openai.AsyncOpenAI, semaphore: asyncio.Semaphore, item: dict, config: JudgeConfig
) -> JudgeResult:
    query = judge_query(item["question"], item["reference"], item["answer"])
    attempts = 0
    while True:
        attempts += 1
        try:
            # The semaphore is held for the request only, not while waiting to retry.
            async with semaphore:
                completion = await asyncio.wait_for(
                    client.chat.completions.create(
                        model=config.model,
                        messages=[{"role": "user", "content": query}],
                        temperature=config.temperature,
                        max_tokens=config.max_tokens,
                    ),
                    timeout=config.timeout_s,
                )
        except Exception as exc:  # noqa: BLE001  (a failed item is reported, never raised)
            if _is_transient(exc) and attempts <= config.max_retries:
                await asyncio.sleep(min(RETRY_DELAY_S * 2 ** (attempts - 1), MAX_RETRY_DELAY_S))
                continue
            return JudgeResult(score=None, reply=None, error=_describe(exc, config.api_key), attempts=attempts)
        try:
            reply = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return JudgeResult(score=None, reply=None, error="malformed reply", attempts=attempts)
        score = parse_score(reply or "")
        # A reply without a score is the judge's answer, not a failure: asking again would only
        # repeat it at temperature 0.
        return JudgeResult(score=score, reply=reply, error=None if score is not None else NO_SCORE, attempts=attempts)


def _is_transient(exc: Exception) -> bool:
    """Timeouts, lost connections, rate limits and server errors: worth another attempt."""
    if isinstance(exc, (asyncio.TimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)


def _describe(exc: Exception, api_key: str | None) -> str:
    """A short reason for a failed request, with the API key blanked out should a server echo it."""
    if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        description = f"connection error: {exc.__cause__ or exc}"
    elif isinstance(exc, openai.APIStatusError):
        # The client puts an OpenAI-style {"error": {"message": ...}} body's error in exc.body.
        detail = exc.body.get("message") if isinstance(exc.body, dict) else None
        description = f"HTTP {exc.status_code}: {detail or exc.message}"
    else:
        description = f"{type(exc).__name__}: {exc}"
    if api_key:
        description = description.replace(api_key, "***")
    return description[:300]
