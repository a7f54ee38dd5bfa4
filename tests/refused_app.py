"""A tidings mounted in a user's FastAPI app, as README "Mount it in your FastAPI app" shows it:
served by stock uvicorn (``python -m uvicorn tests.refused_app:app``) in tests that watch a
real server process. Settings come from the environment (``TIDINGS_*``)."""

from __future__ import annotations

from fastapi import FastAPI

from tidings import Tidings

tidings = Tidings()
app = FastAPI(lifespan=tidings.lifespan)
app.include_router(tidings.router)
