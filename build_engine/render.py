"""Render the model repository templates (`config.pbtxt` with `${placeholders}`).

`render_template(text, values, source)` substitutes with `string.Template`; a placeholder without a value
is an error naming it and the file. `render_repository(template_dir, out_dir, values)` copies each model
folder (`config.pbtxt` rendered, everything else copied as is) into `out_dir`, and the helpers the Python
models share (`common/*.py`) into each Python model's version folder, beside its `model.py` (the stub
imports model.py as `1.model`, so it imports them as `.name`). `common/` itself is not copied: Triton
would take any folder at the top of the repository for a model.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "COMMON_DIR",
    "MODEL_NAMES",
    "TEMPLATE_DIR",
    "RenderError",
    "placeholders",
    "render_repository",
    "render_template",
]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_repository"
COMMON_DIR = "common"  # under the template dir: modules copied beside every Python model's model.py
MODEL_NAMES = ("ensemble", "ensemble_sync", "preprocessing", "vision_encoder", "llm", "postprocessing")


class RenderError(ValueError):
    """A template placeholder has no value (or is malformed)."""


def placeholders(text: str) -> set[str]:
    """Names of the `${name}` / `$name` placeholders in `text`."""
    names = set()
    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


def render_template(text: str, values: Mapping[str, object], source: str = "<template>") -> str:
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise RenderError(f"{source}: no value for placeholder ${{{missing[0]}}} (unfilled: {missing})")
    try:
        return string.Template(text).substitute({k: str(v) for k, v in values.items()})
    except ValueError as exc:  # e.g. a lone "$"
        raise RenderError(f"{source}: malformed placeholder ({exc})") from None


def render_repository(
    template_dir: str | Path,
    out_dir: str | Path,
    values: Mapping[str, object],
    models: tuple[str, ...] = MODEL_NAMES,
) -> Path:
    """Write the rendered repository to `out_dir` (which must not exist yet)."""
    template_dir, out_dir = Path(template_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    common = sorted((template_dir / COMMON_DIR).glob("*.py"))
    for name in models:
        src = template_dir / name
        if not (src / "config.pbtxt").is_file():
            raise FileNotFoundError(f"model template {src}/config.pbtxt is missing")
        shutil.copytree(src, out_dir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Every model needs its version folder; the ensemble's is empty, which git does not keep.
        (out_dir / name / "1").mkdir(exist_ok=True)
        if (out_dir / name / "1" / "model.py").is_file():
            for module in common:
                shutil.copy2(module, out_dir / name / "1" / module.name)
        config = out_dir / name / "config.pbtxt"
        config.write_text(render_template(config.read_text(), values, str(src / "config.pbtxt")))
    return out_dir
