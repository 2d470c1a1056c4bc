"""Images for people: a sampler's output as a PNG grid.

    GET /v1/images/{model}?label=7&n=16&seed=1[&steps=&sampler=&eta=&guidance=&version=&per_row=&scale=]

`label` is one integer repeated `n` times (n defaults to 16) or a comma-separated list; -1 is
unconditional. The request goes through the same validation and the same engine as a v2 infer
(serve/sample_request.py), so the grid holds exactly the images a v2 request with that label
list and seed returns. The answer carries `x-model-version` and `x-seed` (the seed used).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serve.api.deps import RequestOutcome, repository_of, settings_of, unless_disconnected
from serve.engines.sample import png_grid
from serve.errors import ServeError
from serve.sample_request import GENERATIVE_KINDS, query_request

router = APIRouter()
INT64 = dict(ge=-(2**63), le=2**63 - 1)


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
