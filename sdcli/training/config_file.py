"""`sdcli finetune --config FILE`: a run's settings from a TOML or YAML file, or from a run's training_settings.json.

Every key is one of `FinetuneConfig`'s settings, by its name (``learning_rate``), as its flag spells it
(``learning-rate``) or by another of its long flags (``lr``), with the type its declaration gives it
(`sdcli.declare.from_file_values`); the values then go through the same checks as the flags', so a file
and the command line cannot disagree about what a setting is. Flags typed on the command line win over
the file. Datasets may come as a list of tables, as kohya's dataset config has them:

    [[datasets]]
    folder = "photos"          # or image_dir, kohya's name
    repeats = 3                # or num_repeats
    caption_extension = ".caption"

Paths are read as the command line reads them, from the current folder. A training_settings.json
replays its run: its ``config`` is the settings it ran with (its ``resume`` aside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdcli.declare import file_keys, from_file_values, nearest_key
from sdcli.errors import UsageError
from sdcli.training.config import FinetuneConfig

# What a dataset table holds: its folder and repeat count, and settings sdcli reads once for every folder
# (so every table that gives one must agree on it).
DATASET_ALIASES = {"image_dir": "folder", "num_repeats": "repeats"}
SHARED = ("caption_extension", "caption_column", "resolution", "class_data", "class_prompt", "num_class_images",
          "prior_loss_weight", "masks", "alpha_mask", "unmasked_weight", "allow_empty_captions")
SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read(path: Path | str) -> dict[str, Any]:
    """The settings ``path`` gives, by FinetuneConfig field name; a UsageError in one line for a file that
    cannot be read, an unknown key (naming the nearest), or a value of the wrong type."""
    path = Path(path).expanduser()
    where = f"--config {path}"
    if not path.is_file():
        raise UsageError(f"{where} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"{where}: a settings file is .toml, .yaml/.yml, or a run's training_settings.json")
    raw = _parse(path, where)
    if not isinstance(raw, dict):
        raise UsageError(f"{where} holds a {type(raw).__name__}, not a table of settings")
    if path.suffix.lower() == ".json" and isinstance(raw.get("config"), dict) and "sdcli_version" in raw:
        # A run's record: the settings it ran with. Its resume said where that run started, not this one.
        raw = {k: v for k, v in raw["config"].items() if k != "resume"}
    values = dict(raw)
    if "datasets" in values:
        values = _datasets(values, where)
    return from_file_values(FinetuneConfig, values, where)


def _parse(path: Path, where: str) -> Any:
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{where}: YAML needs PyYAML, which is not installed (pip install pyyaml); "
                             "or write it as TOML") from None
        return yaml.safe_load(text)
    except UsageError:
        raise
    except Exception as exc:  # each parser's own error class; its message says the line
        message = " ".join(str(exc).split())
        raise UsageError(f"{where} is not valid {suffix.lstrip('.').upper()}: {message}") from None


def _datasets(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``datasets`` tables folded into the settings: their folders (with repeats) as ``data``, and the
    shared settings they give, which must agree with each other and with the top level."""
    tables = values.pop("datasets")
    if "data" in values:
        raise UsageError(f"{where}: give data or [[datasets]], not both")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{where}: datasets must be a list of tables ([[datasets]] with a folder each)")
    keys = file_keys(FinetuneConfig)
    top = {keys.get(str(k).replace("-", "_"), k): k for k in values}  # field -> the key the top level used
    shared: dict[str, tuple[Any, str]] = {}
    data = []
    for number, table in enumerate(tables, 1):
        here = f"{where}: datasets[{number}]"
        table = {DATASET_ALIASES.get(k, k): v for k, v in table.items()}
        folder, repeats = table.pop("folder", None), table.pop("repeats", 1)
        if not isinstance(folder, str) or not folder:
            raise UsageError(f"{here} needs folder, the folder of its images (a string)")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise UsageError(f"{here}: repeats must be a whole number of at least 1, got {repeats!r}")
        data.append(folder if repeats == 1 else f"{folder}:{repeats}")
        for key, value in table.items():
            name = keys.get(str(key).replace("-", "_"))
            if name not in SHARED:
                known = ["folder", "repeats", *SHARED]
                raise UsageError(f"{here}: unknown dataset key {key!r}{nearest_key(key, known)}"
                                 + ("; it is set for the whole run, at the top level" if name else ""))
            if name in top and values[top[name]] != value:
                raise UsageError(f"{here}: {key} {value!r} differs from the top level's {values[top[name]]!r}; "
                                 f"sdcli reads one {name} for every folder")
            if name in shared and shared[name][0] != value:
                raise UsageError(f"{here}: {key} {value!r} differs from {shared[name][1]}'s {shared[name][0]!r}; "
                                 f"sdcli reads one {name} for every folder")
            shared[name] = (value, f"datasets[{number}]")
    for name, (value, _) in shared.items():
        if name not in top:
            values[name] = value
    values["data"] = data
    return values


def merge(given: dict[str, Any], from_file: dict[str, Any], typed: set[str]) -> dict[str, Any]:
    """The settings a run takes: the file's, except where a flag was typed on the command line (``typed``);
    what neither sets keeps the command line's default."""
    merged = {k: v for k, v in given.items() if k in typed or k not in from_file}
    merged.update({k: v for k, v in from_file.items() if k not in typed})
    return merged


def effective(cfg: FinetuneConfig) -> str:
    """``cfg`` as the TOML --config reads back (what --print-config writes): every setting that has a value."""
    from sdcli.declare import toml_text

    record = cfg.to_json()
    return toml_text({k: v for k, v in record.items() if v is not None and v != [] or k == "data"})
