"""The LLM judge against a real OpenAI-compatible HTTP server on loopback.

The server picks its behaviour from the first word of each question, so one run can mix
well-behaved, slow, failing and unhelpful replies:
  "score 0.3"  replies "score: 0.3"          "chat 1"  replies "I think it is fine"
  "wait 0.3"   replies "score: 0.3" after 0.2 s
  "hang 1"     never replies                 "fail 1"  answers HTTP 500
  "echo 1"     answers HTTP 502 quoting the Authorization header it got
"""

import asyncio
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vpt_plugin.evaluation.judge import (
    JUDGE_PROMPT,
    NO_SCORE,
    JudgeConfig,
    judge_answers,
    judge_query,
    parse_score,
    summarize,
)

API_KEY = "sk-test-0123456789-do-not-leak"
QUESTION_IN_PROMPT = re.compile(r"\nQuestion: (.*)\nStandard answer: ")


class LoopbackServer(ThreadingHTTPServer):
    # The default listen backlog of 5 drops part of a burst of concurrent connections, which
    # the client then retries a second later: enough to trip the short timeouts used here.
    request_queue_size = 64


class FakeJudgeServer:
    """POST /v1/chat/completions on 127.0.0.1, recording each request it gets."""

    def __init__(self):
        self.requests = []  # (question, Authorization header, request body)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.released = threading.Event()  # set at teardown, so hanging handlers return
        self.http = LoopbackServer(("127.0.0.1", 0), self.handler_class())
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def requests_for(self, question: str) -> int:
        return sum(1 for asked, _, _ in self.requests if asked == question)

    def handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                authorization = self.headers.get("Authorization")
                question = QUESTION_IN_PROMPT.search(body["messages"][0]["content"]).group(1)
                with server.lock:
                    server.requests.append((question, authorization, body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.respond(question, authorization)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, as the timeout tests intend
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, question, authorization):
                if not authorization:
                    return self.send_json(401, {"error": {"message": "no API key", "type": "invalid_request_error"}})
                behaviour, value = question.split(" ", 1)
                if behaviour == "score":
                    return self.send_json(200, chat_completion(f"score: {value}"))
                if behaviour == "wait":
                    time.sleep(0.2)
                    return self.send_json(200, chat_completion(f"score: {value}"))
                if behaviour == "chat":
                    return self.send_json(200, chat_completion("I think it is fine"))
                if behaviour == "hang":
                    server.released.wait(30)
                    return None
                if behaviour == "fail":
                    return self.send_json(500, {"error": {"message": "internal failure", "type": "server_error"}})
                if behaviour == "echo":
                    message = f"bad gateway for {authorization}"
                    return self.send_json(502, {"error": {"message": message, "type": "server_error"}})
                raise AssertionError(f"unknown behaviour in question {question!r}")

            def send_json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass  # keep test output clean

        return Handler


def chat_completion(content: str) -> dict:
    """A minimal valid OpenAI chat.completion body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "judge-test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@pytest.fixture
def judge_server():
    server = FakeJudgeServer()
    server.thread.start()
    yield server
    server.released.set()
    server.http.shutdown()
    server.http.server_close()


def make_config(server, **overrides) -> JudgeConfig:
    settings = {"base_url": server.url, "model": "judge-test", "api_key": API_KEY, "timeout_s": 1.0} | overrides
    return JudgeConfig(**settings)


def make_items(*questions: str) -> list[dict]:
    return [{"question": question, "answer": f"answer to {question}", "reference": "ref"} for question in questions]


def test_well_behaved_server_scores_every_item_in_order(judge_server):
    questions = [f"wait {value}" for value in ("0.1", "0.9", "0.4", "1", "0", "0.75")]
    results = judge_answers(make_items(*questions), make_config(judge_server, concurrency=3), progress=False)

    assert [result.score for result in results] == [0.1, 0.9, 0.4, 1.0, 0.0, 0.75]
    assert all(result.error is None and result.attempts == 1 for result in results)
    assert results[1].reply == "score: 0.9"
    assert summarize(results) == {"scored": 6, "unscored": 0, "mean_score": pytest.approx(3.15 / 6), "errors": {}}
    # Requests overlapped, but never more than `concurrency` at once.
    assert judge_server.max_in_flight == 3


def test_request_carries_the_papers_prompt_and_settings(judge_server):
    item = {"question": "score 0.5", "answer": "a cat", "reference": "a dog"}
    judge_answers([item], make_config(judge_server), progress=False)

    _, _, body = judge_server.requests[0]
    assert body["model"] == "judge-test"
    assert body["temperature"] == 0.0
    assert body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": judge_query("score 0.5", "a dog", "a cat")}]
    assert body["messages"][0]["content"] == (
        JUDGE_PROMPT + "\nQuestion: score 0.5\nStandard answer: a dog\nModel's answer: a cat\n"
    )


def test_timeouts_are_retried_then_reported(judge_server):
    items = make_items("hang 1", "hang 2", "hang 3")
    started = time.monotonic()
    results = judge_answers(items, make_config(judge_server, timeout_s=0.5, max_retries=1), progress=False)

    assert len(results) == len(items)
    assert all(result.score is None and result.error == "timeout" for result in results)
    assert all(result.attempts == 2 for result in results)
    assert all(judge_server.requests_for(item["question"]) == 2 for item in items)
    assert summarize(results)["errors"] == {"timeout": 3}
    # Concurrent: about two timeouts and one retry delay, not three times that.
    assert time.monotonic() - started < 3.0


def test_server_errors_are_retried_and_name_the_status(judge_server):
    results = judge_answers(make_items("fail 1", "fail 2"), make_config(judge_server, max_retries=2), progress=False)

    for result in results:
        assert result.score is None
        assert result.error == "HTTP 500: internal failure"
        assert result.attempts == 3
    assert judge_server.requests_for("fail 1") == 3
    assert judge_server.requests_for("fail 2") == 3
    assert summarize(results)["errors"] == {"HTTP 500": 2}


def test_reply_without_score_is_unscored_and_not_retried(judge_server):
    items = make_items("chat 1", "chat 2")
    results = judge_answers(items, make_config(judge_server, max_retries=2), progress=False)

    for item, result in zip(items, results):
        assert result.score is None
        assert result.error == NO_SCORE
        assert result.reply == "I think it is fine"
        assert result.attempts == 1
        assert judge_server.requests_for(item["question"]) == 1


def test_mixed_run_counts_and_averages_scored_items_only(judge_server):
    questions = ["score 0.2", "chat 1", "score 0.6", "fail 1", "hang 1", "score 1", "chat 2", "score 0.4"]
    results = judge_answers(make_items(*questions), make_config(judge_server, max_retries=0), progress=False)

    assert len(results) == len(questions)
    assert [result.score for result in results] == [0.2, None, 0.6, None, None, 1.0, None, 0.4]
    assert (results[1].error, results[4].error, results[6].error) == (NO_SCORE, "timeout", NO_SCORE)
    assert results[3].error.startswith("HTTP 500")
    summary = summarize(results)
    assert summary["scored"] == 4
    assert summary["unscored"] == 4
    assert summary["mean_score"] == pytest.approx((0.2 + 0.6 + 1.0 + 0.4) / 4)
    assert summary["errors"] == {NO_SCORE: 2, "HTTP 500": 1, "timeout": 1}


def test_api_key_is_sent_but_never_shown(judge_server, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    config = make_config(judge_server, max_retries=1)
    results = judge_answers(make_items("score 0.5", "echo 1", "chat 1", "fail 1"), config, progress=True)

    assert {authorization for _, authorization, _ in judge_server.requests} == {f"Bearer {API_KEY}"}
    # The server quoted the key back in its error; the stored error blanks it out.
    assert results[1].error.startswith("HTTP 502")
    assert "***" in results[1].error
    captured = capsys.readouterr()
    shown = [repr(config), str(config), repr(results), captured.out, captured.err, caplog.text]
    assert all(API_KEY not in text for text in shown)
    assert "LLM judge" in captured.err  # the progress bar did print
    assert "answers unscored" in caplog.text


def test_without_api_key_a_placeholder_is_sent(judge_server):
    results = judge_answers(make_items("score 0.5"), make_config(judge_server, api_key=None), progress=False)

    assert results[0].score == 0.5
    _, authorization, _ = judge_server.requests[0]
    assert authorization.startswith("Bearer ")


def test_works_when_called_inside_a_running_event_loop(judge_server):
    async def caller():
        return judge_answers(make_items("score 0.3"), make_config(judge_server), progress=False)

    assert asyncio.run(caller())[0].score == 0.3


def test_items_missing_keys_are_rejected_before_any_request(judge_server):
    with pytest.raises(ValueError, match="item 1 lacks reference"):
        judge_answers([*make_items("score 1"), {"question": "q", "answer": "a"}], make_config(judge_server))
    assert judge_server.requests == []


def test_config_from_settings_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("VPT_JUDGE_BASE_URL", "http://env:8000/v1")
    monkeypatch.setenv("VPT_JUDGE_MODEL", "env-model")
    monkeypatch.delenv("VPT_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")

    config = JudgeConfig.from_settings({"model": "yaml-model", "concurrency": 2, "timeout_s": 5, "api_key": None})

    assert (config.base_url, config.model, config.api_key) == ("http://env:8000/v1", "yaml-model", "sk-from-openai-env")
    assert (config.concurrency, config.timeout_s, config.max_retries) == (2, 5, 2)
    assert "sk-from-openai-env" not in repr(config)
    monkeypatch.setenv("VPT_JUDGE_API_KEY", "sk-from-vpt-env")
    assert JudgeConfig.from_settings({}).api_key == "sk-from-vpt-env"


def test_config_from_settings_names_what_is_missing(monkeypatch):
    for variable in ("VPT_JUDGE_BASE_URL", "VPT_JUDGE_MODEL", "VPT_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)

    with pytest.raises(ValueError, match="VPT_JUDGE_MODEL"):
        JudgeConfig.from_settings({"base_url": "http://localhost:8000/v1"})
    with pytest.raises(ValueError, match="VPT_JUDGE_BASE_URL"):
        JudgeConfig.from_settings({"model": "m"})
    assert JudgeConfig.from_settings({"base_url": "http://localhost:8000/v1", "model": "m"}).api_key is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("score: 1", 1.0),
        ("Score: 0.5", 0.5),
        ("SCORE:0.75.", 0.75),
        ("**Score:** 0.2", 0.2),
        ("The answer matches. score: 0", 0.0),
        ("Format is 'score: <score>'. score: 0.9", 0.9),
        ("score: 7", None),
        ("score: -0.5", None),
        ("0.3", None),
        ("I'd give it 1 out of 10", None),
        ("", None),
    ],
)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


def test_evaluation_writes_each_verdict_as_it_arrives_and_never_asks_twice(judge_server, tmp_path):
    """A run killed while judging loses only the calls in flight; a re-run asks nothing already
    answered; unscored answers are asked again only on request, leaving one line per answer."""
    from vpt_plugin.evaluation.runner import judge, judge_coverage_table, read_jsonl

    predictions = [{"index": k, **item} for k, item in enumerate(make_items("score 0.5", "score 1", "hang 1"))]
    out = tmp_path / "judge.jsonl"
    config = make_config(judge_server, timeout_s=30, max_retries=0)
    worker = threading.Thread(target=judge, args=(predictions, out, config))
    worker.start()
    deadline = time.monotonic() + 10
    while len(read_jsonl(out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Two verdicts are on disk while the third request still hangs: a kill now would lose only that one.
    assert sorted(read_jsonl(out)) == [0, 1] and judge_server.in_flight == 1
    judge_server.released.set()  # the hanging request ends without a reply
    worker.join(30)
    verdicts = read_jsonl(out)
    assert verdicts[2]["score"] is None and verdicts[2]["error"].startswith("connection error")

    asked = len(judge_server.requests)
    judge(predictions, out, config)
    assert len(judge_server.requests) == asked  # nothing asked again

    judged = judge(predictions, out, config, retry_unscored=True)
    assert judge_server.requests_for("hang 1") == 2 and len(judge_server.requests) == asked + 1
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2]
    assert [j["score"] for j in judged] == [0.5, 1.0, None]

    table = {"m": {"d": {"items": 3, "judge_mean": 0.75, "judge_scored": 2, "judge_unscored": 1,
                         "judge_errors": {"connection error": 1}}}}
    assert "| m | d | 75.0 | 2 of 3 | connection error: 1 |" in judge_coverage_table(table)
