"""Method options as people write and read them: `NAME[:opt=value,...]` specs in, `k=v,...` out.

The one place where method options are parsed from text and formatted back for tables, logs and
result files.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, fields
from typing import Any

from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import MethodConfig, make_config
from tokenreduce.recipe import is_recipe_path, read_recipe

__all__ = [
    "MethodSpec",
    "describe_options",
    "format_options",
    "format_spec",
    "parse_method",
    "unique_labels",
]


MethodSpec = tuple[str, dict[str, Any]]


def parse_method(spec: str) -> MethodSpec:
    """'tome:r=13,prop_attn=False' -> ('tome', {'r': 13, 'prop_attn': False}).

    Values are Python literals, and true/false in any case are booleans (as shells and YAML
    write them); any other value (e.g. a file path) is taken as a string (quote a file named
    true or false: 'true').
    The name and options are checked against the method's config (`make_config`). A recipe file
    (`tokenreduce tune --out`) gives its method and options; the commands check that it was
    tuned for their model once it is loaded.
    """
    if is_recipe_path(spec):
        recipe = read_recipe(spec)
        return recipe.method, dict(recipe.options)
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in _split_top_level(rest) if rest.strip() else []:
        if not item.strip():
            raise InvalidOptionError(
                f"method {spec!r} has an empty option between commas; accepted: "
                "NAME[:key=value,...]"
            )
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidOptionError(f"method option {item!r} in {spec!r} is not key=value")
        if key.strip() in options:
            raise InvalidOptionError(f"method option {key.strip()!r} is given twice in {spec!r}")
        options[key.strip()] = _option_value(value.strip())
    make_config(name, **options)
    return name, options


def _option_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, so that `r=(13,-0.5)` stays one item."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "(["
        depth -= char in ")]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def unique_labels(names: list[str]) -> list[str]:
    """File labels for a list of method names: the name, numbered where a name repeats."""
    return [
        f"{n}{names[:k].count(n) + 1}" if names.count(n) > 1 else n for k, n in enumerate(names)
    ]


def format_spec(name: str, options: dict[str, Any]) -> str:
    """('tome', {'r': 13}) -> 'tome:r=13' (the inverse of `parse_method`)."""
    return f"{name}:{format_options(options)}" if options else name


def format_options(options: dict[str, Any]) -> str:
    """Options exactly as given, as `k=v,...` (the inverse of `parse_method`'s options)."""
    return ",".join(f"{k}={v!r}" for k, v in options.items())


def describe_options(config: MethodConfig) -> str:
    """The strength option and the options that differ from the defaults, as `k=v,...`."""
    default = type(config)()
    strength = type(config).strength
    internal = {f.name for f in fields(config) if f.metadata.get("internal")}
    shown = {
        k: v
        for k, v in asdict(config).items()
        if k != "trace_source"
        and k not in internal
        and (getattr(default, k) != v or (strength is not None and k == strength.option))
    }
    return format_options({k: _rounded(v) for k, v in shown.items()})


def _rounded(value: Any) -> Any:
    """Learned per-layer thresholds rounded to 4 significant digits, so tables stay readable."""
    if isinstance(value, tuple) and all(isinstance(v, float) for v in value):
        return tuple(float(f"{v:.4g}") for v in value)
    return value
