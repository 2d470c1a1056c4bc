"""The admin routes for routing and rollouts (serve/api/admin.py) against real servers on loopback
ports: every route, the token, ETag/If-Match with racing writers, each refusal with its status and
message (and nothing written), and a split that is in force as soon as its write answers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from model_registry import ModelConfig, Registry

pytestmark = pytest.mark.slow

TOKEN = "routing-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 4096
DIGIT = load_digits().images[0].astype(np.float32).flatten().tolist()
INFER_BODY = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": DIGIT}]}
BASE = "/v2/repository/models/mlp-digits"

# (method, path, JSON body) of every route, with a body each would accept
EVERY_ROUTE = [
    ("GET", f"{BASE}/routing", None),
    ("PUT", f"{BASE}/aliases/canary", {"version": 1}),
    ("DELETE", f"{BASE}/aliases/canary", None),
    ("PUT", f"{BASE}/split", {"weights": {"stable": 100}}),
    ("PUT", f"{BASE}/sticky-key", {"header": "x-user"}),
    ("PUT", f"{BASE}/shadow", {"alias": "stable", "percent": 10}),
    ("DELETE", f"{BASE}/shadow", None),
    ("POST", f"{BASE}/rollout", {"canary": "canary"}),
    ("POST", f"{BASE}/rollout/abort", {}),
    ("POST", f"{BASE}/promote", {}),
    ("POST", f"{BASE}/rollback", {}),
]


# ---- helpers ------------------------------------------------------------------------------------

def admin_server(start_server, registry: Path, token: str | None = TOKEN):
    """A real server over `registry`, with the admin token (None: without) and a small body limit."""
    return start_server(registry, ["--admin-token", token] if token else [],
                        env={"ZOOSERVE_MAX_BODY_BYTES": str(BODY_LIMIT)})


def call(server, method: str, path: str, body=None, headers: dict | None = None, **kw) -> httpx.Response:
    """One admin request (token included unless `headers` says otherwise)."""
    extra = {"json": body} if body is not None else {}
    return httpx.request(method, f"{server.url}{path}", headers=ADMIN if headers is None else headers,
                         timeout=30, **extra, **kw)


def model_json(root: Path) -> str:
    return (root / "mlp-digits" / "model.json").read_text()


def stored(root: Path) -> ModelConfig:
    return Registry(root).model_config("mlp-digits")


def publish_copy(root: Path) -> int:
    """Version 1's folder published again: a second version with the same weights."""
    return Registry(root).publish("mlp-digits", root / "mlp-digits" / "1")


def publish_other_signature(root: Path, tmp_path: Path) -> int:
    """A version whose output tensor has another name than version 1's (a shadow of it is refused)."""
    folder = tmp_path / "renamed-output"
    shutil.copytree(root / "mlp-digits" / "1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {}
    manifest["signature"]["outputs"][0]["name"] = "scores"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Registry(root).publish("mlp-digits", folder)


def ok(response: httpx.Response) -> dict:
    """The body of a 200 admin answer, checked: its ETag is its revision."""
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"routing", "rollout", "revision"}
    assert response.headers["etag"] == f'"{answer["revision"]}"'
    return answer


def refused(response: httpx.Response, status: int, *words: str) -> str:
    """The error message of a refusal, checked for its status and the words it must contain."""
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    for word in words:
        assert word in message, (word, message)
    return message


def default_infer(server) -> httpx.Response:
    r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=INFER_BODY, timeout=30)
    assert r.status_code == 200, r.text
    return r


# ---- turned on, and who may call ---------------------------------------------------------------

def test_the_admin_api_is_off_without_a_token(registry_copy, start_server):
    before = model_json(registry_copy)
    with admin_server(start_server, registry_copy, token=None) as server:
        for method, path, body in EVERY_ROUTE:
            refused(call(server, method, path, body), 404, "admin API", "off", "--admin-token",
                    "ZOOSERVE_ADMIN_TOKEN")
    assert model_json(registry_copy) == before


def test_no_or_a_malformed_authorization_is_401_and_a_wrong_token_403(registry_copy, start_server):
    before = model_json(registry_copy)
    with admin_server(start_server, registry_copy) as server:
        for method, path, body in EVERY_ROUTE:
            for headers in ({}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
                            {"Authorization": "Bearer"}):
                r = call(server, method, path, body, headers=headers)
                refused(r, 401, "Authorization: Bearer")
                assert r.headers["www-authenticate"] == "Bearer"
            refused(call(server, method, path, body, headers={"Authorization": f"Bearer {TOKEN}-not"}),
                    403, "wrong admin token")
            refused(call(server, method, path, body, headers={"Authorization": "Bearer x"}), 403)
        assert model_json(registry_copy) == before
        ok(call(server, "GET", f"{BASE}/routing", headers={"Authorization": f"bearer {TOKEN}"}))
        # the existing load route keeps its own rules
        assert httpx.post(f"{server.url}{BASE}/load", headers=ADMIN).status_code == 200


# ---- every route --------------------------------------------------------------------------------

def test_every_route_writes_the_registry_and_answers_the_new_revision(registry_copy, start_server):
    v2 = publish_copy(registry_copy)
    with admin_server(start_server, registry_copy) as server:
        first = ok(call(server, "GET", f"{BASE}/routing"))
        assert first["routing"]["aliases"] == {"stable": 1} and first["rollout"] is None
        revision = first["revision"]
        assert revision == stored(registry_copy).revision

        def write(method: str, path: str, body=None) -> dict:
            nonlocal revision
            answer = ok(call(server, method, f"{BASE}/{path}", body))
            revision += 1
            assert answer["revision"] == revision == stored(registry_copy).revision
            assert answer["routing"] == stored(registry_copy).routing.model_dump(mode="json")
            return answer

        assert write("PUT", "aliases/canary", {"version": v2})["routing"]["aliases"] == {"stable": 1, "canary": v2}
        assert write("PUT", "aliases/spare", {"version": 1})["routing"]["aliases"]["spare"] == 1
        assert "spare" not in write("DELETE", "aliases/spare")["routing"]["aliases"]

        routing = write("PUT", "split", {"weights": {"stable": 90, "canary": 10}, "sticky_key": "x-user"})["routing"]
        assert (routing["split"], routing["sticky_key"]) == ({"stable": 90, "canary": 10}, "x-user")
        routing = write("PUT", "split", {"weights": {"stable": 80, "canary": 20}})["routing"]
        assert (routing["split"], routing["sticky_key"]) == ({"stable": 80, "canary": 20}, "x-user")   # kept
        assert write("PUT", "split", {"weights": {"stable": 100}, "sticky_key": None})["routing"]["sticky_key"] is None
        assert write("PUT", "sticky-key", {"header": "X-Team"})["routing"]["sticky_key"] == "x-team"
        assert write("PUT", "sticky-key", {"header": None})["routing"]["sticky_key"] is None

        shadow = write("PUT", "shadow", {"alias": "canary", "percent": 10})["routing"]["shadow"]
        assert shadow == {"alias": "canary", "percent": 10.0}
        assert write("DELETE", "shadow")["routing"]["shadow"] is None

        started = write("POST", "rollout", {"canary": "canary", "steps": [10, 50, 100], "interval_s": 60,
                                            "reason": "try version 2"})
        status = started["rollout"]["status"]
        assert (status["state"], status["weight"], status["stable_version"], status["canary_version"]) == \
            ("running", 10, 1, v2)
        assert status["history"][0]["reason"] == "try version 2"
        assert started["routing"]["split"] == {"stable": 90, "canary": 10}
        assert started["rollout"]["steps"] == [10, 50, 100] and started["rollout"]["interval_s"] == 60

        aborted = write("POST", "rollout/abort", {"reason": "wrong build"})
        assert aborted["rollout"]["status"]["state"] == "aborted"
        assert aborted["rollout"]["status"]["reason"] == "wrong build"
        assert aborted["routing"]["split"] == {"stable": 100}

        assert write("POST", "rollout", {"canary": "canary"})["rollout"]["status"]["state"] == "running"
        promoted = write("POST", "promote")           # no body: the running rollout's canary
        assert promoted["rollout"]["status"]["state"] == "promoted"
        assert promoted["routing"]["aliases"]["stable"] == v2 and promoted["routing"]["split"] == {"stable": 100}
        assert promoted["rollout"]["status"]["reason"] == "promoted through the admin API"
        assert default_infer(server).headers["x-model-version"] == str(v2)      # in force already

        assert write("PUT", "aliases/stable", {"version": 1})["routing"]["aliases"]["stable"] == 1
        promoted = write("POST", "promote", {"canary": "canary", "reason": "by hand"})   # no rollout: manual
        assert promoted["routing"]["aliases"]["stable"] == v2
        assert promoted["rollout"]["status"]["state"] == "promoted"              # the last rollout's, unchanged
        rolled_back = write("POST", "rollback", {"reason": "by hand"})
        assert rolled_back["routing"]["split"] == {"stable": 100}
        # decisions taken by hand are counted as the controller's are
        from prometheus_client.parser import text_string_to_metric_families
        events = {s.labels["event"]: s.value for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                  for s in f.samples if s.name == "zooserve_rollout_events_total" and s.labels["model"] == "mlp-digits"}
        assert events == {"started": 2, "aborted": 1, "promoted": 2, "rolled_back": 1, "stepped": 0, "held": 0}


def test_a_split_set_through_the_route_is_in_force_when_the_write_answers(registry_copy, start_server):
    v2 = publish_copy(registry_copy)
    with admin_server(start_server, registry_copy) as server:
        ok(call(server, "PUT", f"{BASE}/aliases/canary", {"version": v2}))
        for weights, alias, version in (({"stable": 0, "canary": 100}, "canary", v2),
                                        ({"stable": 100, "canary": 0}, "stable", 1),
                                        ({"canary": 1}, "canary", v2)):
            ok(call(server, "PUT", f"{BASE}/split", {"weights": weights}))
            for _ in range(20):            # no wait: the write answered, so it is in force here
                r = default_infer(server)
                assert (r.headers["x-model-alias"], r.headers["x-model-version"]) == (alias, str(version))


# ---- revisions ----------------------------------------------------------------------------------

def test_if_match_makes_a_write_conditional_and_a_stale_one_writes_nothing(registry_copy, start_server):
    v2 = publish_copy(registry_copy)
    with admin_server(start_server, registry_copy) as server:
        read = call(server, "GET", f"{BASE}/routing")
        etag, revision = read.headers["etag"], ok(read)["revision"]

        written = call(server, "PUT", f"{BASE}/aliases/canary", {"version": v2}, headers={**ADMIN, "If-Match": etag})
        assert ok(written)["revision"] == revision + 1

        before = model_json(registry_copy)
        stale = call(server, "PUT", f"{BASE}/aliases/canary", {"version": 1}, headers={**ADMIN, "If-Match": etag})
        refused(stale, 409, f"revision {revision + 1}", f"revision {revision}", "re-read")
        refused(call(server, "PUT", f"{BASE}/split", {"weights": {"stable": 1}},
                     headers={**ADMIN, "If-Match": f'"{revision + 7}"'}), 409, f"revision {revision + 7}")
        for bad in ("3", 'W/"3"', '"abc"', '"1", "2"', '""', f'"{revision + 1}'):
            refused(call(server, "PUT", f"{BASE}/split", {"weights": {"stable": 1}},
                         headers={**ADMIN, "If-Match": bad}), 400, "If-Match", "ETag")
        assert model_json(registry_copy) == before
        assert stored(registry_copy).routing.aliases["canary"] == v2

        # the ETag of the last write is good for the next one; '*' and no If-Match are unconditional
        chained = call(server, "PUT", f"{BASE}/split", {"weights": {"stable": 1}},
                       headers={**ADMIN, "If-Match": written.headers["etag"]})
        assert ok(chained)["revision"] == revision + 2
        assert ok(call(server, "DELETE", f"{BASE}/shadow", headers={**ADMIN, "If-Match": "*"}))["revision"] == \
            revision + 3
        assert ok(call(server, "DELETE", f"{BASE}/shadow"))["revision"] == revision + 4


def test_of_ten_admins_racing_on_one_revision_exactly_one_wins(registry_copy, start_server):
    with admin_server(start_server, registry_copy) as server:
        read = call(server, "GET", f"{BASE}/routing")
        etag, revision = read.headers["etag"], ok(read)["revision"]

        async def race() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                return await asyncio.gather(*(
                    client.put(f"{BASE}/aliases/racer-{i}", json={"version": 1}, headers={**ADMIN, "If-Match": etag})
                    for i in range(10)))

        answers = asyncio.run(race())
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] + [409] * 9, [r.text for r in answers]
        (winner,) = [r for r in answers if r.status_code == 200]
        for loser in answers:
            if loser.status_code == 409:
                refused(loser, 409, f"revision {revision + 1}", f"revision {revision}")
        cfg = ModelConfig.model_validate_json(model_json(registry_copy))     # whole, and the winner's
        assert cfg.revision == revision + 1 == ok(winner)["revision"]
        assert cfg.routing.aliases == ok(winner)["routing"]["aliases"]
        assert len([a for a in cfg.routing.aliases if a.startswith("racer-")]) == 1


# ---- refusals -----------------------------------------------------------------------------------

def test_each_bad_input_is_refused_with_its_status_and_message_and_nothing_is_written(registry_copy, start_server,
                                                                                        tmp_path):
    v2 = publish_copy(registry_copy)
    reg = Registry(registry_copy)
    reg.set_alias("mlp-digits", "canary", v2)
    reg.set_alias("mlp-digits", "same", 1)                     # the stable version under another name
    reg.set_alias("mlp-digits", "renamed", publish_other_signature(registry_copy, tmp_path))
    cases = [
        # the body: JSON, an object, the fields and their types
        ("PUT", "aliases/canary", b"{not json", 400, ["malformed JSON", '{"version": 3}']),
        ("PUT", "aliases/canary", [1], 400, ["JSON object", "list"]),
        ("PUT", "aliases/canary", b"", 400, ["needs a JSON body"]),
        ("PUT", "aliases/canary", {}, 400, ["field 'version'", "required"]),
        ("PUT", "aliases/canary", {"version": "2"}, 400, ["field 'version'", "integer"]),
        ("PUT", "aliases/canary", {"version": 2.0}, 400, ["field 'version'"]),
        ("PUT", "aliases/canary", {"version": 2, "note": "x"}, 400, ["field 'note'", "not permitted"]),
        ("PUT", "split", {"weights": {"stable": True}}, 400, ["field 'weights.stable'"]),
        ("PUT", "split", {"weights": [90, 10]}, 400, ["field 'weights'"]),
        ("PUT", "sticky-key", {}, 400, ["field 'header'", "required"]),
        ("PUT", "sticky-key", {"header": 5}, 400, ["field 'header'"]),
        ("PUT", "shadow", {"alias": "canary", "percent": "10"}, 400, ["field 'percent'"]),
        ("POST", "rollout", {"canary": "canary", "interval_s": "30"}, 400, ["field 'interval_s'"]),
        ("POST", "rollout", {"steps": [5]}, 400, ["field 'canary'", "required"]),
        ("POST", "rollout", {"canary": "canary", "status": {"state": "promoted"}}, 400, ["'status'", "leave it out"]),
        ("POST", "rollout", {"canary": "canary", "steps": [50, 5]}, 400, ["steps must increase"]),
        ("POST", "rollout", {"canary": "stable"}, 400, ["must differ from the stable alias"]),
        ("POST", "rollout/abort", {"canary": "canary"}, 400, ["field 'canary'", "not permitted"]),
        ("POST", "rollback", {"canary": 3}, 400, ["field 'canary'"]),
        ("PUT", "split", b"{" + b" " * BODY_LIMIT + b"}", 413, [f"{BODY_LIMIT}-byte limit"]),
        # the registry's refusals, with its messages
        ("PUT", "aliases/canary", {"version": 9}, 404, ["no version 9", "publish it first"]),
        ("PUT", "aliases/Canary", {"version": 1}, 400, ["invalid alias name 'Canary'"]),
        ("PUT", "aliases/42", {"version": 1}, 400, ["all-digit alias"]),
        ("DELETE", "aliases/ghost", None, 404, ["no alias 'ghost'", "aliases: canary, renamed, same, stable"]),
        ("PUT", "split", {"weights": {"stable": -1, "canary": 5}}, 400, ["split weight of 'stable'", ">= 0"]),
        ("PUT", "split", {"weights": {"stable": 0, "canary": 0}}, 400, ["sum to more than 0", "positive weight"]),
        ("PUT", "split", {"weights": {}}, 400, ["sum to more than 0"]),
        ("PUT", "split", {"weights": {"stable": 50, "ghost": 50}}, 404, ["no alias 'ghost'"]),
        ("PUT", "split", {"weights": {"stable": 1}, "sticky_key": "x user"}, 400, ["sticky_key", "header name"]),
        ("PUT", "sticky-key", {"header": "x:user"}, 400, ["sticky_key", "header name"]),
        ("PUT", "shadow", {"alias": "ghost", "percent": 10}, 404, ["no shadow alias 'ghost'"]),
        ("PUT", "shadow", {"alias": "canary", "percent": 0}, 400, ["shadow percent", "(0, 100]"]),
        ("PUT", "shadow", {"alias": "canary", "percent": 150}, 400, ["shadow percent"]),
        ("PUT", "shadow", {"alias": "renamed", "percent": 10}, 400, ["same tensors", "scores", "logits"]),
        ("POST", "rollout", {"canary": "ghost"}, 404, ["no canary alias 'ghost'"]),
        ("POST", "rollout", {"canary": "same"}, 400, ["both point at version 1", "point the canary at the new"]),
        ("POST", "rollout", {"canary": "canary", "stable": "ghost"}, 404, ["no stable alias 'ghost'"]),
        ("POST", "rollout/abort", None, 400, ["no running rollout", "start one first"]),
        ("POST", "promote", {"canary": "ghost"}, 404, ["no canary alias 'ghost'"]),
    ]
    with admin_server(start_server, registry_copy) as server:
        before = model_json(registry_copy)
        for method, path, body, status, words in cases:
            raw = {"content": body} if isinstance(body, bytes) else {}
            r = call(server, method, f"{BASE}/{path}", None if raw else body, **raw)
            refused(r, status, *words)
        assert model_json(registry_copy) == before

        # an unknown model
        refused(call(server, "GET", "/v2/repository/models/nope/routing"), 404, "model 'nope' not found",
                "mlp-digits")
        refused(call(server, "PUT", "/v2/repository/models/nope/split", {"weights": {"stable": 1}}), 404,
                "'nope'")
        refused(call(server, "POST", "/v2/repository/models/nope/rollback"), 404, "'nope'")
        assert not (registry_copy / "nope").exists()

        # a rollout while one runs, and an alias the running rollout uses
        ok(call(server, "POST", f"{BASE}/rollout", {"canary": "canary"}))
        running = model_json(registry_copy)
        refused(call(server, "POST", f"{BASE}/rollout", {"canary": "canary"}), 400, "already has a running rollout",
                "abort it")
        refused(call(server, "PUT", f"{BASE}/aliases/canary", {"version": 1}), 400, "running rollout")
        refused(call(server, "POST", f"{BASE}/promote", {"canary": "same"}), 400, "running rollout of canary")
        refused(call(server, "DELETE", f"{BASE}/aliases/stable"), 400, "used by the split", "change the split first")
        assert model_json(registry_copy) == running
