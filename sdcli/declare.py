"""Declare a setting once; its command-line option, record and replay are derived from that.

diffusers' `register_to_config` makes every config argument round-trip to JSON by
construction. This is the same idea for our settings objects: each field of a
settings dataclass carries an `Opt` (help, flags, role) in its metadata, so its
name, type and default are written once, in the dataclass, and

- `command(cls, body)` builds the Typer command whose options are those fields;
- `Role` says what a field is: recorded with an image and replayed, runtime only,
  or a sweep axis (a comma list on the command line, one value per image);
- `record_fields(cls)` / `replay(cls, record)` are what a record holds and reads back.

Only Typer and the standard library are imported here, so `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from enum import Enum
from typing import Annotated, Any, Callable, Mapping, Optional

import typer


class Role(str, Enum):
    RECORDED = "recorded"  # decides what is made: stored with the output, replayed by --from-metadata
    RUNTIME = "runtime"  # how a run executes (device, batch size, memory): always the command line's
    SWEEP = "sweep"  # a comma list on the command line; each output records its one value


@dataclasses.dataclass(frozen=True)
class Opt:
    """How one setting appears to users. The name, type and default come from the dataclass field."""

    help: str
    flags: tuple[str, ...] = ()  # default: --name-with-dashes
    role: Role = Role.RECORDED
    cli_type: Any = None  # what Typer parses when it differs from the field (comma lists: str; choices: an Enum)
    parse: Callable[[Any], Any] | None = None  # command-line value -> setting value
    record: str | None = None  # key in an output's record (default: the field name)
    task: str | tuple[str, ...] | None = None  # the generation task(s) that use it; recorded only when one runs
    to_record: Callable[[Any], Any] | None = None  # setting value -> JSON, where they differ
    from_record: Callable[[Any], Any] | None = None  # JSON -> setting value
    a1111: str | None = None  # key in AUTOMATIC1111's `parameters` line, where it has one
    to_a1111: Callable[[Any], Any] | None = None  # recorded JSON -> AUTOMATIC1111's text (None: not written)
    unrecorded: Any = None  # what a record made before this setting existed implies (None: the default)
    label: str = ""  # short tag in file names and contact sheets for a sweep axis (g7.5)
    argument: bool = False  # a positional argument instead of an --option
    panel: str | None = None  # --help section
    envvar: str | None = None
    show_default: bool | str = True
    range: "Range | None" = None  # the numbers it may take (finite always); checked by `check_ranges`
    at_load: bool = False  # decided when the model loads (device, dtype, compile), not by each request

    def replace(self, **changes: Any) -> "Opt":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a setting may take: always a finite number, and between ``low`` and ``high`` (None: no
    bound on that side), each end included unless ``open`` names it ("low", "high").

    A value past a bound is refused before any work, naming the option: NaN, inf and 1e308 otherwise
    pass every `x > 0` test and only fail much later, as NaN weights or a killed process.
    """

    low: float | None = None
    high: float | None = None
    open: tuple[str, ...] = ()
    why: str = ""  # what the bound stands for, said with the refusal

    def describe(self) -> str:
        """What a value must do, as "be positive", "not be negative", "be between 0 and 1", ..."""
        low, high, lo_open, hi_open = self.low, self.high, "low" in self.open, "high" in self.open
        if low is not None and high is not None and lo_open == hi_open:
            return f"be between {_num(low)} and {_num(high)}"
        parts = []
        if low is not None:
            parts.append("positive" if low == 0 and lo_open else f"{'greater than' if lo_open else 'at least'} {_num(low)}")
        if high is not None:
            parts.append(f"{'less than' if hi_open else 'at most'} {_num(high)}")
        if parts == ["at least 0"]:
            return "not be negative"
        return "be " + " and ".join(parts) if parts else "be a finite number"

    def check(self, flag: str, value: Any, setting: str | None = None) -> None:
        """Raise UsageError naming ``flag`` (and, as its ``setting``, the field) unless ``value`` is a finite
        number within the range."""
        from sdcli.errors import UsageError

        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{flag} must be a number, got {value!r}", setting=setting)
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf if value > 0 else -math.inf
        if not math.isfinite(number):
            raise UsageError(f"{flag} must be a finite number, got {value}", setting=setting)
        if isinstance(value, int):
            number = value  # compared exactly: as a float, 2^63 - 1 rounds up past a bound of 2^63 - 1
        low, high = self.low, self.high
        fits = ((low is None or (number > low if "low" in self.open else number >= low))
                and (high is None or (number < high if "high" in self.open else number <= high)))
        if not fits:
            why = f" ({self.why})" if self.why else ""
            raise UsageError(f"{flag} must {self.describe()}{why}, got {_num(value)}", setting=setting)


def _num(x: float) -> str:
    """A bound or value as a person writes it: whole numbers whole (2^63 - 1 too), others short (1.75194, 1e+308)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def numbers_in(flag: str, value: Any) -> list[tuple[str, Any]]:
    """(how to name it, value) for every number a setting's value holds: the value itself, each item of a list
    (a sweep's "1,3,7.5"), and the scale of each (path, scale) pair, named ``--lora PATH:SCALE`` as typed.

    None is "not given" and holds nothing; anything else that is not a list is returned as it is, for
    `Range.check` to refuse when it is not a number.
    """
    if value is None:
        return []
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return [(f"{flag} {value[0]}:SCALE", value[1])]
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in numbers_in(flag, item)]
    return [(flag, value)]


_FINITE = Range()


def check_ranges(obj: Any) -> None:
    """Check every number of every declared field of a settings object against its declared `Range` (each
    list item, each (path, scale)'s scale too); a number in a field that declares none must still be finite."""
    for d in declared(type(obj)):
        for what, item in numbers_in(d.flag, getattr(obj, d.name)):
            if d.opt.range is not None:
                d.opt.range.check(what, item, d.name)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                _FINITE.check(what, item, d.name)


def check_setting(cls: type, name: str, value: Any) -> None:
    """Check one value against the `Range` declared for ``cls``'s field ``name``: another command taking the
    same option (inspect-schedule's --mode-scale) refuses what the declaring one refuses."""
    d = next(d for d in declared(cls) if d.name == name)
    if d.opt.range is not None:
        for what, item in numbers_in(d.flag, value):
            d.opt.range.check(what, item, name)


def option(default: Any = dataclasses.MISSING, opt: Opt | None = None, /, **kw: Any) -> Any:
    """A dataclass field declared with its option: ``steps: int = option(25, help="Denoising steps.")``.

    ``opt`` is a shared declaration (sdcli.options.MODEL, ...) that ``kw`` may adjust.
    """
    spec = opt.replace(**kw) if opt is not None else Opt(**kw)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"opt": spec})
    return dataclasses.field(default=default, metadata={"opt": spec})


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared field: the dataclass field and its Opt, with what follows from them."""

    field: dataclasses.Field
    opt: Opt
    type: Any  # the field's annotation, resolved

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            return f.default_factory()  # type: ignore[misc]
        return dataclasses.MISSING

    @property
    def tasks(self) -> tuple[str, ...]:
        """The generation tasks this setting belongs to; empty for one every task records."""
        task = self.opt.task
        return (task,) if isinstance(task, str) else tuple(task or ())

    @property
    def record_key(self) -> str:
        return self.opt.record or self.name

    @property
    def flag(self) -> str:
        return self.opt.flags[0] if self.opt.flags else "--" + self.name.replace("_", "-")


def declared(cls: type) -> list[Declared]:
    """The declared fields of a settings dataclass, in declaration order."""
    return list(_declared(cls))


@functools.lru_cache(maxsize=None)
def _declared(cls: type) -> tuple[Declared, ...]:
    # Resolving the type hints costs milliseconds, and every image's record asks again: once per class.
    hints = typing.get_type_hints(cls)
    return tuple(Declared(f, f.metadata["opt"], hints[f.name]) for f in dataclasses.fields(cls) if "opt" in f.metadata)


def flags_of(cls: type) -> dict[str, tuple[str, ...]]:
    """Each declared setting's command-line flags, the one messages use first: {"guidance": ("--guidance", "-g")};
    none for a positional argument (the prompts)."""
    return {d.name: () if d.opt.argument else tuple(dict.fromkeys((d.flag, *d.opt.flags))) for d in declared(cls)}


def setting_of(cls: type, flag: str) -> str | None:
    """The declared setting of ``cls`` a flag belongs to ("--guidance" or "-g" -> "guidance"); what follows
    the flag is ignored ("--hires-upscaler latent"). None for a flag no setting declares."""
    word = flag.split()[0] if flag.split() else flag
    return next((name for name, flags in flags_of(cls).items() if word in flags), None)


def by_role(cls: type, *roles: Role) -> list[Declared]:
    return [d for d in declared(cls) if d.opt.role in roles]


# ---------------------------------------------------------------- the command line


def _cli_type(d: Declared) -> Any:
    return d.opt.cli_type if d.opt.cli_type is not None else d.type


def parameter(d: Declared, optional: bool = False) -> inspect.Parameter:
    """The Typer parameter of a declared field, its default the declared one as the command line spells it;
    ``optional``: not required on the command line even without a default (a settings file may give it)."""
    o = d.opt
    cli_type = _cli_type(d)
    kwargs: dict[str, Any] = {"help": o.help, "show_default": o.show_default}
    if o.panel:
        kwargs["rich_help_panel"] = o.panel
    if o.argument:
        info = typer.Argument(**kwargs)
    else:
        if o.envvar:
            kwargs.update(envvar=o.envvar, show_envvar=False)
        info = typer.Option(*(o.flags or (d.flag,)), **kwargs)
    if d.default is dataclasses.MISSING and not optional:  # required: Typer says so before anything runs
        default: Any = inspect.Parameter.empty
    elif d.default is dataclasses.MISSING:
        default = None
    else:
        default = _spelled(d.default, cli_type)
    if default is None:
        cli_type = Optional[cli_type]
    return inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[cli_type, info])


def _spelled(default: Any, cli_type: Any) -> Any:
    """A declared default as the command line gives it: choices as the Enum, a list of numbers as "1,2"."""
    if isinstance(cli_type, type) and issubclass(cli_type, Enum) and default is not None:
        return cli_type(default)
    if isinstance(default, (list, tuple)):
        if not default or cli_type is not str:
            return None
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return default


def from_cli(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Setting values from what Typer parsed: parsed, enums as their values, unset options left out."""
    out = {}
    for d in declared(cls):
        if d.name not in values or values[d.name] is None:
            continue
        value = values[d.name]
        if d.opt.parse is not None:
            from sdcli.errors import SdcliError, about

            try:
                value = d.opt.parse(value)
            except SdcliError as exc:  # a parser names the flag it reads; the error says which setting that is
                raise about(exc, d.name)
        elif isinstance(value, Enum):
            value = value.value
        out[d.name] = value
    return out


def command(cls: type, body: Callable[..., Any], *, exclude: tuple[str, ...] = (),
            optional: tuple[str, ...] = ()) -> Callable[..., Any]:
    """A Typer command taking ``body``'s own parameters plus every option declared on ``cls``.

    ``body`` receives its own parameters by name and the declared ones, parsed, as ``values``
    (only those given); ``body`` must take ``values`` as a keyword. The ``optional`` ones are not
    required on the command line even without a default: ``body`` sees to them (a settings file gives them).
    """
    own = [p for name, p in inspect.signature(body, eval_str=True).parameters.items() if name != "values"]
    first = [p for p in own if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name == "ctx"]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in first]
    decl = [d for d in declared(cls) if d.name not in exclude]
    arguments = [parameter(d) for d in decl if d.opt.argument]
    options = [parameter(d, d.name in optional) for d in decl if not d.opt.argument]
    names = {d.name for d in decl}

    def run(*args: Any, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return body(*args, **kwargs, values=from_cli(cls, given))

    run.__signature__ = inspect.Signature(first + arguments + options + rest)  # type: ignore[attr-defined]
    run.__doc__ = body.__doc__
    run.__name__ = body.__name__
    return run


def given_on_command_line(ctx: Any, names: list[str]) -> set[str]:
    """Which of ``names`` the user typed (not defaults, not environment variables)."""
    return {n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}


def worded(exc: BaseException, names: Mapping[str, str], *declaring: type) -> str:
    """``exc``'s message as a front-end other than the CLI says it: every command-line flag of a setting
    in ``names`` (setting -> the front-end's name for it, {"guidance": "cfg_scale"}) replaced by that name.

    The flags are the declarations' of the settings classes ``declaring`` (`flags_of`), long and short
    (--guidance, -g), matched as whole options (--guidance is not the start of --guidance-rescale); a flag
    of a setting ``names`` leaves out, and any other text, is kept as it is.
    """
    spelled = {flag: names[name] for cls in declaring for name, flags in flags_of(cls).items() if name in names
               for flag in flags}
    text = str(exc)
    if not spelled:
        return text
    longest_first = sorted(spelled, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, longest_first)) + r")(?![\w-])")
    return pattern.sub(lambda m: spelled[m.group(1)], text)


# ---------------------------------------------------------------- settings files


def file_keys(cls: type) -> dict[str, str]:
    """The keys a settings file (``--config``) may use for each declared field, mapped to the field: its name
    (``learning_rate``), as the flag spells it (``learning-rate``), and each other long flag (``lr``,
    ``validation_prompt``; ``--center-crop/--random-crop`` gives ``center_crop``)."""
    keys: dict[str, str] = {}
    for d in declared(cls):
        if d.opt.argument:
            continue
        spelled = [d.name] + [f.split("/")[0].lstrip("-") for f in (d.opt.flags or (d.flag,))
                              if f.split("/")[0].startswith("--")]
        for key in spelled:
            keys.setdefault(key.replace("-", "_"), d.name)
    return keys


def nearest_key(key: str, known: Any) -> str:
    """`` (did you mean 'x'?)`` for the known key nearest ``key`` (difflib), or nothing when none is near."""
    import difflib

    close = difflib.get_close_matches(str(key).replace("-", "_"), list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_file_values(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Setting values of ``cls`` from a settings file's ``values`` (parsed TOML, YAML or JSON), by field name.

    The keys and types come from the declarations, as the command line's do: an unknown key is a UsageError
    naming the nearest known one; a value of the wrong type one naming the key and the type it needs. A
    string where the command line takes a string parses as the flag's value does ("to_q,to_k"); None (JSON's
    null) is "not set". The ranges and the rest are the settings object's own checks, run afterwards.
    """
    from sdcli.errors import UsageError

    keys, by_name = file_keys(cls), {d.name: d for d in declared(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = keys.get(str(key).replace("-", "_"))
        if name is None:
            raise UsageError(f"{where}: unknown key {key!r}{nearest_key(key, by_name)}")
        if name in out:
            raise UsageError(f"{where}: {key!r} sets {name}, which another key already set")
        if value is None:
            continue
        out[name] = _file_value(by_name[name], value, f"{where}: {key}")
    return out


def _file_value(d: Declared, value: Any, label: str) -> Any:
    from sdcli.errors import SdcliError, UsageError, about

    cli_type = _cli_type(d)
    if d.opt.parse is not None and isinstance(value, str) and cli_type is str:
        try:
            return d.opt.parse(value)
        except SdcliError as exc:
            raise about(exc, d.name)
    if isinstance(cli_type, type) and issubclass(cli_type, Enum):
        choices = [c.value for c in cli_type]
        if value not in choices:
            raise UsageError(f"{label} must be one of {', '.join(map(repr, choices))}, got {value!r}", setting=d.name)
        return value
    typed = _as_type(d.type, value)
    if typed is _WRONG:
        raise UsageError(f"{label} must be {_type_words(d.type)}, got {type(value).__name__} {value!r}",
                         setting=d.name)
    return typed


_WRONG = object()


def _as_type(annotation: Any, value: Any) -> Any:
    """``value`` as ``annotation`` wants it (an int where a float goes, a string where a path goes, a list
    where a tuple goes), or _WRONG."""
    from pathlib import Path

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in (a for a in args if a is not type(None)):
            typed = _as_type(arg, value)
            if typed is not _WRONG:
                return typed
        return _WRONG
    if origin in (list, tuple):
        items = [value] if isinstance(value, str) and origin is list else value
        if not isinstance(items, (list, tuple)):
            return _WRONG
        typed = [_as_type(args[0] if args else Any, v) for v in items]
        return _WRONG if _WRONG in typed else (tuple(typed) if origin is tuple else typed)
    if annotation is Any:
        return value
    if annotation is bool:
        return value if isinstance(value, bool) else _WRONG
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if annotation is str:
        return value if isinstance(value, str) else _WRONG
    if annotation is Path:
        return Path(value) if isinstance(value, str) else _WRONG
    return value


def _type_words(annotation: Any) -> str:
    """A type as a sentence says it: "a whole number", "a list of strings", ..."""
    from pathlib import Path

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return f"a list of {_type_words(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if args and origin is not None:
        return " or ".join(_type_words(a) for a in args)
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path (a string)"}.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


def toml_text(values: dict[str, Any], tables: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """``values`` (strings, numbers, booleans, paths and lists of them; None left out, as TOML has no null)
    as TOML, then each of ``tables`` as an array of tables. tomllib reads it back to the same values."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None]
    for name, rows in (tables or {}).items():
        for row in rows:
            lines += ["", f"[[{name}]]"] + [f"{key} = {_toml_value(v)}" for key, v in row.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's string escapes (\" \\ \n \uXXXX ...) are TOML's basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)
