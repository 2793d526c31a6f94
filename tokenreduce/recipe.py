"""Recipes: a tuned method setting in a JSON file, with the model it was tuned for.

`tokenreduce tune --out recipe.json` writes one (docs/measurement.md §6); `tokenreduce.apply(model,
"recipe.json")` and `--method recipe.json` on every command load it. A recipe records the
model's identity the way threshold files do (`methods.learned.model_facts`), and one tuned for
another model is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, MissingFileError
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.methods.learned import MODEL_FACTS, describe_facts, model_facts

__all__ = [
    "RECIPE_FORMAT",
    "Recipe",
    "check_recipe_model",
    "config_options",
    "is_recipe_path",
    "read_recipe",
    "recipe_config",
    "write_recipe",
]


RECIPE_FORMAT = "tokenreduce-recipe/1"


@dataclass(frozen=True)
class Recipe:
    """A method setting and how it was found.

    method, options: the config (`make_config(method, **options)`); model: `model_facts` of the
    model it was tuned for; target: {"kind", "value", "batch_size"}; measured: the speedup, its
    spread, the GMACs ratio and the fidelity at that setting; device and torch: where."""

    method: str
    options: dict[str, Any]
    model: dict[str, Any]
    target: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    torch: str = ""


def config_options(config: MethodConfig) -> dict[str, Any]:
    """The options that rebuild `config` with `make_config(config.name, **options)`: every
    field a user can set that differs from the default, plus the strength option. Internal
    fields (a threshold file's record) are left out: their values are already in the options."""
    default = type(config)()
    strength = type(config).strength
    options = {}
    for item in fields(config):
        if not item.init or item.metadata.get("internal") or item.name == "trace_source":
            continue
        value = getattr(config, item.name)
        is_strength = strength is not None and item.name == strength.option
        if is_strength or value != getattr(default, item.name):
            options[item.name] = value
    if "thresholds" in options:  # its per-layer values are in the kinds' options
        del options["thresholds"]
    return options


def _as_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    """JSON lists back to the tuples that configs take."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def is_recipe_path(text: object) -> bool:
    """Whether a --method text or `apply`'s method names a recipe file: a .json path that does
    not start with a method name and a colon."""
    if not isinstance(text, (str, Path)):
        return False
    text = str(text)
    return text.lower().endswith(".json") and text.partition(":")[0] not in method_names()


def write_recipe(path: str | Path, recipe: Recipe) -> None:
    content = {"format": RECIPE_FORMAT, **asdict(recipe)}
    content["options"] = {k: _as_json(v) for k, v in recipe.options.items()}
    Path(path).write_text(json.dumps(content, indent=2) + "\n")


def read_recipe(path: str | Path) -> Recipe:
    """The recipe in `path`; a missing file, or one that is not a recipe, in one line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"recipe {path} does not exist; accepted: a file from tokenreduce tune --out"
        )
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidOptionError(
            f"recipe {path} is not JSON ({err}); accepted: a file from tokenreduce tune --out"
        ) from err
    if not isinstance(content, dict) or content.get("format") != RECIPE_FORMAT:
        raise InvalidOptionError(
            f"{path} is not a recipe (format {RECIPE_FORMAT!r} expected); accepted: a file from "
            "tokenreduce tune --out"
        )
    missing = [key for key in ("method", "options", "model") if key not in content]
    if missing or not isinstance(content["options"], dict):
        raise InvalidOptionError(
            f"recipe {path} lacks {', '.join(missing) or 'an options object'}; accepted: a file "
            "from tokenreduce tune --out"
        )
    known = {f.name for f in fields(Recipe)}
    recipe = Recipe(**{k: v for k, v in content.items() if k in known})
    options = {k: _from_json(v) for k, v in recipe.options.items()}
    make_config(recipe.method, **options)  # an option the method does not take, in one line
    return Recipe(**{**asdict(recipe), "options": options})


def check_recipe_model(path: str | Path, recipe: Recipe, dims: ModelDims) -> None:
    """Refuse, in one line, a recipe tuned for another model (the facts a threshold file
    records, `MODEL_FACTS`)."""
    ours = model_facts(dims)
    differ = [
        key
        for key in MODEL_FACTS
        if recipe.model.get(key) not in (None, "")
        and ours[key] not in (None, "")
        and recipe.model[key] != ours[key]
    ]
    if differ:
        raise InvalidOptionError(
            f"recipe {path} was tuned for {describe_facts(recipe.model)}, not this model "
            f"{describe_facts(ours)} ({', '.join(differ)} differ); accepted: a recipe from "
            "tokenreduce tune on this model"
        )


def recipe_config(path: str | Path, dims: ModelDims) -> MethodConfig:
    """The config of the recipe in `path`, checked to be tuned for the model of `dims`."""
    recipe = read_recipe(path)
    check_recipe_model(path, recipe, dims)
    return make_config(recipe.method, **recipe.options)
