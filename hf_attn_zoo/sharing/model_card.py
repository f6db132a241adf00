"""The model card (README.md) of a saved model: what was patched and how, its parameters against the base model, the
tuning run and an eval table when there are any, and how to load it.

`save_pretrained` of a patched model writes it (see `save_hook.py`), `hf-attn-zoo tune` refreshes the one in `final/`
with the run, and `push_to_hub` uploads it. A README.md without `CARD_MARKER` is somebody's own card and is never
replaced (unless `overwrite=True`); ours is regenerated on every save.

Where the facts come from:

- patches: `config.hf_attn_zoo` (method, layers, options per entry); the paper: the first paragraph of the method's
  module docstring (every patch module cites its paper there: `registry.patch_paper`);
- base model: `base_model=`, else the checkpoint the model was loaded from (`config._name_or_path`): a hub id is the
  base itself, a folder carrying our card passes its `base_model` on, the embedded default model is
  SmolLM2-135M-Instruct; else the `base_model` of the card already in the folder. The license is read from the base's
  own card when it can be (offline: only from a local folder or the hub cache);
- parameters: the model (or, without one, the model rebuilt on the meta device from `config.json` with its patches)
  against the unpatched architecture built on the meta device;
- tuning: a `hf-attn-zoo tune` run folder (`recipe.yaml`, `result.json`): `run_dir=`, or the parent of a folder named
  `final` that holds both;
- evaluation: lm-eval results under `<folder>/eval/<name>/` (one column each, `base` first: `hf-attn-zoo eval ...
  --output_path <folder>/eval/<name>` writes them there), the run's `eval_results.json` (column `tuned`), or
  `eval_results=` (column name -> results dict, file or folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidOptionError, UnknownModelError
from ..outputs import atomic_output
from ..patching import PATCHED_ATTENTION, RECORD_KEY, VERSION_KEY, new_parameters, package_version, patch_plan
from ..support import link_arxiv
from ..wrappers import inner_model

__all__ = [
    "BASE_EVAL",
    "CARD_FILE",
    "CARD_MARKER",
    "EVAL_DIR",
    "TUNED_EVAL",
    "is_own_card",
    "rebuild_on_meta",
    "render_model_card",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# the line that tells our card from a user's README.md (which is never replaced)
CARD_MARKER = "<!-- hf-attn-zoo model card: rewritten on every save; delete this line to keep your edits -->"
EVAL_DIR = "eval"
BASE_EVAL = "base"
TUNED_EVAL = "tuned"
_RUN_FILES = ("recipe.yaml", "result.json")
_PARTIAL = re.compile(r"\.partial(-\d+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the embedded default model is converted from this checkpoint's GGUF (hf_attn_zoo.assets)
_DEFAULT_SOURCE = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
_OPTION_WIDTH = 60


@dataclass(frozen=True)
class _Base:
    """The model the patched one was made from: its hub id (metadata) when known, how the text names it, license."""

    repo_id: str | None
    label: str
    license: str | None = None


def is_own_card(path: str | os.PathLike) -> bool:
    """True when `path` is a README.md this package wrote (it carries `CARD_MARKER`)."""
    path = Path(path)
    return path.is_file() and CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")


def write_model_card(
    folder: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    run_dir: str | os.PathLike | None = None,
    eval_results: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write (or refresh) the model card `README.md` of a saved model folder; returns its path, or `None` when the
    folder holds a README.md that is not ours (left as it is, with a warning).

    Args:
        folder (`str | os.PathLike`): the folder the model was saved to (`save_pretrained`).
        model (`PreTrainedModel`, *optional*): the saved model; without it the figures come from `config.json`.
        repo_id (`str`, *optional*): the hub repository the card will live in (used in "How to load").
        base_model (`str`, *optional*): the hub id of the model it was made from, when the config does not say.
        run_dir (`str | os.PathLike`, *optional*): a `hf-attn-zoo tune` output folder whose run the card describes.
        eval_results (`Mapping[str, dict | path]`, *optional*): lm-eval results by column name (`"base"` first).
        overwrite (`bool`, *optional*, defaults to `False`): replace a README.md that is not ours.

    Example:
        >>> hf_attn_zoo.write_model_card("smollm2-moh")   # e.g. after adding smollm2-moh/eval/base/
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnknownModelError(
            f"{folder} holds no config.json, so it is not a saved model; save the model there first with "
            "model.save_pretrained(folder)."
        )
    card = folder / CARD_FILE
    if card.exists() and not overwrite and not is_own_card(card):
        logger.warning(
            "%s is not an hf-attn-zoo model card; left as it is (pass overwrite=True to replace it, or add the "
            "sections of hf_attn_zoo.render_model_card(...) yourself).",
            card,
        )
        return None
    text = render_model_card(
        folder, model, repo_id=repo_id, base_model=base_model, run_dir=run_dir, eval_results=eval_results
    )
    with atomic_output(card, overwrite=True, is_file=True, what="model card") as partial:
        partial.write_text(text, encoding="utf-8")
    return card


def write_card_or_warn(folder: str | os.PathLike, model: torch.nn.Module | None = None, **kwargs: Any) -> None:
    """`write_model_card`, but a failure is a warning: the card must never cost a save (or a tuning run) its model."""
    try:
        write_model_card(folder, model, **kwargs)
    except Exception as error:  # any failure; the model itself is saved
        logger.warning(
            "the model in %s is saved, but its model card was not written (%s: %s); write it with "
            "hf_attn_zoo.write_model_card(%r).",
            folder,
            type(error).__name__,
            error,
            str(folder),
        )


def render_model_card(
    folder: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    run_dir: str | os.PathLike | None = None,
    eval_results: Mapping[str, Any] | None = None,
    custom_generate: bool | None = None,
) -> str:
    """The model card text (YAML metadata + markdown) of the model saved in `folder`; see `write_model_card`.

    `custom_generate` says whether the repository carries SCMoE's `custom_generate/` folder (default: whether
    `folder` has one).
    """
    folder = Path(folder)
    if repo_id is not None and not _HUB_ID.match(repo_id):
        raise InvalidOptionError(f"repo_id={repo_id!r} is not a hub repository id; give it as 'namespace/name'.")
    if base_model is not None and not _HUB_ID.match(base_model):
        raise InvalidOptionError(
            f"base_model={base_model!r} is not a hub model id; give it as 'namespace/name' (e.g. "
            "'HuggingFaceTB/SmolLM2-135M'), or leave it out."
        )
    config = _config_dict(folder, model)
    records = list(config.get(RECORD_KEY) or [])
    run = Path(run_dir) if run_dir is not None else _run_dir_of(folder)
    if custom_generate is None:
        custom_generate = (folder / "custom_generate" / "generate.py").is_file()
    base = _resolve_base(folder, model, base_model)
    methods = list(dict.fromkeys(r["method"] for r in records))
    tags = ["hf-attn-zoo", *methods] + (["custom_generate"] if custom_generate else [])
    name = _PARTIAL.sub("", folder.name)  # a save into outputs.atomic_output's temporary sibling
    local = f"{folder.parent.name}/{name}" if name == "final" else name  # a tuning run's final/
    location = repo_id or f"./{local}"
    title = repo_id.split("/")[-1] if repo_id else local.split("/")[0]

    lines = [f"# {title}", "", _summary(base, records, config, run is not None), ""]
    lines += _patch_section(records, config) + _parameter_section(config, model)
    if run is not None:
        lines += _tuning_section(run)
    lines += _eval_section(_eval_columns(folder, run, eval_results))
    if custom_generate:
        lines += _scmoe_section(location)
    lines += _load_section(location, bool(records))
    lines += [f"*Card written by hf-attn-zoo {package_version()}.*", ""]
    return _front_matter(base, tags) + CARD_MARKER + "\n\n" + "\n".join(lines)


def _front_matter(base: _Base, tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="transformers",
        base_model=base.repo_id,
        license=base.license,
        pipeline_tag="text-generation",
        tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---\n\n"


def _config_dict(folder: Path, model: torch.nn.Module | None) -> dict[str, Any]:
    if model is not None:
        config: Any = inner_model(model).config
        return config.to_dict()
    path = folder / "config.json"
    if not path.is_file():
        raise UnknownModelError(f"{folder} holds no config.json; pass the model, or save it there first.")
    return json.loads(path.read_text(encoding="utf-8"))


def _run_dir_of(folder: Path) -> Path | None:
    """The tuning run whose `final/` this folder is, by `hf-attn-zoo tune`'s layout."""
    parent = folder.parent
    if _PARTIAL.sub("", folder.name) == "final" and all((parent / name).is_file() for name in _RUN_FILES):
        return parent
    return None


# --- the base model ---


def _card_metadata(path: Path) -> dict[str, Any]:
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # a malformed card only costs the license
        return {}


def _hub_card(repo_id: str) -> Path | None:
    """The README.md of a hub model, when it can be read (the hub cache offline); `None` otherwise."""
    from transformers.utils import cached_file

    try:
        found = cached_file(
            repo_id,
            CARD_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # no card (offline, gated, private): the base stays unlicensed
        return None
    return Path(found) if found else None


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def _from_card(card: Path | None, source: _Base) -> _Base:
    """`source`, with the license of its card; a card of ours names the base of the patched model instead."""
    if card is None or not card.is_file():
        return source
    meta = _card_metadata(card)
    if is_own_card(card):
        repo = _first(meta.get("base_model"))
        label = f"[`{repo}`](https://huggingface.co/{repo})" if repo else source.label
        return _Base(repo, label, _first(meta.get("license")))
    return _Base(source.repo_id, source.label, _first(meta.get("license")))


def _resolve_base(folder: Path, model: torch.nn.Module | None, base_model: str | None) -> _Base:
    if base_model is not None:
        return _from_card(
            _hub_card(base_model), _Base(base_model, f"[`{base_model}`](https://huggingface.co/{base_model})")
        )
    source = str(getattr(inner_model(model).config, "_name_or_path", "") or "") if model is not None else ""
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            from ..assets.model import DEFAULT_MODEL, cache_dir

            if path.resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve():
                repo, license_ = _DEFAULT_SOURCE
                label = f"[`{repo}`](https://huggingface.co/{repo}) (the embedded default model)"
                return _Base(repo, label, license_)
            if path.resolve() != folder.resolve():
                # a local folder: named by its last component only (a card is public, the path may not be)
                return _from_card(path / CARD_FILE, _Base(None, f"a local checkpoint (`{path.name}`)"))
        elif _HUB_ID.match(source):
            return _from_card(_hub_card(source), _Base(source, f"[`{source}`](https://huggingface.co/{source})"))
    if is_own_card(folder / CARD_FILE):  # a re-save, or a push without the model: the card already says
        return _from_card(folder / CARD_FILE, _Base(None, "a checkpoint of unrecorded origin"))
    return _Base(None, "a checkpoint of unrecorded origin")


# --- sections ---


def _summary(base: _Base, records: list[dict[str, Any]], config: dict[str, Any], tuned: bool) -> str:
    if not records:
        done = "continue-tuned with hf-attn-zoo" if tuned else "saved by hf-attn-zoo"
        return f"This is {base.label}, {done}; it is not patched (a plain transformers checkpoint)."
    methods = ", ".join(f"`{m}`" for m in dict.fromkeys(r["method"] for r in records))
    version = config.get(VERSION_KEY) or package_version()
    then = ", then continue-tuned" if tuned else ""
    return (
        f"This is {base.label} with its attention / Mixture-of-Experts blocks patched by hf-attn-zoo {version} "
        f"({methods}){then}. It loads with `hf_attn_zoo.from_pretrained` (see *How to load*)."
    )


def _paper(method: str) -> str:
    """The paper a method implements (`registry.patch_paper`, else its summary), arXiv ids linked."""
    from ..registry import PATCHES, patch_paper

    found = PATCHES.get(method)
    if found is None:
        return ""
    return link_arxiv(patch_paper(found) or found.summary)


def _option(name: str, value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    if len(text) > _OPTION_WIDTH:
        text = text[: _OPTION_WIDTH - 1] + "…"
    return f"`{name}={text}`"


def _patch_section(records: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    if not records:
        return []
    from ..planning.kernels import layer_ranges

    total = (config.get("text_config") or config).get("num_hidden_layers")

    lines = ["## What was patched", "", "| # | method | layers | options | paper |", "|---:|---|---|---|---|"]
    for index, record in enumerate(records):
        layers = record.get("layers") or []
        count = f"all {total}" if len(layers) == total else f"{len(layers)} of {total or '?'}"
        where = f"{layer_ranges(layers)} ({count})"
        options = ", ".join(_option(k, v) for k, v in sorted((record.get("options") or {}).items())) or "defaults"
        lines.append(f"| {index + 1} | `{record['method']}` | {where} | {options} | {_paper(record['method'])} |")
    lines += [
        "",
        f"The full options are recorded in `config.json` (`{RECORD_KEY}`); `hf_attn_zoo.from_pretrained` re-applies "
        "them, in this order, before it loads the weights.",
        "",
    ]
    return lines


def rebuild_on_meta(config: dict[str, Any], patched: bool = True) -> torch.nn.Module | None:
    """The model of a saved `config.json` on the meta device (nothing allocated), its recorded patches applied when
    `patched`; `None` when it cannot be built (the figures it gives are then left out)."""
    from transformers import AutoConfig

    from ..planning.models import build_meta

    dropped = {RECORD_KEY, VERSION_KEY, "attn_implementation"}
    data = {k: v for k, v in config.items() if not k.startswith("_") and k not in dropped}
    try:
        model = build_meta(AutoConfig.for_model(data.pop("model_type"), **data), "fp32")
        if patched and config.get(RECORD_KEY):
            plan = [{"method": r["method"], "layers": r["layers"], **r["options"]} for r in config[RECORD_KEY]]
            patch_plan(model, plan)
    except Exception as error:  # an unknown architecture, a patch not meta-safe ...
        logger.info("cannot rebuild the model on the meta device (%s: %s)", type(error).__name__, error)
        return None
    return model


def _numel(parameter: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 keeps only its partition here (`ds_numel`)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def _count(model: torch.nn.Module) -> int:
    return sum(_numel(p) for p in model.parameters())  # parameters() yields tied weights once


def _parameter_section(config: dict[str, Any], model: torch.nn.Module | None) -> list[str]:
    base_model = rebuild_on_meta(config, patched=False)
    patched_model = inner_model(model) if model is not None else rebuild_on_meta(config)
    if base_model is None or patched_model is None:
        return []
    base, total = _count(base_model), _count(patched_model)
    new = sum(_numel(p) for p in new_parameters(patched_model).values())
    change = total - base
    lines = ["## Parameters", "", "| | parameters |", "|---|---:|", f"| base model | {base:,} |"]
    if config.get(RECORD_KEY):
        share = f" ({change / base:+.2%})" if base else ""
        lines += [f"| patched | {total:,} |", f"| change | {change:+,}{share} |"]
        lines.append(f"| created by the patches | {new:,} |")
    return lines + [""]


def _tuning_section(run: Path) -> list[str]:
    import yaml

    recipe_text = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else ""
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        recipe = {}
    lines = ["## Tuning", ""]
    name = recipe.get("name") if isinstance(recipe, dict) else None
    description = recipe.get("description") if isinstance(recipe, dict) else None
    if name:
        lines += [f"Recipe `{name}`" + (f": {description}" if description else "."), ""]
    if result:
        facts = [f"{result.get('global_step', 0):,} optimizer steps"]
        facts.append(f"{result.get('train_tokens', 0):,} training tokens")
        if result.get("resumed_from"):
            facts[-1] += " (in the last invocation, which resumed an interrupted run)"
        if result.get("final_loss") is not None:
            facts.append(f"final training loss {result['final_loss']:.4f}")
        if result.get("eval_loss") is not None:
            facts.append(f"held-out loss {result['eval_loss']:.4f}")
        lines += ["Continue-tuned with `hf-attn-zoo tune`: " + ", ".join(facts) + ".", ""]
    if recipe_text:
        shown = yaml.safe_dump(_without_local_paths(recipe), sort_keys=False) if recipe else recipe_text
        lines += ["<details><summary>The recipe (recipe.yaml; local paths cut to their last part)</summary>", ""]
        lines += ["```yaml", shown.rstrip(), "```", "", "</details>", ""]
    return lines


def _without_local_paths(data: Any) -> Any:
    """The recipe with every absolute local path cut to `<local>/<last part>`: a card is public, paths may not be."""
    if isinstance(data, dict):
        return {key: _without_local_paths(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_without_local_paths(value) for value in data]
    if isinstance(data, str) and (os.path.isabs(data) or data.startswith("~")):
        return f"<local>/{Path(data).name}"
    return data


def _eval_columns(folder: Path, run: Path | None, eval_results: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    from ..eval_harness.report import load_results

    if eval_results is not None:
        return {name: load_results(source) for name, source in eval_results.items()}
    columns: dict[str, dict[str, Any]] = {}
    results_dir = folder / EVAL_DIR
    if results_dir.is_dir():
        names = sorted((p.name for p in results_dir.iterdir() if p.is_dir()), key=lambda n: (n != BASE_EVAL, n))
        for name in names:
            try:
                columns[name] = load_results(results_dir / name)
            except (FileNotFoundError, ValueError) as error:
                logger.warning("model card: %s left out of the eval table (%s)", results_dir / name, error)
    tuned = run / "eval_results.json" if run is not None else None
    if tuned is not None and tuned.is_file() and TUNED_EVAL not in columns:
        try:
            columns[TUNED_EVAL] = load_results(tuned)
        except ValueError as error:
            logger.warning("model card: %s left out of the eval table (%s)", tuned, error)
    return columns


def _eval_section(columns: dict[str, dict[str, Any]]) -> list[str]:
    from ..eval_harness.report import build_rows, score_table

    rows = build_rows(columns) if columns else []
    if not rows:
        return []
    lines = ["## Evaluation", "", *score_table(rows, list(columns), bold_best=False)]
    note = "lm-eval (`hf-attn-zoo eval`), mean ± standard error"
    if BASE_EVAL in columns:
        note += f"; `{BASE_EVAL}` is the unpatched base model on the same tasks"
    return lines + ["", note + ".", ""]


def _scmoe_section(location: str) -> list[str]:
    from ..decoding import DECODING_METHODS

    return [
        "## SCMoE decoding (`custom_generate`)",
        "",
        "The repository carries `custom_generate/` (transformers' convention for custom decoding methods): SCMoE "
        f"self-contrast decoding, from {link_arxiv(DECODING_METHODS['scmoe'].paper)}.",
        "",
        "```python",
        f'out = model.generate(**inputs, custom_generate="{location}", trust_remote_code=True, beta=0.5, '
        "max_new_tokens=64)",
        "```",
        "",
        "`trust_remote_code=True` opts into running `custom_generate/generate.py`, a thin call into "
        "`hf_attn_zoo.decoding.scmoe_decode` (its `requirements.txt` asks for hf-attn-zoo); the model itself loads "
        "without remote code.",
        "",
    ]


def _load_section(location: str, patched: bool) -> list[str]:
    if not patched:
        return [
            "## How to load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
            "```",
            "",
        ]
    return [
        "## How to load",
        "",
        "```bash",
        "pip install hf-attn-zoo",
        "```",
        "",
        "```python",
        "import hf_attn_zoo",
        "from transformers import AutoTokenizer",
        "",
        "# re-applies the recorded patches, then loads their weights",
        f'model = hf_attn_zoo.from_pretrained("{location}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        "```",
        "",
        "Plain `transformers.AutoModelForCausalLM.from_pretrained` refuses this checkpoint on purpose: its config "
        f"names the attention implementation `{PATCHED_ATTENTION}`, so the patched model never runs silently as "
        'the dense one (pass `attn_implementation="sdpa"` to load only the dense weights, without the patches). No '
        "remote code is needed.",
        "",
    ]
