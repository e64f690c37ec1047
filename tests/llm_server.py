"""A local OpenAI-compatible chat-completions server for tests (no network).

Each request is answered by the next scripted reply, or by ``default`` when
the script is empty; every request body is recorded with its arrival time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], dict[str, Any]]  # status, headers, JSON body


def answer(content: str, *, prompt_tokens: int = 11, completion_tokens: int = 7) -> Reply:
    return (
        200,
        {},
        _completion(
            {"role": "assistant", "content": content}, "stop", prompt_tokens, completion_tokens
        ),
    )


def tool_calls(*calls: tuple[str, dict[str, Any]]) -> Reply:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for i, (name, args) in enumerate(calls)
        ],
    }
    return 200, {}, _completion(message, "tool_calls", 13, 5)


def rate_limited(retry_after: float) -> Reply:
    return (
        429,
        {"retry-after": str(retry_after)},
        {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": None}},
    )


def _completion(
    message: dict[str, Any], finish: str, prompt: int, completion: int
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


@dataclass
class ModelServer:
    url: str
    script: deque[Reply] = field(default_factory=deque)
    requests: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    default: Callable[[dict[str, Any]], Reply] | None = None


@contextlib.contextmanager
def model_server() -> Iterator[ModelServer]:
    state = ModelServer(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state.requests.append((time.monotonic(), body))
                if state.script:
                    status, headers, reply = state.script.popleft()
                elif state.default is not None:
                    status, headers, reply = state.default(body)
                else:
                    status, headers, reply = 500, {}, {"error": {"message": "no script"}}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
