"""What every config section shares: the strict base model, the operational-field mark and
the resume key built from it, and the one-line config error."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

# Marks a field that changes how a job runs (pool sizes, batch sizes, placement) but not its
# results: resume keys (``results_key``) leave such fields out.
OPERATIONAL = {"operational": True}


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def results_key(section: BaseModel) -> dict[str, Any]:
    """A section's fields that decide results, for resume keys: all but the operational ones."""
    skip = {
        name
        for name, field in type(section).model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("operational")
    }
    return section.model_dump(mode="json", exclude=skip)
