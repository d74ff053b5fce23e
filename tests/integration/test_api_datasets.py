"""Dataset upload over HTTP: good files are stored, every bad one gets a 4xx that says where."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.api import ADMIN, ALICE, BOB, Api
from tests.fixtures.api import stored_nothing as stored_nothing_in

NDJSON = {"Content-Type": "application/x-ndjson"}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


ROW = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think at length... 5?"}


def zipped(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("rows.jsonl", data)
    return buf.getvalue()


async def upload(api: Api, body: bytes, headers: dict[str, str] | None = None, **params: str):
    return await api.client.post(
        "/v1/datasets",
        content=body,
        params={"name": "t", **params},
        headers={**ALICE, **NDJSON, **(headers or {})},
    )


def stored_nothing(api: Api) -> bool:
    return stored_nothing_in(api.settings)


async def test_upload_standard_rows_is_stored_under_its_sha256(api: Api) -> None:
    body = jsonl(ROW, {**ROW, "prompt": "And 3+3?", "chosen": "6."})
    resp = await upload(api, body)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["rows"] == 2 and ds["format"] == "standard" and ds["tenant"] == "alice"
    blob = api.store_dir / "datasets" / f"{ds['sha256']}.jsonl"
    assert blob.exists() and blob.stat().st_size == ds["bytes"]
    got = await api.client.get(f"/v1/datasets/{ds['id']}", headers=ALICE)
    assert got.json() == ds


async def test_multipart_upload_and_column_mapping(api: Api) -> None:
    body = jsonl({"question": "Hi?", "support": "Hello.", "oppose": "Go away."})
    resp = await api.client.post(
        "/v1/datasets",
        params={
            "name": "mapped",
            "prompt_field": "question",
            "chosen_field": "support",
            "rejected_field": "oppose",
        },
        files={"file": ("data.jsonl", body, "application/x-ndjson")},
        headers=ALICE,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["source_format"] == "mapped"


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        (jsonl(ROW, ROW) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', 3, "UTF-8"),
        (jsonl(ROW) + b"{not json\n", 2, "JSON"),
        (jsonl(ROW, [1, 2]), 2, "object"),
        (jsonl({"prompt": "p", "chosen": "c"}), 1, "rejected"),
        (jsonl({"prompt": "p", "chosen": 3, "rejected": "r"}), 1, "chosen"),
        (jsonl({"prompt": "p", "chosen": "  ", "rejected": "r"}), 1, "chosen"),
        (jsonl({"prompt": "p", "chosen": "same", "rejected": "same"}), 1, "identical"),
        (
            jsonl(
                {
                    "prompt": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}],
                }
            ),
            1,
            "assistant",
        ),
        (
            jsonl(
                {
                    "prompt": [{"role": "wizard", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}],
                }
            ),
            1,
            "wizard",
        ),
        (jsonl({**ROW, "prompt": "x" * 70_000}), 1, "limit"),
    ],
    ids=[
        "not-utf8",
        "not-json",
        "array",
        "missing",
        "mistyped",
        "empty",
        "equal",
        "assistant-last",
        "unknown-role",
        "line-too-long",
    ],
)
async def test_bad_rows_answer_422_with_line_and_store_nothing(
    api: Api, body: bytes, line: int, needle: str
) -> None:
    resp = await upload(api, body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["status"] == 422 and problem["total_errors"] >= 1
    first = problem["errors"][0]
    assert first["line"] == line
    assert needle.lower() in (first["msg"] + str(first.get("field"))).lower(), first
    assert stored_nothing(api)


async def test_empty_file_is_422(api: Api) -> None:
    for body in (b"", b"\n\n  \n"):
        resp = await upload(api, body)
        assert resp.status_code == 422
        assert resp.json()["detail"] == "the dataset has no rows"  # not "1 invalid row"
    assert stored_nothing(api)
    # A file that breaks off says so, with the rows invalid before it.
    broken = b'[{"prompt": "p", "chosen": "c"}, {"prompt": "q", '
    resp = await upload(api, broken, {"Content-Type": "application/json"})
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert detail.startswith("the JSON array is malformed after row 1"), detail
    assert "; 1 row before it is invalid (first: row 1, rejected:" in detail


async def test_errors_are_capped_at_100_with_total(api: Api) -> None:
    resp = await upload(api, b"nope\n" * 150)
    problem = resp.json()
    assert resp.status_code == 422
    assert len(problem["errors"]) == 100 and problem["total_errors"] == 150
    assert [e["line"] for e in problem["errors"][:3]] == [1, 2, 3]


async def test_file_over_limit_is_413_and_wrong_type_is_415(api: Api) -> None:
    big = jsonl(*[{**ROW, "prompt": f"{i} " + "x" * 1000} for i in range(1200)])
    resp = await upload(api, big)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]
    resp = await upload(api, jsonl(ROW), headers={"Content-Type": "application/xml"})
    assert resp.status_code == 415 and "application/x-ndjson" in resp.json()["detail"]
    assert stored_nothing(api)


async def test_tenants_do_not_see_each_other(api: Api) -> None:
    ds = (await upload(api, jsonl(ROW))).json()
    assert (await api.client.get(f"/v1/datasets/{ds['id']}", headers=BOB)).status_code == 404
    assert (await api.client.get("/v1/datasets", headers=BOB)).json()["items"] == []
    assert (await api.client.get(f"/v1/datasets/{ds['id']}", headers=ADMIN)).status_code == 200
    assert (await api.client.delete(f"/v1/datasets/{ds['id']}", headers=BOB)).status_code == 404


async def test_auth_is_required(api: Api) -> None:
    resp = await api.client.get("/v1/datasets")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    resp = await api.client.get("/v1/datasets", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401 and "nope" not in resp.text


async def test_list_pages_newest_first_and_delete_frees_the_blob(api: Api) -> None:
    ids = []
    for i in range(5):
        resp = await upload(api, jsonl({**ROW, "prompt": f"q{i}"}))
        ids.append(resp.json()["id"])
    page1 = (await api.client.get("/v1/datasets", params={"limit": 3}, headers=ALICE)).json()
    page2 = (
        await api.client.get(
            "/v1/datasets", params={"limit": 3, "cursor": page1["next_cursor"]}, headers=ALICE
        )
    ).json()
    assert [d["id"] for d in page1["items"] + page2["items"]] == ids[::-1]
    assert page2["next_cursor"] is None
    first = page1["items"][0]
    assert (
        await api.client.delete(f"/v1/datasets/{first['id']}", headers=ALICE)
    ).status_code == 204
    assert not (Path(api.store_dir) / "datasets" / f"{first['sha256']}.jsonl").exists()
    assert (await api.client.get(f"/v1/datasets/{first['id']}", headers=ALICE)).status_code == 404


# --------------------------------------------------------------------------- formats as shipped

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


@pytest.mark.parametrize(
    ("fixture", "rejected"),
    [
        ("hh.jsonl", "rejected"),
        ("ultrafeedback.jsonl", "rejected"),
        ("trl_implicit.jsonl", "rejected"),
        ("axolotl_intel.jsonl", "rejected"),
        ("openai_dpo.jsonl", "non_preferred_output"),
        ("medicalgpt.jsonl", "response_rejected"),
        ("alpaca_preference.json", "rejected"),
    ],
)
async def test_completion_field_chosen_trains_sft_on_the_chosen_answers_of_any_layout(
    api: Api, fixture: str, rejected: str
) -> None:
    """What the README and a kind mismatch advise: the same prompts (system and history too)
    as the file read as preference pairs, the chosen answers as completions."""
    body = (FIXTURES / fixture).read_bytes()
    params = {"on_invalid": "skip", "max_invalid_fraction": "0.5"}  # HH has an empty answer
    pairs = await upload(api, body, **params)
    sft = await upload(api, body, completion_field="chosen", **params)
    assert (pairs.status_code, sft.status_code) == (201, 201), sft.text
    assert sft.json()["kind"] == "sft" and sft.json()["rows"] == pairs.json()["rows"]
    # The record says which layout it read and where the parts came from, as for the pairs.
    assert sft.json()["source_format"] == pairs.json()["source_format"]
    expected_mapping = {
        ("completion" if part == "chosen" else part): column
        for part, column in pairs.json()["mapping"].items()
        if part != "rejected"
    }
    assert sft.json()["mapping"] == expected_mapping
    assert f"column {rejected!r} ignored" in " ".join(w["msg"] for w in sft.json()["warnings"])

    async def rows(ds: dict[str, Any]) -> list[dict[str, Any]]:
        page = await api.client.get(f"/v1/datasets/{ds['id']}/rows", headers=ALICE)
        return list(page.json()["rows"])

    expected = [
        {"prompt": r["prompt"], "completion": r["chosen"]} for r in await rows(pairs.json())
    ]
    assert await rows(sft.json()) == expected


async def test_completion_field_chosen_still_reads_a_plain_chosen_column(api: Api) -> None:
    """An sft file whose answer column is named `chosen` (no rejected one), and a pair whose
    answers are equal (no preference, still an example), are read column by column."""
    body = jsonl(
        {"prompt": "Hi", "chosen": "Hello!"},
        {"prompt": "Bye", "chosen": "See you.", "rejected": "See you."},
    )
    resp = await upload(api, body, completion_field="chosen")
    assert resp.status_code == 201, resp.text
    assert (resp.json()["source_format"], resp.json()["mapping"]) == ("mapped", {})
    page = await api.client.get(f"/v1/datasets/{resp.json()['id']}/rows", headers=ALICE)
    assert [(r["prompt"], r["completion"]) for r in page.json()["rows"]] == [
        ("Hi", "Hello!"),
        ("Bye", "See you."),
    ]


async def test_gzip_hh_with_skip_lists_the_rows_left_out_and_previews_the_rest(api: Api) -> None:
    body = gzip.compress((FIXTURES / "hh.jsonl").read_bytes())
    strict = await upload(api, body, {"Content-Encoding": "gzip"})
    assert strict.status_code == 422
    assert strict.json()["detail"] == (
        "the dataset has 1 invalid row (first: line 2, rejected: the transcript's final "
        "Assistant answer is empty)"
    )

    resp = await upload(
        api,
        body,
        {"Content-Type": "application/gzip"},
        on_invalid="skip",
        max_invalid_fraction="0.5",
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["rows"], ds["source_format"], ds["container"], ds["compressed"]) == (
        2,
        "hh",
        "jsonl",
        True,
    )
    assert ds["skipped_rows"] == 1
    assert ds["skipped"] == [
        {"line": 2, "field": "rejected", "msg": "the transcript's final Assistant answer is empty"}
    ]
    page = await api.client.get(f"/v1/datasets/{ds['id']}/rows", params={"limit": 1}, headers=ALICE)
    assert page.status_code == 200, page.text
    assert page.json()["next_offset"] == 1
    [row] = page.json()["rows"]
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["chosen"][0]["content"].startswith("That usually means too much water")
    rest = await api.client.get(
        f"/v1/datasets/{ds['id']}/rows", params={"offset": 1, "limit": 100}, headers=ALICE
    )
    assert rest.json()["next_offset"] is None
    assert rest.json()["rows"][0]["rejected"] == [
        {"role": "assistant", "content": "It depends on the pot.\n\nPlease ask a chef."}
    ]


async def test_a_preview_past_the_end_answers_at_once(api: Api) -> None:
    """An offset past the last row is an empty page, known from the record: the stored rows
    are not read from their start to find that out (here they are gone, and still)."""
    resp = await upload(api, jsonl({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}))
    ds = resp.json()
    (api.store_dir / "datasets" / f"{ds['sha256']}.jsonl").unlink()
    for offset in (1, 10**15):
        page = await api.client.get(
            f"/v1/datasets/{ds['id']}/rows", params={"offset": offset}, headers=ALICE
        )
        assert page.status_code == 200, page.text
        assert page.json() == {
            "dataset_id": ds["id"],
            "offset": offset,
            "rows": [],
            "next_offset": None,
        }


async def test_too_many_invalid_rows_reject_even_when_skipping(api: Api) -> None:
    body = gzip.compress((FIXTURES / "hh.jsonl").read_bytes())
    resp = await upload(api, body, on_invalid="skip")
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith(
        "1 of 3 rows are invalid (33.33%), more than max_invalid_fraction 0.01"
    )
    assert stored_nothing(api)


async def test_a_gzip_bomb_is_413_not_an_out_of_memory(api: Api) -> None:
    bomb = gzip.compress(b" " * (8 * 1024 * 1024))  # 8 MiB of blanks in ~8 KiB
    assert len(bomb) < api.settings.max_dataset_bytes < 8 * 1024 * 1024
    resp = await upload(api, bomb, {"Content-Encoding": "gzip"})
    assert resp.status_code == 413 and "decompresses" in resp.json()["detail"]
    assert stored_nothing(api)


async def test_parquet_and_a_json_array_and_csv_upload(api: Api, tmp_path: Path) -> None:
    source = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").open()]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(source), parquet)
    resp = await upload(
        api, parquet.read_bytes(), {"Content-Type": "application/vnd.apache.parquet"}
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["source_format"]) == ("parquet", "ultrafeedback")
    assert {w["msg"] for w in resp.json()["warnings"]} >= {
        "column 'score_chosen' ignored in 2 rows"
    }

    resp = await upload(
        api, (FIXTURES / "sharegpt.json").read_bytes(), {"Content-Type": "application/json"}
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["rows"]) == ("json", 3)

    resp = await api.client.post(
        "/v1/datasets",
        params={"name": "sheet"},
        files={"file": ("prompts.csv", (FIXTURES / "prompts.csv").read_bytes(), "text/csv")},
        headers=ALICE,
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["container"], resp.json()["format"]) == ("csv", "conversational")


async def test_a_json_array_counts_invalid_rows_not_lines(api: Api) -> None:
    rows = [ROW, {**ROW, "chosen": ""}, {**ROW, "prompt": "again"}]
    resp = await upload(
        api, json.dumps(rows, indent=4).encode(), {"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    problem = resp.json()
    assert problem["total_errors"] == 1
    assert problem["errors"] == [{"line": 2, "field": "chosen", "msg": "the text is empty"}]
    # The second element, on lines 7-11 of the file: a row, not a line.
    assert problem["container"] == "json"
    assert problem["detail"].endswith("(first: row 2, chosen: the text is empty)")


async def test_a_csv_files_errors_name_rows_and_a_jsonl_files_lines(api: Api) -> None:
    # A quoted prompt over two lines, as spreadsheets write one: the bad row is the second
    # record, on the file's fourth line.
    sheet = b'prompt,chosen,rejected\n"Two\nlines",Yes.,No.\nHi,,Bye.\n'
    resp = await upload(api, sheet, {"Content-Type": "text/csv"})
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["container"] == "csv"
    assert problem["errors"] == [{"line": 2, "field": "chosen", "msg": "the text is empty"}]
    assert problem["detail"].endswith("(first: row 2, chosen: the text is empty)")

    resp = await upload(api, jsonl(ROW, {**ROW, "chosen": ""}))
    assert resp.status_code == 422, resp.text
    assert resp.json()["container"] == "jsonl"
    assert resp.json()["detail"].endswith("(first: line 2, chosen: the text is empty)")


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (jsonl(ROW, ROW).decode().encode("utf-16"), "UTF-16 text"),
        (zipped(jsonl(ROW)), "a zip archive"),
        (pickle.dumps([ROW]), "a Python pickle"),
        (
            "\n".join(['{"prompt": "你好嗎", "chosen": "很好", "rejected": "不好"}'] * 3).encode(
                "big5"
            ),
            "Big5",
        ),
        (  # GBK: Big5 decodes it too, so both are named (naming Big5 alone gave mojibake)
            "\n".join(
                ['{"prompt": "头疼怎么办", "chosen": "多休息", "rejected": "没事"}'] * 3
            ).encode("gbk"),
            "it reads as GBK/GB18030 (Simplified Chinese), Big5",
        ),
        (
            b'"prompt","chosen","rejected","source/url"\n"Hi","Hello","Go away","x"\n',
            "",  # a quoted header is CSV: read, not refused (checked below)
        ),
    ],
    ids=["utf-16", "zip", "pickle", "big5", "gbk", "quoted-csv"],
)
async def test_files_that_are_not_rows_get_one_415(api: Api, body: bytes, found: str) -> None:
    resp = await upload(api, body, {"Content-Type": "application/octet-stream"})
    if not found:
        assert resp.status_code == 201, resp.text
        assert resp.json()["container"] == "csv" and resp.json()["rows"] == 1
        return
    assert resp.status_code == 415, resp.text
    assert found in resp.json()["detail"] and "errors" not in resp.json()
    assert "text/csv" in resp.headers["accept-post"]
    assert stored_nothing(api)


async def test_system_and_history_fields_map_columns(api: Api) -> None:
    body = jsonl(
        {"persona": "Be terse.", "turns": [["Hi", "Hello."]], "q": "2+2?", "a": "4", "b": "5"}
    )
    resp = await upload(
        api,
        body,
        prompt_field="q",
        chosen_field="a",
        rejected_field="b",
        system_field="persona",
        history_field="turns",
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["mapping"] == {
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
        "system": "persona",
        "history": "turns",
    }
    rows = (await api.client.get(f"/v1/datasets/{resp.json()['id']}/rows", headers=ALICE)).json()
    assert rows["rows"][0]["prompt"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    same = await upload(api, body, prompt_field="q", system_field="q")
    assert same.status_code == 422 and "must all differ" in same.json()["detail"]


async def test_rows_of_another_tenant_are_404_and_limits_are_checked(api: Api) -> None:
    ds = (await upload(api, jsonl(ROW))).json()
    assert (await api.client.get(f"/v1/datasets/{ds['id']}/rows", headers=BOB)).status_code == 404
    resp = await api.client.get(
        f"/v1/datasets/{ds['id']}/rows", params={"limit": 101}, headers=ALICE
    )
    assert resp.status_code == 400
    past = await api.client.get(
        f"/v1/datasets/{ds['id']}/rows", params={"offset": 5}, headers=ALICE
    )
    assert past.json() == {"dataset_id": ds["id"], "offset": 5, "rows": [], "next_offset": None}


async def test_a_file_that_wraps_its_rows_in_one_object_says_where_they_are(api: Api) -> None:
    """Some exports write a whole dataset as {"data": [...]}: one "row" without the fields."""
    body = json.dumps({"data": [ROW, ROW]}).encode()
    resp = await upload(api, body, {"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert "a whole file of rows under 'data'" in resp.json()["detail"]
    assert "jq -c '.data[]' FILE > rows.jsonl" in resp.json()["detail"]
