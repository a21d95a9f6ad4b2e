"""Request bodies: JSON in, a validated pydantic model out, or a `BadRequest` that names the field.

Bodies are parsed here rather than by FastAPI so that any content type is read as JSON (`curl -d`
sends form encoding) and every error has the same shape: {"error": "<field>: <what was wrong>",
"field": "<field>"}.
"""

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class BadRequest(Exception):
    """A request the server will not run; `field` is the JSON field at fault ("body" for the whole)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


def _field(loc: tuple[Any, ...]) -> str:
    """('text', 'list[str]', 1) -> 'text[1]': the field and list indices, without pydantic's union tags."""
    if not loc:
        return "body"
    return str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))


def _message(error: dict[str, Any], model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return f"unknown field (expected some of {', '.join(model.model_fields)})"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"[:300]


def parse_body(raw: bytes, model: type[Model]) -> Model:
    """Strict types (no "5" for 5), unknown fields rejected; the first error is the one reported."""
    try:
        data = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest("body", f"not valid JSON ({e})", status=400) from None
    if not isinstance(data, dict):
        got = type(data).__name__ if data is not None else "nothing"
        raise BadRequest("body", f"expected a JSON object, got {got}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise BadRequest(_field(first["loc"]), _message(first, model)) from None


def check_range(field: str, value: float, low: float | None, high: float | None, *, low_open: bool = False) -> None:
    """`low <= value <= high` (or `low < value` with low_open), else a BadRequest naming the field."""
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        left = "(" if low_open else "["
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise BadRequest(field, f"must be in {interval}, got {value!r}")
