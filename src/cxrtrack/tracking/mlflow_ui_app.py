"""`make mlflow-ui`'s server: MLflow's own app, whose UI opens in *Model training* mode rather than GenAI.

What MLflow 3.17's UI reads to choose the mode (main.<hash>.js of its bundle, the ``WorkflowTypeProvider``): the page's
``?workflowType=`` query parameter if there is one, else the browser's ``localStorage["mlflow.workflowType_v1"]`` (the
JSON string ``"genai"`` or ``"machine_learning"``), else GenAI. Only the GenAI / Model-training switch at the top left
of the sidebar writes that key; the experiment tag ``mlflow.experimentKind`` is not read (its hook returns the global
mode whenever a feature flag compiled into the bundle as ``()=>!0`` is on), and the server has no flag or environment
variable for it. A printed link with the parameter therefore opens in Model-training mode, but the next click (a run in
the runs table, Models, a model version) drops the parameter and the page falls back to GenAI.

So this app serves MLflow's app unchanged except for its single HTML page (every UI address is ``/#/...``), which gets a
one-line script run before MLflow's own: when this browser has never chosen a mode for this address, it stores Model
training. A choice made with the switch is kept (the key is then set, and never overwritten). Registered as the MLflow
server app ``cxrtrack-ui`` (entry point group ``mlflow.app``, MLflow's documented way to run a custom server app with
``mlflow server --app-name``)."""

from __future__ import annotations

import os
from typing import Any

# MLflow's UI: useLocalStorage({key: "mlflow.workflowType", version: 1}) stores under `${key}_v${version}`
WORKFLOW_KEY = "mlflow.workflowType_v1"
MODEL_TRAINING = "machine_learning"
APP_NAME = "cxrtrack-ui"
SEED_SCRIPT = (f'<script>try{{if(window.localStorage.getItem("{WORKFLOW_KEY}")===null)'
               f'window.localStorage.setItem("{WORKFLOW_KEY}",JSON.stringify("{MODEL_TRAINING}"))}}catch(e){{}}</script>')


def seed_model_training(html: bytes) -> bytes:
    """The page with the script as the first element of <head> (before MLflow's deferred bundle); unchanged if no
    <head>."""
    head = html.find(b"<head>")
    if head < 0:
        return html
    at = head + len(b"<head>")
    return html[:at] + SEED_SCRIPT.encode() + html[at:]


class ModelTrainingByDefault:
    """ASGI middleware: GET of the UI's page gets the seed script; every other request goes through untouched."""

    def __init__(self, app: Any, static_prefix: str = "") -> None:
        self.app = app
        self.page = static_prefix.rstrip("/") + "/"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") != self.page:
            await self.app(scope, receive, send)
            return
        # The page is rewritten, so no 304 for a copy cached without the script, and no compressed body to parse.
        drop = {b"if-none-match", b"if-modified-since", b"accept-encoding", b"range"}
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in drop]}
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"etag")]
            html = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
            encoded = any(k.lower() == b"content-encoding" for k, _ in headers)
            if start.get("status") == 200 and html and not encoded:
                body = seed_model_training(body)
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def create_app() -> Any:
    """The uvicorn app factory named by the ``mlflow.app`` entry point (imports the server only in the worker)."""
    from mlflow.server.fastapi_app import app
    from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

    return ModelTrainingByDefault(app, os.environ.get(STATIC_PREFIX_ENV_VAR, ""))


def installed() -> bool:
    """Whether this install registers the app (an install older than it, or a foreign venv, runs MLflow's own)."""
    from importlib.metadata import entry_points

    return any(ep.name == APP_NAME for ep in entry_points(group="mlflow.app"))
