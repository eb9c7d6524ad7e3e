"""The request bodies in the ingest's ``/openapi.json``.

The completion and tokenizer endpoints read their JSON body by hand
(:func:`services.ingest.validation.parse_body`: any Content-Type, OpenAI-shaped 400s), so
FastAPI cannot see what they take. This module adds each one's body schema, from the same
pydantic models the endpoints validate with, so schema-driven clients and fuzzers (the
chaos suite's schemathesis) send real bodies.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from services.ingest.aux_routes import DetokenizeRequest, TokenizeChat, TokenizePrompt
from services.ingest.schemas import ChatCompletionRequest, CompletionRequest

#: (path, method) -> the models its body may be (several: any one of them).
REQUEST_BODIES: dict[tuple[str, str], tuple[type[BaseModel], ...]] = {
    ("/v1/completions", "post"): (CompletionRequest,),
    ("/v1/chat/completions", "post"): (ChatCompletionRequest,),
    ("/tokenize", "post"): (TokenizePrompt, TokenizeChat),
    ("/detokenize", "post"): (DetokenizeRequest,),
}


def document_request_bodies(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) list the bodies above."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            _add_bodies(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_bodies(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), models in REQUEST_BODIES.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        refs = [_register(components, model) for model in models]
        body = refs[0] if len(refs) == 1 else {"oneOf": refs}
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body}}}


def _register(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Put ``model``'s schema (and the ones it refers to) in the components; its $ref."""
    own = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in own.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = own
    return {"$ref": f"#/components/schemas/{model.__name__}"}
