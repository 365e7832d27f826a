"""`serve`: the reading web app (FastAPI, Jinja templates, uvicorn).

Every route carries a token: a reader's (`/r/TOKEN`, their next image; `/r/TOKEN/image/ID`; `POST
/r/TOKEN/answer`) or the organiser's (`/organiser/TOKEN`, progress per reader, no answers). Anything else, a wrong
token included, is 403. Images are looked up by ID in the reader's own order, never by a path taken from the request.
What a page or an image response holds is the same for a real and a synthetic image except the pixels and the
opaque ID: the answer key stays in SQLite. An answer is committed before its request returns, so the page moves on
only once it is on disk.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..cli import UsageError
from . import store

logger = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"[0-9a-f]{32}")
# No caching (a shared browser must not keep another reader's images), no Referer (tokens are in the URLs), no
# content sniffing.
HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
FORBIDDEN = "403 Forbidden: this link is not valid for this study."


def forbidden() -> Response:
    return Response(FORBIDDEN, status_code=403, media_type="text/plain", headers=HEADERS)


class Answer(BaseModel):
    """A posted answer. Strict: "3" is not a confidence, nor true a 1."""

    model_config = ConfigDict(strict=True)

    position: int
    call: Literal["real", "synthetic"]
    confidence: int = Field(ge=1, le=5)
    quality: int = Field(ge=1, le=5)
    findings: list[str] = []
    comment: str = ""
    seconds: float | None = None


def check_answer(body: bytes, vocabulary: list[str]) -> Answer:
    """The posted answer, checked, with findings from the vocabulary (sorted) and the comment cut to 2,000
    characters; a refusal names what an answer needs."""
    try:
        answer = Answer.model_validate_json(body)
    except ValidationError:
        answer = None
    if answer is None or not set(answer.findings) <= set(vocabulary):
        raise UsageError("an answer needs call real|synthetic, confidence 1-5, quality 1-5 and findings from the list")
    return answer.model_copy(update={"findings": sorted(answer.findings), "comment": answer.comment[:2000]})


def build_app(folder) -> FastAPI:
    folder = Path(folder)
    store.connect(folder).close()  # fails now, with the folder named, if there is no study
    templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def reader(db, token: str):
        return store.reader_by_token(db, token) if len(token) < 100 else None

    @app.get("/r/{token}", response_class=HTMLResponse)
    def page(request: Request, token: str):
        with store.opened(folder) as db:
            found = reader(db, token)
            if found is None:
                return forbidden()
            settings = store.meta(db)
            item = store.next_item(db, found["id"])
            total, practice = store.item_counts(db, found["id"])
        context = {"name": found["name"], "token": token, "total": total, "practice_total": practice,
                   "item": dict(item) if item else None, "vocabulary": settings["vocabulary"],
                   "ask_findings": settings["ask_findings"]}
        return templates.TemplateResponse(request, "read.html", context, headers=HEADERS)

    @app.get("/r/{token}/image/{image_id}")
    def image(token: str, image_id: str):
        if not IMAGE_ID.fullmatch(image_id):
            return forbidden()
        with store.opened(folder) as db:
            found = reader(db, token)
            shown = found is not None and store.shows(db, found["id"], image_id)
        if not shown:
            return forbidden()
        # The ID is 32 hex digits checked against the reader's own items: the file name is built from it alone.
        data = (folder / store.IMAGES / f"{image_id}.png").read_bytes()
        return Response(data, media_type="image/png", headers=HEADERS)

    @app.post("/r/{token}/answer")
    async def answer(request: Request, token: str):
        body = await request.body()
        with store.opened(folder) as db:
            found = reader(db, token)
            if found is None:
                return forbidden()
            try:
                checked = check_answer(body, store.meta(db)["vocabulary"])
            except UsageError as err:
                return JSONResponse({"error": str(err)}, status_code=400, headers=HEADERS)
            item = store.item_at(db, found["id"], checked.position)
            if item is None:
                return JSONResponse({"error": "no such item"}, status_code=400, headers=HEADERS)
            stored = store.record_answer(db, found["id"], item["position"], checked.model_dump())
            reply = {"stored": stored}
            if item["practice"]:  # practice only: the answer, to learn from (never for a study image)
                reply["truth"] = store.origin(db, item["image_id"])
        return JSONResponse(reply, headers=HEADERS)

    @app.get("/organiser/{token}", response_class=HTMLResponse)
    def organiser(request: Request, token: str):
        with store.opened(folder) as db:
            if not store.is_organiser(db, token):
                return forbidden()
            rows = store.progress(db)
        return templates.TemplateResponse(request, "organiser.html", {"rows": rows}, headers=HEADERS)

    @app.api_route("/{anything:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    def everything_else(anything: str):
        return forbidden()

    return app
