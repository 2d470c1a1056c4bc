"""Images for people: a sampler's output as a PNG grid.

    GET /v1/images/{model}?label=7&n=16&seed=1[&steps=&sampler=&eta=&guidance=&version=&per_row=&scale=]

`label` is one integer repeated `n` times (n defaults to 16) or a comma-separated list; -1 is
unconditional. The request goes through the same validation and the same engine as a v2 infer
(serve/sample_request.py), so the grid holds exactly the images a v2 request with that label
list and seed returns. The answer carries `x-model-version` and `x-seed` (the seed used).
GET only; a query parameter the route does not know (`sed=1`), one given twice, or a body is a
400 naming it (errors are `{"error": "..."}`, as on the v2 routes), never ignored.
"""

from __future__ import annotations

import difflib
import inspect
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serve.api.deps import RequestOutcome, repository_of, settings_of, unless_disconnected
from serve.engines.sample import png_grid
from serve.errors import ServeError
from serve.sample_request import GENERATIVE_KINDS, query_request

router = APIRouter()
INT64 = dict(ge=-(2**63), le=2**63 - 1)


async def refuse_unknown(request: Request) -> None:
    """A 400 for what the route would otherwise drop: an unknown query parameter (did-you-mean
    when it is close to one), a parameter given twice (only one would count), a body."""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key not in PARAMETERS:
            close = difflib.get_close_matches(key, PARAMETERS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ServeError(400, f"unknown query parameter {key!r}{hint}; the parameters are "
                                  f"{', '.join(PARAMETERS)}")
        if key in seen:
            raise ServeError(400, f"query parameter {key!r} is given more than once")
        seen.add(key)
    async for chunk in request.stream():            # the first chunk tells; nothing is buffered
        if chunk:
            raise ServeError(400, f"GET {request.url.path} takes no body: its parameters go in the query string")


@router.get("/v1/images/{model}", summary="Sample images as a PNG grid (gan, vae, diffusion)",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def images(request: Request, model: str,
                 label: str = Query("-1", description="a label, or comma-separated labels; -1 = unconditional"),
                 n: int | None = Query(None, description="samples of `label` (default 16)"),
                 seed: int | None = Query(None, description="same seed, same images (default: random)", **INT64),
                 steps: int | None = Query(None, description="diffusion: denoising steps"),
                 sampler: str | None = Query(None, description="diffusion: ddpm or ddim"),
                 eta: float | None = Query(None, description="diffusion, ddim: 0 deterministic .. 1"),
                 guidance: float | None = Query(None, description="diffusion: classifier-free guidance scale"),
                 version: str | None = Query(None, description="a version number or alias"),
                 per_row: int | None = Query(None, ge=1, le=256, description="images per row (default: square)"),
                 scale: int = Query(4, ge=1, le=32, description="screen pixels per image pixel")) -> Response:
    started = time.perf_counter()
    await refuse_unknown(request)
    repo, settings = repository_of(request), settings_of(request)
    lv, alias = repo.route(model, version, request.headers.get)
    engine = lv.engine
    if engine.manifest.kind not in GENERATIVE_KINDS:
        raise ServeError(400, f"model {model!r} is of kind {engine.manifest.kind!r}; images come from the "
                              f"samplers (kinds sample and denoise)")
    with RequestOutcome(model, started, "sampling", lambda: (engine.metrics, lv.version)) as outcome:
        req = query_request(engine.manifest, label, n, seed,
                            {"steps": steps, "sampler": sampler, "eta": eta, "guidance": guidance},
                            settings.max_samples_per_request)
        outputs = await unless_disconnected(engine.sample(req, started + settings.request_timeout_s), request.receive)
        if outputs is None:                         # the client left: its rows were freed
            outcome.status = 499
            return Response(status_code=499)
        png = png_grid(outputs["image"], per_row, scale)
        outcome.status = 200
    headers = {"x-model-version": str(lv.version), "x-seed": str(req.seed), **({"x-model-alias": alias} if alias else {})}
    return Response(png, media_type="image/png", headers=headers)


# the query parameters of the route: its handler's own, so that the two cannot drift apart
PARAMETERS = tuple(p for p in inspect.signature(images).parameters if p not in ("request", "model"))
