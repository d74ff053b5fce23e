"""What the web console needs from the API: its files under its own CSP, who a key belongs to,
and an admin's tenant filter on the lists."""

from __future__ import annotations

import re

from service.api.console import CONTENT_SECURITY_POLICY, STATIC
from tests.fixtures.api import ADMIN, ALICE, BOB, Api
from tests.integration.test_api_jobs import dataset, spec

IMPORT = re.compile(r"""^\s*import .*? from ["'](\.[^"']+)["'];""", re.MULTILINE)


async def test_the_console_is_served_with_a_strict_csp_and_every_module_it_imports(
    api: Api,
) -> None:
    page = await api.client.get("/ui/")
    assert page.status_code == 200 and '<script type="module"' in page.text
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert (
        "script-src 'self'" in CONTENT_SECURITY_POLICY
        and "unsafe" not in page.headers["content-security-policy"]
    )
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text  # no inline script: the CSP would block it
    # Every relative import of every module resolves to a file the API serves (air-gapped:
    # nothing comes from a CDN).
    modules = [p for p in STATIC.rglob("*.js")]
    assert len(modules) >= 8
    for module in modules:
        for target in IMPORT.findall(module.read_text()):
            resolved = (module.parent / target).resolve()
            served = await api.client.get(f"/ui/{resolved.relative_to(STATIC)}")
            assert served.status_code == 200, f"{module.name} imports {target}"
            assert served.headers["content-type"].startswith("text/javascript")
    for vendored in (STATIC / "vendor").iterdir():
        assert (vendored / "LICENSE").is_file(), f"{vendored.name} ships without its licence"
    assert (await api.client.get("/ui/../pyproject.toml")).status_code == 404


async def test_me_says_which_tenant_a_key_is_for(api: Api) -> None:
    assert (await api.client.get("/v1/me", headers=ALICE)).json() == {
        "tenant": "alice",
        "admin": False,
    }
    assert (await api.client.get("/v1/me", headers=ADMIN)).json()["admin"] is True
    refused = await api.client.get("/v1/me", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and "nope" not in refused.text


async def test_an_admin_filters_jobs_and_datasets_by_tenant(api: Api) -> None:
    alice_ds, bob_ds = await dataset(api, ALICE), await dataset(api, BOB)
    for ds, who in ((alice_ds, ALICE), (bob_ds, BOB)):
        assert (await api.client.post("/v1/jobs", json=spec(ds), headers=who)).status_code == 201

    async def tenants(path: str, headers: dict[str, str], **query: str) -> set[str]:
        resp = await api.client.get(path, params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        return {item["tenant"] for item in resp.json()["items"]}

    for path in ("/v1/jobs", "/v1/datasets"):
        assert await tenants(path, ADMIN) == {"alice", "bob"}
        assert await tenants(path, ADMIN, tenant="bob") == {"bob"}
        assert await tenants(path, ALICE, tenant="alice") == {"alice"}
        refused = await api.client.get(path, params={"tenant": "bob"}, headers=ALICE)
        assert refused.status_code == 403, refused.text
