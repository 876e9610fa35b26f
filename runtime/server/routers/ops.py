"""Operations (/healthz, /readyz, /metrics) and the browser editor (/, /static, the bundled photo)."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from editrt.runtime.server.routers import common
from editrt.runtime.server.schemas import ErrorBody, Health, Ready

ERRORS = {401: {"model": ErrorBody}}
router = APIRouter(tags=["operations"], dependencies=[Depends(common.require_token)], responses=ERRORS)
page = APIRouter(tags=["page"])  # public: the same static files the package ships, no data and no compute


@router.get("/healthz", response_model=Health)
async def healthz():
    """The process is up and its event loop answers."""
    return Health()


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(request: Request):
    """Weights loaded and warmed up (one small request ran through each pipeline): 200, else 503."""
    st = common.state(request)
    body = Ready(ready=st.ready, weights=st.settings.weights, pipelines=sorted(st.queues), warm=st.warm,
                 device=str(st.device))
    return JSONResponse(body.model_dump(), status_code=200 if st.ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request):
    """Prometheus text format 0.0.4."""
    return Response(common.state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def static_file(name: str):
    return resources.files("editrt.runtime.server").joinpath("static", name)


@page.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    return HTMLResponse(static_file("index.html").read_text())


@page.get("/assets/photo.png", include_in_schema=False)
async def photo():
    """The bundled photograph (editrt/assets/chelsea.png), so the page works without a file at hand."""
    with resources.as_file(resources.files("editrt").joinpath("assets", "chelsea.png")) as path:
        return FileResponse(path, media_type="image/png")
