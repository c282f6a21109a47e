"""The worker's queue: one job at a time, a full queue answers 503 with Retry-After, answers keep each client's
order under concurrent load, and a client that leaves loses its request and nothing else."""

from __future__ import annotations

import threading
import time

import pytest
import requests

LONG = dict(prompt="a red circle", seed=1, steps=60, n_iter=4, width=32, height=32)
SHORT = dict(prompt="a blue square", steps=1, width=32, height=32)


@pytest.fixture(scope="module")
def small(tiny_sd):
    """A server of its own whose queue holds one request."""
    from sdcli.serve.app import running
    from sdcli.serve.config import ServeConfig

    log: list[str] = []
    with running(ServeConfig(models=[tiny_sd], port=0, max_queue=1, threads=1), log=log.append) as (url, server):
        yield url, server, log


def _until(predicate, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _progress(url):
    return requests.get(url + "/sdapi/v1/progress?skip_current_image=true", timeout=10).json()


def test_a_full_queue_answers_503_with_retry_after_and_a_leaving_client_loses_only_its_own(small):
    url, server, log = small
    answers: dict[str, requests.Response] = {}

    def post(name, body, **kwargs):
        try:
            answers[name] = requests.post(url + "/sdapi/v1/txt2img", json=body, **kwargs)
        except requests.exceptions.ReadTimeout:
            answers[name] = None

    finished = server.worker.finished
    running = threading.Thread(target=post, args=("long", LONG))
    running.start()
    _until(lambda: _progress(url)["state"]["sampling_step"] > 0)
    # A client that gives up while queued: its job is dropped, never run.
    post("gone", SHORT, timeout=0.3)
    assert answers["gone"] is None
    _until(lambda: any(" 499 " in line for line in log))
    queued = threading.Thread(target=post, args=("queued", SHORT | {"seed": 5}))
    queued.start()
    _until(lambda: _progress(url)["state"]["job_count"] == 2)  # one running, one waiting: the queue is full
    refused = requests.post(url + "/sdapi/v1/txt2img", json=SHORT, timeout=10)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["detail"].startswith("the server is busy: 1 requests are waiting already")
    requests.post(url + "/sdapi/v1/interrupt", timeout=10)
    running.join(30)
    queued.join(30)
    assert answers["long"].status_code == 200 and answers["queued"].status_code == 200
    assert answers["queued"].json()["info"].count('"all_seeds": [5]') == 1
    assert server.worker.finished - finished == 2  # the long one and the queued one; not the one whose client left


def test_concurrent_clients_are_all_answered_in_their_order(served):
    """A small load test: 4 clients × 3 requests at once against the session's server (queue of 16)."""
    import json

    clients, each = 4, 3
    got: dict[int, list[int]] = {c: [] for c in range(clients)}

    def client(c):
        with requests.Session() as session:
            session.auth = served.webui().session.auth
            for i in range(each):
                answer = session.post(served.url + "/sdapi/v1/txt2img", json=SHORT | {"seed": 100 * c + i}, timeout=60)
                assert answer.status_code == 200, answer.text
                got[c].append(json.loads(answer.json()["info"])["seed"])

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < 60
    assert got == {c: [100 * c + i for i in range(each)] for c in range(clients)}
