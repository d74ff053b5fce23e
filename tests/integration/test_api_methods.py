"""Datasets say what kind of rows they hold, and jobs are checked against it at submit: each
method meets the kind it trains on, or a 422 that says what to do."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from redis.asyncio import Redis

from service.contract import JobSpec
from service.store import job_key
from tests.fixtures.api import ALICE, Api

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


async def upload(api: Api, rows: list[dict[str, Any]], **params: str) -> Any:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return await api.client.post(
        "/v1/datasets",
        content=body,
        params={"name": "d", **params},
        headers={**ALICE, "Content-Type": "application/x-ndjson"},
    )


async def created(api: Api, rows: list[dict[str, Any]], **params: str) -> dict[str, Any]:
    resp = await upload(api, rows, **params)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def submit(api: Api, dataset_id: str, **extra: Any) -> Any:
    body = {"base_model": MODEL, "dataset_id": dataset_id, **extra}
    return await api.client.post("/v1/jobs", json=body, headers=ALICE)


async def test_kinds_are_detected_from_the_rows_and_stored(api: Api) -> None:
    pairs = await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    sft = await created(
        api, [{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": "b"}]
    )
    openai_chat = await created(api, [{"messages": CHAT}])
    unpaired = await created(
        api,
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": False},
        ],
    )
    assert [d["kind"] for d in (pairs, sft, openai_chat, unpaired)] == [
        "preference",
        "sft",
        "sft",
        "unpaired",
    ]
    assert sft["stats"]["completion_chars"]["max"] == 1.0
    assert unpaired["stats"]["desirable_rows"] == 1
    # OpenAI's chat fine-tuning rows: the last assistant turn is the completion
    rows = (await api.client.get(f"/v1/datasets/{openai_chat['id']}/rows", headers=ALICE)).json()
    assert rows["rows"] == [
        {"prompt": CHAT[:2], "completion": [CHAT[2]]},
    ]
    got = (await api.client.get(f"/v1/datasets/{unpaired['id']}", headers=ALICE)).json()
    assert got["kind"] == "unpaired"


async def test_mapping_options_read_other_columns(api: Api) -> None:
    rows = [
        {"question": "q1", "answer": "a1", "thumbs_up": 1},
        {"question": "q2", "answer": "a2", "thumbs_up": 0},
    ]
    ds = await created(
        api, rows, prompt_field="question", completion_field="answer", label_field="thumbs_up"
    )
    assert ds["kind"] == "unpaired" and ds["rows"] == 2
    chats = await created(api, [{"conversation": CHAT}], messages_field="conversation")
    assert chats["kind"] == "sft"
    # a preference file read as sft: train on the chosen answers
    pairs = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    mapped = await created(api, pairs, completion_field="chosen")
    assert mapped["kind"] == "sft"
    assert [w["kind"] for w in mapped["warnings"]] == ["ignored_column"]


async def test_bad_unpaired_rows_are_refused_with_line_and_field(api: Api) -> None:
    resp = await upload(
        api,
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": "maybe"},
            {"prompt": "q", "completion": "", "label": False},
        ],
    )
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert [(e["line"], e["field"]) for e in errors] == [(2, "label"), (3, "completion")]


async def test_each_method_meets_its_dataset_kind_at_submit(api: Api) -> None:
    pairs = (await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}]))["id"]
    sft = (await created(api, [{"prompt": "q", "completion": "a"}]))["id"]
    unpaired = (
        await created(
            api,
            [
                {"prompt": "q", "completion": "a", "label": True},
                {"prompt": "r", "completion": "b", "label": False},
            ],
        )
    )["id"]
    accepted = [
        ("dpo", pairs),
        ("orpo", pairs),
        ("simpo", pairs),
        ("kto", pairs),
        ("kto", unpaired),
        ("sft", sft),
    ]
    for method, ds in accepted:
        resp = await submit(api, ds, method=method)
        assert resp.status_code == 201, (method, resp.text)
        assert resp.json()["spec"]["method"] == method

    refused = [
        ("sft", pairs, "completion_field=chosen"),
        ("dpo", unpaired, "use method 'kto'"),
        ("simpo", sft, "use method 'sft'"),
        ("kto", sft, "use method 'sft'"),
    ]
    for method, ds, hint in refused:
        resp = await submit(api, ds, method=method)
        assert resp.status_code == 422, (method, resp.text)
        problem = resp.json()
        assert hint in problem["detail"], problem
        assert problem["errors"][0]["loc"] == ["body", "dataset_id"]


async def test_a_dataset_says_its_rows_call_functions_and_every_method_takes_it(api: Api) -> None:
    """The record says so, and so does a job's reference to it."""
    weather = [{"type": "function", "function": {"name": "weather"}}]
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}
    ask = {"role": "user", "content": "Weather in Lima?"}
    calling = [
        {
            "input": {"messages": [ask], "tools": weather},
            "preferred_output": [{"role": "assistant", "tool_calls": [call]}],
            "non_preferred_output": [{"role": "assistant", "content": "Sunny."}],
        }
    ]
    functions = await created(api, calling)
    chats = await created(api, [{"messages": [ask, {"role": "assistant", "tool_calls": [call]}]}])
    said = [{"role": "assistant", "content": "Sunny."}]
    plain = await created(
        api, [{"prompt": [ask], "chosen": said, "rejected": [{**said[0], "content": "Rain."}]}]
    )
    assert [d["functions"] for d in (functions, chats, plain)] == [True, True, False]
    accepted = [(m, functions) for m in ("dpo", "kto", "orpo", "simpo")] + [("sft", chats)]
    for method, ds in accepted:
        resp = await submit(api, ds["id"], method=method)
        assert resp.status_code == 201, (method, resp.text)
        assert resp.json()["dataset"]["functions"] is True
    resp = await submit(api, plain["id"], method="orpo", eval_dataset_id=functions["id"])
    assert resp.status_code == 201
    assert (resp.json()["dataset"]["functions"], resp.json()["eval_dataset"]["functions"]) == (
        False,
        True,
    )


async def test_hyperparameters_of_another_method_are_refused_by_name(api: Api) -> None:
    sft = (await created(api, [{"prompt": "q", "completion": "a"}]))["id"]
    pairs = (await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}]))["id"]
    cases = [
        (sft, "sft", {"beta": 0.3}, "hyperparameters.beta"),
        (sft, "sft", {"loss_type": "ipo"}, "hyperparameters.loss_type"),
        (pairs, "dpo", {"desirable_weight": 2.0}, "hyperparameters.desirable_weight"),
        (pairs, "orpo", {"simpo_gamma": 1.0}, "hyperparameters.simpo_gamma"),
        (pairs, "simpo", {"completion_only_loss": False}, "hyperparameters.completion_only_loss"),
        (sft, "sft", {"precompute_ref_log_probs": True}, "hyperparameters.precompute_ref_log_p"),
        (pairs, "dpo", {"packing": True}, "hyperparameters.packing"),
        (pairs, "orpo", {"use_liger_kernel": True}, "hyperparameters.use_liger_kernel"),
    ]
    for ds, method, hp, field in cases:
        resp = await submit(api, ds, method=method, hyperparameters=hp)
        assert resp.status_code == 422, resp.text
        assert field in resp.json()["detail"], resp.json()
    resp = await submit(
        api, pairs, method="simpo", hyperparameters={"beta": 2.0, "simpo_gamma": 1.0}
    )
    assert resp.status_code == 201, resp.text


async def test_a_left_out_learning_rate_is_the_methods_and_the_record_shows_it(api: Api) -> None:
    """LoRA SFT trains at 2e-4 (the QLoRA recipes' rate), the preference methods at 5e-6; at
    5e-6 an SFT adapter barely moved."""
    sft = (await created(api, [{"prompt": "q", "completion": "a"}]))["id"]
    pairs = (await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}]))["id"]
    for ds, method, rate in ((sft, "sft", 2e-4), (pairs, "dpo", 5e-6), (pairs, "orpo", 5e-6)):
        resp = await submit(api, ds, method=method)
        assert resp.status_code == 201, resp.text
        assert resp.json()["spec"]["hyperparameters"]["learning_rate"] == rate
    resp = await submit(api, sft, method="sft", hyperparameters={"learning_rate": 5e-6})
    assert resp.json()["spec"]["hyperparameters"]["learning_rate"] == 5e-6


async def test_a_left_out_beta_is_the_methods_simpo_at_its_papers_scale(api: Api) -> None:
    """SimPO's paper uses beta 2-2.5; at the others' 0.1 its loss moved about 25 times less."""
    pairs = (await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}]))["id"]
    for method, value in (("simpo", 2.0), ("dpo", 0.1), ("orpo", 0.1)):
        resp = await submit(api, pairs, method=method)
        assert resp.status_code == 201, resp.text
        assert resp.json()["spec"]["hyperparameters"]["beta"] == value
    resp = await submit(api, pairs, method="simpo", hyperparameters={"beta": 0.1})
    assert resp.json()["spec"]["hyperparameters"]["beta"] == 0.1  # asked for: kept


async def test_batch_rules_trl_would_refuse_after_loading_the_model(api: Api) -> None:
    """kto's KL term needs 2 rows a batch: its default becomes 2 x 4 (the same 8 rows a
    step); what TRL would refuse or quietly turn into another loss is a 422 at submit."""
    pairs = (await created(api, [{"prompt": "q", "chosen": "a", "rejected": "b"}]))["id"]
    resp = await submit(api, pairs, method="kto")
    assert resp.status_code == 201, resp.text
    hp = resp.json()["spec"]["hyperparameters"]
    assert (hp["batch_size"], hp["gradient_accumulation_steps"]) == (2, 4)
    cases = [
        ("kto", {"gradient_accumulation_steps": 3}, {}, "needs hyperparameters.batch_size 2"),
        ("dpo", {"loss_type": "aot"}, {}, "with batch_size 1 it is plain sigmoid DPO"),
        ("dpo", {}, {"target_modules": ["q_proj", "lm_head"]}, "remove 'lm_head'"),
        ("kto", {"batch_size": 2}, {"target_modules": ["lm_head"]}, "remove 'lm_head'"),
    ]
    for method, hyperparameters, lora, hint in cases:
        resp = await submit(api, pairs, method=method, hyperparameters=hyperparameters, lora=lora)
        assert resp.status_code == 422, (method, resp.text)
        assert hint in resp.json()["detail"], resp.json()
    resp = await submit(
        api, pairs, method="dpo", hyperparameters={"loss_type": "aot", "batch_size": 2}
    )
    assert resp.status_code == 201, resp.text
    # A job stored before these rules still reads: they are checked at submit, not on load.
    spec = msgspec.convert(
        {"base_model": MODEL, "dataset_id": pairs, "hyperparameters": {"loss_type": "aot"}},
        JobSpec,
    )
    job = (await submit(api, pairs)).json()
    async with Redis.from_url(api.settings.redis_url) as redis:
        raw = await redis.get(job_key(job["id"]))
        record = msgspec.json.decode(raw)
        record["spec"] = msgspec.to_builtins(spec)
        await redis.set(job_key(job["id"]), msgspec.json.encode(record))
    got = await api.client.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert got.status_code == 200, got.text
    assert got.json()["spec"]["hyperparameters"]["loss_type"] == "aot"


async def test_a_policy_cannot_train_sft_on_feedback(api: Api) -> None:
    body = {
        "stream": "support",
        "template": {"base_model": MODEL, "method": "sft"},
        "trigger": {"min_new_pairs": 10},
    }
    resp = await api.client.put("/v1/policies/nightly", json=body, headers=ALICE)
    assert resp.status_code == 422, resp.text
    assert "kto (every rating)" in resp.json()["detail"]
    body["template"] = {"base_model": MODEL, "method": "kto"}
    resp = await api.client.put("/v1/policies/nightly", json=body, headers=ALICE)
    assert resp.status_code == 200, resp.text
    body["template"] = {**body["template"], "hyperparameters": {"gradient_accumulation_steps": 3}}
    resp = await api.client.put("/v1/policies/nightly", json=body, headers=ALICE)
    assert resp.status_code == 422, resp.text  # as a job of it would be at submit
    assert resp.json()["errors"][0]["loc"] == ["body", "template", "hyperparameters", "batch_size"]
