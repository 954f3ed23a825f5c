"""``skillhub serve``: the real ``openai`` client against the server started on 127.0.0.1, answers
equal to ``skillhub generate``, the live registry, a bounded load test and hostile requests."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from skillhub.cli import main
from skillhub.registry.front import Registry
from skillhub.routing.generate import Generator
from skillhub.routing.training import train_router
from skillhub.serving import Limits, create_app

from conftest import ROUTED_TASKS, app_server

PROMPTS = {"shift": ["shift abcde=", "shift klmno="], "reverse": ["rev hello=", "rev abcd="],
           "sort": ["sort zyxwv=", "sort dcba="]}


@contextmanager
def serving(registry: Path, **options) -> Iterator[str]:
    """The app on 127.0.0.1 and a free port, in a thread; yields its base URL (``.../v1``)."""
    limits = options.pop("limits", Limits(max_tokens=16))
    with app_server(create_app(Registry(registry), limits=limits, **options), timeout_graceful_shutdown=5) as (url, _):
        yield url + "/v1"


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def offline(registry: Path, prompts: list[str], **choice) -> list[str]:
    """What ``skillhub generate`` answers (its library call), greedily, 16 tokens at most."""
    with Generator(Registry(registry), max_new_tokens=16) as generator:
        return [g.output for g in generator.generate(prompts, **choice)]


@pytest.fixture(scope="module")
def server(routed) -> Iterator[str]:
    with serving(routed[0]) as url:
        yield url


def chat(api: openai.OpenAI, model: str, prompt: str, **extra):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=16, **extra)


def test_openai_client_models_chat_completions_and_stream_equal_generate(server, routed) -> None:
    api = client(server)
    models = {m.id for m in api.models.list().data}
    assert models == {*ROUTED_TASKS, "auto", "base"}
    for task in ROUTED_TASKS:
        expected = offline(routed[0], PROMPTS[task], task=task)
        answers = [chat(api, task, p) for p in PROMPTS[task]]
        assert [a.choices[0].message.content for a in answers] == expected
        assert all(a.choices[0].finish_reason == "stop" for a in answers)
        assert answers[0].usage.completion_tokens == len(expected[0])  # one token per character
        assert answers[0].model_extra["skillhub"]["packs"] == [routed[1][task]]
    assert chat(api, "shift", "shift abcde=").choices[0].message.content == "bcdef"  # the fine-tune is exact
    # auto: the router's choice, its probability in the body and the headers
    prompts = [PROMPTS[t][0] for t in ROUTED_TASKS]
    expected = offline(routed[0], prompts, route=True)
    for prompt, answer, task in zip(prompts, expected, ROUTED_TASKS):
        raw = api.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16)
        parsed = raw.parse()
        assert parsed.choices[0].message.content == answer
        assert parsed.model_extra["skillhub"]["task"] == task and raw.headers["x-skillhub-task"] == task
        assert raw.headers["x-skillhub-packs"] == routed[1][task]
        probability = parsed.model_extra["skillhub"]["probability"]
        assert float(raw.headers["x-skillhub-probability"]) == pytest.approx(probability, abs=1e-5)
        assert probability >= 0.5
    # base: no packs
    base = chat(api, "base", "shift abcde=")
    assert base.choices[0].message.content == offline(routed[0], ["shift abcde="], packs=[])[0]
    assert base.model_extra["skillhub"]["packs"] == []
    # a plain completion continues the raw prompt: the same tokens as `generate --format plain`
    text = api.completions.create(model="reverse", prompt="rev hello=", temperature=0, max_tokens=16)
    assert text.choices[0].text.strip() == offline(routed[0], ["rev hello="], task="reverse")[0]
    # streaming: the pieces join to the answer; usage in the last chunk when asked
    pieces, finish, used = [], None, None
    for piece in chat(api, "sort", "sort zyxwv=", stream=True, stream_options={"include_usage": True}):
        if piece.choices:
            pieces.append(piece.choices[0].delta.content or "")
            finish = piece.choices[0].finish_reason or finish
        used = piece.usage or used
    assert "".join(pieces) == offline(routed[0], ["sort zyxwv="], task="sort")[0] and finish == "stop"
    assert used.completion_tokens == len("".join(pieces))
    # max_tokens and stop strings
    short = api.chat.completions.create(model="shift", messages=[{"role": "user", "content": "shift abcde="}],
                                        temperature=0, max_tokens=2)
    assert short.choices[0].message.content == "bc" and short.choices[0].finish_reason == "length"
    stopped = chat(api, "shift", "shift abcde=", stop=["d"])
    assert stopped.choices[0].message.content == "bc" and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(p.choices[0].delta.content or "" for p in chat(api, "shift", "shift abcde=", stop=["de"],
                                                                          stream=True) if p.choices)
    assert streamed == "bc"


def test_extras_name_packs_and_merges(server, routed) -> None:
    api = client(server)
    ids = routed[1]
    named = chat(api, "base", "rev hello=", extra_body={"packs": [ids["reverse"]]})
    assert named.choices[0].message.content == offline(routed[0], ["rev hello="], packs=[ids["reverse"]])[0]
    assert named.model_extra["skillhub"]["packs"] == [ids["reverse"]]
    both = [ids["shift"], ids["reverse"]]
    merged = chat(api, "base", "shift abcde=", extra_body={"packs": both, "merge": {"method": "ties", "density": 0.5}})
    summed = chat(api, "base", "shift abcde=", extra_body={"packs": both})
    assert merged.model_extra["skillhub"]["packs"] == both == summed.model_extra["skillhub"]["packs"]
    with pytest.raises(openai.BadRequestError, match="merge"):
        chat(api, "base", "shift abcde=", extra_body={"packs": both, "merge": {"method": "ties", "density": 2}})
    with pytest.raises(openai.NotFoundError, match="ffffff"):
        chat(api, "base", "shift abcde=", extra_body={"packs": ["ffffff"]})
    with pytest.raises(openai.BadRequestError, match="auto"):
        chat(api, "auto", "shift abcde=", extra_body={"packs": both})


def test_live_registry_add_retrain_and_remove_without_restart(three_packs, finetuned, tmp_path: Path) -> None:
    location = tmp_path / "registry"
    registry = Registry(location)
    ids = {}
    for task in ("shift", "reverse"):
        ids[task] = registry.add(three_packs[task], task=task, base_location=str(finetuned.base)).id
        registry.add_task(task, routed_examples(task, tmp_path))
    train_router(registry)
    with serving(location) as url:
        api = client(url)
        assert {m.id for m in api.models.list().data} == {"shift", "reverse", "auto", "base"}
        with pytest.raises(openai.NotFoundError, match="sort"):
            chat(api, "sort", "sort zyxwv=")
        before = {p: chat(api, "shift", p).choices[0].message.content for p in PROMPTS["shift"]}
        # Added with the CLI while the server runs: served at once (add retrains the stale router).
        added = run("--registry", str(location), "add", str(three_packs["sort"]), "--task", "sort", "--json")
        assert added.exit_code == 0, added.output
        ids["sort"] = json.loads(added.stdout)["id"]
        answer = chat(api, "sort", "sort zyxwv=")
        assert answer.choices[0].message.content == offline(location, ["sort zyxwv="], task="sort")[0]
        # The router is reloaded when retrained: with sort's examples it routes to sort.
        assert chat(api, "auto", "sort zyxwv=").model_extra["skillhub"]["task"] != "sort"  # no examples yet
        registry.add_task("sort", routed_examples("sort", tmp_path))
        assert run("--registry", str(location), "route", "train").exit_code == 0
        assert chat(api, "auto", "sort zyxwv=").model_extra["skillhub"]["task"] == "sort"
        # Removed: 404 from then on, the router never sends a prompt to it, other answers unchanged.
        assert run("--registry", str(location), "remove", ids["reverse"]).exit_code == 0
        with pytest.raises(openai.NotFoundError, match="reverse"):
            chat(api, "reverse", "rev hello=")
        with pytest.raises(openai.NotFoundError, match="not an active pack"):
            chat(api, "base", "rev hello=", extra_body={"packs": [ids["reverse"]]})
        assert {m.id for m in api.models.list().data} == {"shift", "sort", "auto", "base"}
        rerouted = [chat(api, "auto", p).model_extra["skillhub"] for p in PROMPTS["reverse"]]
        assert all(ids["reverse"] not in r["packs"] for r in rerouted)
        assert {p: chat(api, "shift", p).choices[0].message.content for p in PROMPTS["shift"]} == before
        # A changed activation set makes the router stale: auto is withdrawn until it is retrained.
        assert run("--registry", str(location), "task", "set", "sort", "--packs",
                   f"{ids['shift']},{ids['sort']}").exit_code == 0
        assert "auto" not in {m.id for m in api.models.list().data}
        with pytest.raises(openai.APIStatusError, match="stale") as stale:
            chat(api, "auto", "sort zyxwv=")
        assert stale.value.status_code == 503
        assert chat(api, "sort", "sort zyxwv=").model_extra["skillhub"]["packs"] == [ids["shift"], ids["sort"]]


def routed_examples(task: str, where: Path) -> Path:
    from skillhub.demo.synthetic import split_examples, write_jsonl

    _, test = split_examples(task, train=0, test=80, seed=5)
    return write_jsonl(test, where / f"{task}.jsonl")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_load_mixed_tasks_auto_and_base_every_answer_equals_offline(server, routed) -> None:
    from skillhub.demo.synthetic import split_examples

    prompts = {task: [e["prompt"] for e in split_examples(task, train=0, test=20, seed=11)[1]] for task in ROUTED_TASKS}
    work = []  # (model, prompt)
    for i in range(200):
        task = ROUTED_TASKS[i % 3]
        model = ("auto", "base", task, task)[i % 4]
        work.append((model, prompts[task][i % 20]))
    expected = {}
    with Generator(Registry(routed[0]), max_new_tokens=16) as generator:
        for model in {m for m, _ in work}:
            asked = sorted({p for m, p in work if m == model})
            choice = {"route": True} if model == "auto" else {"packs": []} if model == "base" else {"task": model}
            expected.update({(model, g.prompt): g.output for g in generator.generate(asked, **choice)})

    def ask(item: tuple[str, str]) -> str:
        model, prompt = item
        return chat(client(server), model, prompt).choices[0].message.content

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, work))
    elapsed = time.monotonic() - started
    wrong = [(m, p, a, expected[(m, p)]) for (m, p), a in zip(work, answers) if a != expected[(m, p)]]
    assert not wrong, wrong[:5]
    metrics = http_get(server, "/metrics")[1]
    batches = _metric(metrics, "skillhub_batch_size_count")
    assert batches < 200  # requests of one set were batched together
    print(f"200 requests, 16 concurrent: {elapsed:.1f} s, {batches:.0f} batches")


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} is not in /metrics")


def http_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read().decode()


def http_post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")


def test_hostile_requests_get_openai_errors_and_the_server_keeps_serving(server, routed) -> None:
    good = {"model": "shift", "messages": [{"role": "user", "content": "shift abcde="}], "temperature": 0}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({**good, "model": "nonesuch"}).encode(), 404, "no model 'nonesuch'"),
        (json.dumps({**good, "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({**good, "max_tokens": 10**9}).encode(), 400, "limit of 16"),
        (json.dumps({**good, "messages": [{"role": "user", "content": "a" * 100}]}).encode(), 400, "context of 64"),
        (json.dumps({**good, "messages": []}).encode(), 400, "messages"),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({**good, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({**good, "n": 2}).encode(), 400, "n is not supported"),
        (json.dumps({**good, "logprobs": True}).encode(), 400, "logprobs is not supported"),
        (json.dumps({**good, "stop": [""]}).encode(), 400, "stop"),
        (json.dumps({k: v for k, v in good.items() if k != "model"}).encode(), 400, "model"),
        (json.dumps({**good, "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}
                    ).encode(), 400, "single user message"),  # no chat template: one user message only
        (b"{" * 100_000 + b"}" * 100_000, 400, "not valid JSON"),
        (json.dumps({**good, "pad": "x" * (1 << 20)}).encode(), 413, "limit"),
    ]
    for body, status, fragment in cases:
        got, error = http_post(server, "/v1/chat/completions", body)
        assert got == status and fragment in error["error"]["message"], (body[:80], got, error)
        assert error["error"]["type"] and "code" in error["error"]
    assert http_get(server, "/v1/nowhere")[0] == 404
    # A client that goes away mid-stream, and one that never finishes sending its body.
    host, port = server.split("//")[1].split("/")[0].split(":")
    gone = http.client.HTTPConnection(host, int(port), timeout=30)
    gone.request("POST", "/v1/chat/completions", body=json.dumps({**good, "stream": True}),
                 headers={"Content-Type": "application/json"})
    gone.getresponse().fp.readline()
    gone.close()
    status, answer = http_post(server, "/v1/chat/completions", json.dumps(good).encode())
    assert status == 200 and answer["choices"][0]["message"]["content"] == "bcdef"
    assert http_get(server, "/health") == (200, json.dumps({"status": "ok", "waiting": 0}, separators=(",", ":")))


def test_concurrency_limit_api_key_and_exposure(routed) -> None:
    with serving(routed[0], api_key="s3cret", limits=Limits(max_tokens=16, max_concurrent=1)) as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        assert http_get(url, "/v1/models")[0] == 401
        assert http_get(url, "/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
        assert http_get(url, "/metrics")[0] == 401
        assert http_get(url, "/health")[0] == 200  # for load balancers: says nothing about the registry
        with pytest.raises(openai.AuthenticationError):
            chat(client(url, "wrong"), "shift", "shift abcde=")
        api = client(url, "s3cret")
        assert chat(api, "shift", "shift abcde=").choices[0].message.content == "bcdef"
        # One request holds the only slot (its body never finishes): the next gets 429.
        stuck = http.client.HTTPConnection(host, int(port), timeout=30)
        stuck.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Content-Type", "application/json"), ("Content-Length", "100"),
                            ("Authorization", "Bearer s3cret")):
            stuck.putheader(name, value)
        stuck.endheaders(b'{"model": ')
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError):
            chat(api, "shift", "shift abcde=")
        stuck.close()  # its slot is freed when the server sees it gone
        deadline = time.monotonic() + 10
        while True:
            try:
                assert chat(api, "shift", "shift abcde=").choices[0].message.content == "bcdef"
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot of a client that went away was never freed"
                time.sleep(0.1)
        metrics = http_get(url, "/metrics", {"Authorization": "Bearer s3cret"})[1]
        assert _metric(metrics, "skillhub_requests_total", endpoint="chat", model="unknown", status="429") >= 1
        assert _metric(metrics, "skillhub_requests_total", endpoint="chat", model="shift", status="200") >= 2
    refused = run("--registry", str(routed[0]), "serve", "--host", "0.0.0.0")
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: --host 0.0.0.0 exposes the server")


def test_sampling_is_reproducible_with_a_seed(server) -> None:
    api = client(server)

    def sample(seed: int) -> str:
        answer = api.chat.completions.create(model="base", messages=[{"role": "user", "content": "shift abcde="}],
                                             temperature=1.5, top_p=0.95, seed=seed, max_tokens=16)
        return answer.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(6)}) > 1  # an untrained base at temperature 1.5 varies with the seed


def test_shutdown_lets_a_stream_in_flight_finish(routed) -> None:
    app = create_app(Registry(routed[0]), limits=Limits(max_tokens=16))
    with app_server(app, timeout_graceful_shutdown=30) as (url, server):
        stream = chat(client(url + "/v1"), "reverse", "rev hello=", stream=True)
        first = next(iter(stream))
        server.should_exit = True  # as SIGTERM does
        rest = [p.choices[0].delta.content or "" for p in stream if p.choices]
    assert first.choices[0].delta.role == "assistant"
    assert "".join(rest) == offline(routed[0], ["rev hello="], task="reverse")[0]
