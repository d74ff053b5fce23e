"""Every job spec in examples/ is accepted by the API as shipped (once its dataset_id names an
uploaded dataset of the kind its method trains on), and examples/README.md states the GPU
memory service/vram.py estimates for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from service import vram
from service.contract import JobSpec
from tests.fixtures.api import ALICE, Api

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROWS = {
    "preference": {"prompt": "q", "chosen": "good answer", "rejected": "bad answer"},
    "sft": {"prompt": "q", "completion": "an answer"},
}


async def test_every_example_is_accepted_and_its_gpu_line_is_vrams(api: Api) -> None:
    files = sorted(EXAMPLES.glob("*.json"))
    assert len(files) == 5
    readme = (EXAMPLES / "README.md").read_text()
    datasets = {}
    for kind, row in ROWS.items():
        resp = await api.client.post(
            "/v1/datasets",
            content=json.dumps(row).encode() + b"\n",
            params={"name": kind},
            headers={**ALICE, "Content-Type": "application/x-ndjson"},
        )
        assert resp.status_code == 201, resp.text
        datasets[kind] = resp.json()["id"]
    for path in files:
        spec = json.loads(path.read_text())
        spec["dataset_id"] = datasets["sft" if spec["method"] == "sft" else "preference"]
        resp = await api.client.post("/v1/jobs", json=spec, headers=ALICE)
        assert resp.status_code == 201, (path.name, resp.text)

        estimate = vram.estimate(msgspec.convert(spec, JobSpec))
        assert estimate is not None, path.name
        line = re.search(rf"^\| `{re.escape(path.name)}` \|.*$", readme, re.MULTILINE)
        assert line is not None, f"examples/README.md has no line for {path.name}"
        assert f"| {estimate.total_gb:.1f} GB |" in line.group(0), (line.group(0), estimate)
