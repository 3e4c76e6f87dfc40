"""Locust users for certkv's streaming Generate over gRPC (gevent-compatible).

Entries reported separately: "Generate/ttft" (time to first token), "Generate/itl" (every gap between two
consecutive messages), "Generate/total" (whole stream; response_length = tokens, so tokens/s is derived from it).
A RESOURCE_EXHAUSTED answer (admission limit) is reported as "Generate/rejected", a handled outcome, not a failure.

Environment: CERTKV_PROMPT_MIX=short|long|mixed, CERTKV_MAX_NEW (default 32), CERTKV_ARRIVALS=closed|poisson,
CERTKV_RATE (requests per second per user for Poisson arrivals), CERTKV_TIMEOUT (seconds, default 120).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, task  # noqa: E402  (after gevent initialisation)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.pb.certkv.v1 import inference_pb2 as pb  # noqa: E402
from server.pb.certkv.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

SHORT = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish.", "What is 12 times 7?"]
LONG = [("Summarise the following text in two sentences. " + " ".join(
    f"Paragraph {i}: the committee met on a rainy morning to discuss the budget, the schedule and the new building."
    for i in range(n))) for n in (8, 16, 24)]
MIX = os.environ.get("CERTKV_PROMPT_MIX", "mixed")
MAX_NEW = int(os.environ.get("CERTKV_MAX_NEW", "32"))
TIMEOUT = float(os.environ.get("CERTKV_TIMEOUT", "120"))


def prompt() -> str:
    pool = {"short": SHORT, "long": LONG}.get(MIX) or (LONG if random.random() < 0.25 else SHORT)
    return random.choice(pool)


def _wait_time():
    if os.environ.get("CERTKV_ARRIVALS", "closed") == "poisson":
        rate = float(os.environ.get("CERTKV_RATE", "0.5"))
        return lambda user: random.expovariate(rate)  # exponential gaps: Poisson arrivals per user
    return constant(0)


class GenerateUser(User):
    wait_time = _wait_time()

    def on_start(self):
        self.channel = grpc.insecure_channel(self.host.replace("grpc://", ""))
        self.stub = pb_grpc.InferenceStub(self.channel)

    def on_stop(self):
        self.channel.close()

    def fire(self, name: str, seconds: float, length: int = 0, exception=None):
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=seconds * 1000,
                                             response_length=length, exception=exception, context={})

    @task
    def generate(self):
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt())]),
                                     stopping=pb.StoppingCriteria(max_new_tokens=MAX_NEW, ignore_eos=True))
        start = last = time.perf_counter()
        tokens, first = 0, None
        try:
            for message in self.stub.Generate(request, timeout=TIMEOUT):
                now = time.perf_counter()
                if first is None:
                    first = now - start
                    self.fire("Generate/ttft", first)
                else:
                    self.fire("Generate/itl", now - last)
                last = now
                tokens += len(message.token_ids)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.fire("Generate/rejected", time.perf_counter() - start)
            else:
                self.fire("Generate/total", time.perf_counter() - start, tokens, exception=exc)
            return
        self.fire("Generate/total", time.perf_counter() - start, tokens)
