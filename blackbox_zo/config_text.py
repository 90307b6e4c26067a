"""A problem's settings as text: the listing of `train PROBLEM --help` and the TOML of `config PROBLEM`.

Both are generated from the pydantic models (`blackbox_zo.config` and the problem's own
sections): every setting with its default, its allowed values and its description. The
TOML is the resolved config itself, ready to edit and pass back with `--config FILE`; TOML
has no null, so an unset setting is written as the string "none", which every setting that
may be unset accepts.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import typing
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Tagged, TrainConfig, section_model

__all__ = ["toml_value", "config_toml", "describe_field", "settings_help"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def toml_value(value: Any) -> str:
    """One value in TOML: None as the string "none" (TOML has no null), tuples as arrays, dicts inline."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _tag_root(model: type[BaseModel]) -> type[Tagged] | None:
    """The root of a tagged section (the class whose `variants` lists every value of the tag)."""
    if not (isinstance(model, type) and issubclass(model, Tagged)):
        return None
    return next(c for c in reversed(model.__mro__) if isinstance(c, type) and issubclass(c, Tagged)
                and c is not Tagged and model.tag in c.model_fields)


def _tag_doc(model: type[BaseModel], name: str) -> tuple[str, str] | None:
    """(the values the tag takes, what it does) if `name` is the tag of a tagged section's `model`."""
    root = _tag_root(model)
    if root is None or name != root.tag:
        return None
    return " | ".join(toml_value(t) for t in root.variants()), root.model_fields[name].description or ""


def _comment(text: str | None, indent: str = "") -> list[str]:
    if not text:
        return []
    return textwrap.wrap(" ".join(text.split()), width=100, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ")


def _table(lines: list[str], path: str, model: BaseModel | None, values: dict[str, Any], doc: str | None) -> None:
    """Append `[path]` with its scalar settings (a comment line each), then its sub-tables."""
    fields = type(model).model_fields if model is not None else {}
    lines.append("")
    lines += _comment(doc)
    lines.append(f"[{path}]")
    nested = []
    for name, value in values.items():
        field = fields.get(name)
        sub = getattr(model, name, None) if model is not None else None
        if isinstance(value, dict) and (isinstance(sub, BaseModel) or field is None or not value or
                                        all(not isinstance(v, dict) for v in value.values())):
            nested.append((name, value, sub if isinstance(sub, BaseModel) else None, field))
            continue
        tag = _tag_doc(type(model), name) if model is not None else None
        lines += _comment(f"{tag[1]}: {tag[0]}" if tag else field.description if field is not None else None)
        lines.append(f"{_key(name)} = {toml_value(value)}")
    for name, value, sub, field in nested:
        doc = (field.description if field is not None else None) or (type(sub).__doc__ if sub is not None else None)
        _table(lines, f"{path}.{_key(name)}", sub, value, doc)


def config_toml(config: TrainConfig, problem: Any = None) -> str:
    """The resolved `config` as TOML with each setting's description as a comment."""
    name = getattr(problem, "name", None) or config.problem
    data = config.model_dump()
    lines = [f"# Settings of {name}, resolved (blackbox-zo config {name}). Edit, then run:",
             f"#   blackbox-zo train {name} --config FILE",
             "# A setting the problem does not use is refused; \"none\" leaves a setting unset."]
    fields = type(config).model_fields
    for key, value in data.items():
        if not isinstance(value, dict):
            lines += _comment(fields[key].description if key in fields else None)
            lines.append(f"{_key(key)} = {toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            section = getattr(config, key)
            doc = fields[key].description if key in fields else None
            _table(lines, _key(key), section if isinstance(section, BaseModel) else None, value, doc)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ --help


def _bound(meta: list[Any]) -> str:
    lo = next((f">= {m.ge:g}" if isinstance(m, Ge) else f"> {m.gt:g}" for m in meta if isinstance(m, (Ge, Gt))), "")
    hi = next((f"<= {m.le:g}" if isinstance(m, Le) else f"< {m.lt:g}" for m in meta if isinstance(m, (Le, Lt))), "")
    sizes = [f"at least {m.min_length} entries" for m in meta if isinstance(m, MinLen)] + \
            [f"at most {m.max_length} entries" for m in meta if isinstance(m, MaxLen)]
    return ", ".join(x for x in (lo, hi, *sizes) if x)


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(toml_value(a) for a in args)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        text = " | ".join(_type_text(a) for a in inner)
        return f"{text} | \"none\"" if type(None) in args else text
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin is tuple and args:
        return "[" + ", ".join("..." if a is Ellipsis else _type_text(a) for a in args) + "]"
    if origin is list and args:
        return f"[{_type_text(args[0])}, ...]"
    if origin is dict:
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def describe_field(field: FieldInfo) -> str:
    """'int >= 1', 'float > 0, < 1', '"forward" | "central"', 'int >= 1 | "none"', ..."""
    text = _type_text(field.annotation)
    bound = _bound(list(field.metadata))
    for m in field.metadata:
        inner = getattr(m, "metadata", None)
        if inner:
            bound = bound or _bound(list(inner))
    if bound:
        text = text.replace(" | \"none\"", "") + f" {bound}" + (" | \"none\"" if "\"none\"" in text else "")
    return text


def _setting_lines(prefix: str, model: type[BaseModel], values: dict[str, Any], indent: str,
                   skip: set[str] = frozenset()) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        tag = _tag_doc(model, name)
        if tag is not None:  # the tag: every value it takes, and what it does
            out.append(f"{indent}{prefix}{name} = {toml_value(values.get(name, field.default))}    ({tag[0]})")
            out += textwrap.wrap(" ".join(tag[1].split()), width=96,
                                 initial_indent=indent + "    ", subsequent_indent=indent + "    ")
            continue
        sub = section_model(field.annotation)
        value = values.get(name, field.get_default(call_default_factory=True))
        if sub is not None and issubclass(sub, Tagged) and isinstance(value, (BaseModel, dict)):
            # a tagged section inside a section (phase2.estimator): the settings of its current variant
            data = value.model_dump() if isinstance(value, BaseModel) else value
            variant = type(value) if isinstance(value, BaseModel) else sub.variant(data.get(sub.tag, sub.default_tag()))
            if variant is not None:
                out += _setting_lines(f"{prefix}{name}.", variant, data, indent)
                continue
        if sub is not None and not issubclass(sub, Tagged):
            sub_values = value.model_dump() if isinstance(value, BaseModel) else (value or {})
            if sub.model_fields:
                out += _setting_lines(f"{prefix}{name}.", sub, sub_values, indent)
                continue
        if isinstance(value, BaseModel):
            value = value.model_dump()
        out.append(f"{indent}{prefix}{name} = {toml_value(value)}    ({describe_field(field)})")
        out += textwrap.wrap(" ".join((field.description or "").split()), width=96,
                             initial_indent=indent + "    ", subsequent_indent=indent + "    ")
    return out


def settings_help(problem: Any) -> str:
    """Every setting of `problem`: section by section, the default (the problem's), the allowed values
    and the description; a tagged section lists the settings each of its other variants adds."""
    config = problem.resolve_config()
    defaults = problem.default_config()
    model = type(config)
    lines = [f"settings of {problem.name} (--set SECTION.KEY=VALUE; `blackbox-zo config {problem.name}` writes them "
             "as TOML for --config):"]
    for key, field in model.model_fields.items():
        if key == "problem":
            continue
        section = section_model(field.annotation)
        if section is None:
            continue
        value = getattr(config, key)
        doc = field.description or (section.__doc__ or "").strip().split("\n")[0]
        lines.append("")
        lines.append(f"[{key}]  {doc}")
        if not issubclass(section, Tagged):
            if value is None:  # an optional section (e.g. phase2): off unless set; its settings as they would be
                lines.append("  (unset: off)")
                values = {n: None for n, f in section.model_fields.items() if f.is_required()}
            else:
                values = value.model_dump()
            lines += _setting_lines(f"{key}.", section, values, "  ")
            continue
        raw = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
        current = type(value) if value is not None else section.variant(section.default_tag())
        shown: set[str] = set()
        if value is None:
            lines.append(f"  (unset: off)")
        else:
            lines += _setting_lines(f"{key}.", current, value.model_dump(), "  ")
            shown = set(current.model_fields)
        tags_of: dict[type, list[Any]] = {}
        for tag, variant in section.variants().items():
            tags_of.setdefault(variant, []).append(tag)
        for variant, tags in tags_of.items():
            if (variant is current and value is not None) or \
                    not [n for n in variant.model_fields if n not in shown and n != section.tag]:
                continue  # shown already, or nothing of its own (e.g. sparsity.enabled = false)
            lines.append(f"  with {key}.{section.tag} = {' | '.join(toml_value(t) for t in tags)}:")
            lines += _setting_lines(f"{key}.", variant, {**raw, section.tag: tags[0]}, "    ",
                                    skip={section.tag} | shown)
    return "\n".join(lines)
