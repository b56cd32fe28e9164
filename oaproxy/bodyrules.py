"""What a request body must be for routing to trust what was read from it.

The allow and deny lists are checked against the model the body names; a
body whose model cannot be read must not reach an upstream by its path
instead (a deny list would fail open). So:

- a body that looks like JSON (by its content type, or by starting with
  ``{`` or ``[``) must be one object whose ``model``, if any, is one string
  (``BodyProblem`` says what else it was): else 400;
- on the routes whose requests are JSON with a model (``MODEL_ROUTES``) a
  POST body must have one: else 400;
- a multipart form (audio) is routed by its path, and its ``model`` field
  must not be one the upstream denies (``form_model_filter``).
"""

from __future__ import annotations

from oaproxy.config import Upstream
from oaproxy.errors import ErrorAnswer
from oaproxy.exchange import Exchange
from oaproxy.inspection import BodyKind, Inspected

#: The API paths whose POST bodies are JSON objects naming a model.
MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/audio/speech",
    }
)


def body_refusal(method: bytes, api_path: str, inspected: Inspected) -> ErrorAnswer | None:
    """The 400 for a body routing cannot trust; None for one it can.
    ``api_path`` is the path under any route prefix (``oaproxy.paths``)."""
    problem = inspected.problem
    if problem is not None:
        return ErrorAnswer(400, f"The request body {problem.value}.", param="model")
    if method != b"POST" or api_path not in MODEL_ROUTES or inspected.model is not None:
        return None
    kind = inspected.fields.kind
    if kind is BodyKind.JSON:
        return ErrorAnswer(400, "The request body has no `model`.", param="model")
    return ErrorAnswer(
        400,
        f"The request body must be a JSON object with a `model`; this one is {kind.value}.",
    )


def form_model_filter(
    exchange: Exchange, candidates: list[Upstream]
) -> list[Upstream] | ErrorAnswer:
    """A form is routed by its path; the upstreams that deny its model are left out."""
    model = exchange.call.inspected.form_model
    if model is None:
        return candidates
    serving = [upstream for upstream in candidates if model not in upstream.deny]
    if serving:
        return serving
    return ErrorAnswer(
        404,
        f"The model `{model}` does not exist or is not served by this proxy.",
        code="model_not_found",
        param="model",
    )
