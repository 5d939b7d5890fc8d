"""Typed job configs: one dataclass per job, read from TOML, overridden from the command line.

Every job module defines ``Config`` (a dataclass, nested dataclasses for TOML tables) and
``run(cfg)``. This module turns ``--config X.toml --key value --table.key value`` into a
``Config`` with the same rules for both sources: unknown keys and wrong types are errors that
name the key and where it came from, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

__all__ = ["ConfigError", "from_dict", "parse_args", "to_dict", "to_toml", "save", "redact",
           "absolute_paths"]

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|credential|api_?key)", re.I)
# scheme://userinfo@: a user:password, whose password may hold "/" (AWS secret keys do) and "@"
# (users paste them unencoded), so it runs to the LAST "@" of the URL (of its run of characters
# up to a space or a quote: too much hidden beats part of a secret shown); or a userinfo without
# ":" or "/" (a token). A path's "@" (s3://bucket/a@b) is left alone. The lookbehind: a scheme
# starts a word, so a long run of letters is not tried at each of its positions, which is
# quadratic; every line a worker prints passes through this.
_URL_USERINFO = re.compile(
    r"(?<![\w+.-])(?P<scheme>[a-zA-Z][\w+.-]*://)(?:[^:/@\s]*:[^\s'\"]*|[^/@\s]+)@")


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type. The message names key and source.

    The message is redacted as it is made: it quotes the value at fault, and a URL's
    ``user:password@`` would otherwise reach the terminal, a Ray job's log or a traceback.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(redact(str(message)))


def _shown(value: Any, key: str = "") -> str:
    """A value as an error message quotes it: repr'd, secrets redacted (see :func:`redact`)."""
    return repr(redact(value, key))


# ----------------------------------------------------------------------------- type coercion


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if _origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    opt, inner = _is_optional(tp)
    if opt:
        return f"{_type_name(inner)} or none"
    if _origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _from_text(text: str, tp: Any, key: str, source: str) -> Any:
    """Coerce a command-line string to ``tp``."""
    opt, inner = _is_optional(tp)
    if opt:
        if text.lower() in ("none", "null", ""):
            return None
        return _from_text(text, inner, key, source)
    if tp is str:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: key '{key}' expects true/false, got {_shown(text, key)}")
    if _origin(tp) in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{source}: key '{key}' expects a list, got {_shown(text, key)} "
                                  f"({exc})") from None
            return _check(value, tp, key, source)
        items = [t.strip() for t in stripped.split(",") if t.strip()]
        return [_from_text(t, item_tp, key, source) for t in items]
    if tp in (int, float) or _origin(tp) is Literal:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        return _check(value, tp, key, source)
    return _check(text, tp, key, source)


def _check(value: Any, tp: Any, key: str, source: str, cli: frozenset = frozenset()) -> Any:
    """Check (and losslessly convert) a TOML/JSON value against ``tp`` (``cli``: see from_dict)."""
    opt, inner = _is_optional(tp)
    if opt:
        return None if value is None else _check(value, inner, key, source, cli)
    bad = ConfigError(
        f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {_shown(value, key)}"
    )
    if tp is Any:
        return value
    if _origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if _origin(tp) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return [_check(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if _origin(tp) is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, source, prefix=key + ".", cli=cli)
    raise ConfigError(f"{source}: key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


# ----------------------------------------------------------------------------- dataclass <-> dict


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "",
              cli: frozenset = frozenset()) -> Any:
    """Build ``cls`` from a nested dict, strictly: every key must be a field of the right type.

    ``cli`` holds the dotted keys whose values came from the command line (the rest from
    ``source``): a ``validate()`` error about one of them names the command line, not the file.
    """
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys: {known})")
        kwargs[key] = _check(value, fields[key][1], prefix + key, source, cli)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{source}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{_blame(str(exc), list(fields), prefix, source, cli)}: {exc}") from None
    return obj


def _named_keys(message: str, names: list[str], prefix: str) -> list[str]:
    """The fields a validate() message is about: those it quotes as ``key 'X'`` (the convention),
    else those it names as a word ("image_size must be >= 16")."""
    quoted = {q.removeprefix(prefix) for q in re.findall(r"key '([\w.-]+)'", message)}
    named = [n for n in names if n in quoted]
    return named or [n for n in names
                     if re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", message)]


def _blame(message: str, names: list[str], prefix: str, source: str, cli: frozenset) -> str:
    """Where the value a validate() error is about came from: ``--KEY on the command line`` for
    keys set there (a user who typed ``--n_train 0`` is not sent to look in the TOML file),
    both when the error names keys from either place, else ``source``."""
    named = _named_keys(message, names, prefix)
    flags = [f"--{prefix}{n}" for n in named if prefix + n in cli]
    if not flags:
        return source
    where = ", ".join(flags) + " on the command line"
    if len(flags) < len(named) and source != "command line":
        where = f"{source} and {where}"
    return where


def to_dict(cfg: Any) -> dict:
    """The config as plain TOML/JSON-able data (nested dicts for nested dataclasses)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: '{dotted}' sets a key inside '{p}', which is not a table")
    node[leaf] = value


def _field_type(cls: type, dotted: str, source: str) -> Any:
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        _, tp = _is_optional(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: unknown key '{dotted}' ('{'.'.join(walked)}' is not a table)")
        fields = _fields(tp)
        if part not in fields:
            prefix = ".".join(walked + [""]) if walked else ""
            known = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"{source}: unknown key '{dotted}' (known keys: {known})")
        tp = fields[part][1]
        walked.append(part)
    return tp


def _usage(cls: type, prog: str) -> str:
    lines = [f"usage: {prog} [--config FILE.toml] [--KEY VALUE ...]", "", "keys (default):"]

    def walk(tp: type, prefix: str, default_obj: Any) -> None:
        for name, (f, ftp) in _fields(tp).items():
            _, inner = _is_optional(ftp)
            default = getattr(default_obj, name, dataclasses.MISSING) if default_obj is not None else None
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{name}.", default)
                continue
            doc = f.metadata.get("help", "")
            shown = "REQUIRED" if default is dataclasses.MISSING else json.dumps(default)
            lines.append(f"  --{prefix}{name} <{_type_name(ftp)}> ({shown})  {doc}".rstrip())

    try:
        default_obj = cls()
    except TypeError:
        default_obj = None
    walk(cls, "", default_obj)
    return "\n".join(lines)


def parse_args(cls: type, argv: list[str], prog: str = "galaxysae", preprocess=None) -> Any:
    """``--config FILE`` then ``--key value`` overrides (dotted for nested tables) -> ``cls``.

    ``preprocess(data, path)`` may translate a foreign TOML layout into this config's layout
    before the strict check (used to accept the research code's original configs).
    """
    if "-h" in argv or "--help" in argv:
        print((cls.__doc__ or "").strip() + "\n\n" + _usage(cls, prog))
        raise SystemExit(0)
    data: dict = {}
    source = "command line"
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {_shown(arg)} (expected --key value)")
        key, eq, inline = arg[2:].partition("=")
        if key == "config":
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise ConfigError("command line: --config needs a file path")
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"command line: config file {value} does not exist")
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{value}: not valid TOML ({exc})") from None
            if preprocess is not None:
                data = preprocess(data, value)
            source = value
            i += 1 if eq else 2
            continue
        key = key.replace("-", "_")
        tp = _field_type(cls, key, "command line")
        _, inner = _is_optional(tp)
        if eq:
            text = inline
            i += 1
        elif inner is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            text = "true"
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{key} needs a value")
            text = argv[i + 1]
            i += 2
        overrides.append((key, _from_text(text, tp, key, "command line")))
    for key, value in overrides:
        _set_dotted(data, key, value)
    return from_dict(cls, data, source, cli=frozenset(key for key, _ in overrides))


# ----------------------------------------------------------------------------- writing


def redact(value: Any, key: str = "") -> Any:
    """Strip secrets from config data: secret-looking keys and user:password@ in URLs."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key and _SECRET_KEY.search(key) and value:
            return "***"
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    return value


# environment variables whose values are credentials: never printed, whatever message quotes them
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "RAY_AUTH_TOKEN")


def listed(items, sep: str = "; ", limit: int = 10) -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, and how many more there are: what an
    error message quotes of a long list (changed files, stray shards)."""
    items = [str(i) for i in items]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def redact_text(text: str) -> str:
    """Free text (a log line, a traceback) with URL credentials and the values of the
    credential variables of :data:`SECRET_ENV` replaced by ``***``: what a library's exception
    may quote (an s3fs error naming a URL with user:password@, a request echoing a token)."""
    text = redact(text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:  # a short value would blank out common words
            text = text.replace(value, "***")
    return text


def _toml_string(v: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, but not all of JSON: ``ensure_ascii``
    would write a character beyond the BMP (an emoji) as a surrogate pair, which TOML rejects,
    so non-ASCII stays as it is (the file is UTF-8); TOML also wants DEL escaped, JSON does not."""
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict) -> str:
    """A small TOML writer for config data (scalars, lists, nested tables; None is omitted)."""
    out: list[str] = []

    def table(d: dict, name: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if name and scalars:
            out.append(f"\n[{name}]")
        for k, v in scalars.items():
            out.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            table(v, f"{name}.{k}" if name else k)

    table(data, "")
    return "\n".join(out).lstrip("\n") + "\n"


def save(cfg: Any, url: str, name: str = "config.toml") -> str:
    """Write the resolved, redacted config as TOML beside an output (local dir or s3:// prefix)."""
    from galaxysae import storage

    target = storage.join(url, name)
    text = to_toml(redact(to_dict(cfg)))
    storage.write_bytes(target, text.encode())
    return target


# `ray job submit` runs its entrypoint in Ray's unpacked copy of the uploaded working dir, e.g.
# /tmp/ray/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/: a cache that Ray
# deletes, and a new one whenever the checkout changes.
_RAY_WORKING_DIR_COPY = "/runtime_resources/working_dir_files/"


def absolute_paths(cfg: Any, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> Any:
    """A copy of ``cfg`` whose local paths in the named keys are absolute (URLs and "" stay).

    Ray Train and Tune workers run in directories of their own, so a relative path means
    another place on every worker; resolved on the driver it means the same place everywhere.
    A relative *output* is refused when the job runs in a `ray job submit` copy of the working
    dir: written there, it would be deleted with Ray's cache and not found by a rerun.
    """
    from galaxysae import storage

    cwd = os.getcwd()

    def resolve(key: str, value: str) -> str:
        if not value or storage.is_remote(value):
            return value
        path = storage.local_path(value)
        if key in outputs and not os.path.isabs(path) and _RAY_WORKING_DIR_COPY in cwd + "/":
            raise ConfigError(
                f"'{key}' = {_shown(value, key)} is a relative path, and this job runs in Ray's temporary copy "
                f"of the uploaded working dir ({cwd}), which Ray deletes: give an s3:// URL or an "
                "absolute path on storage that every node of the cluster sees")
        return os.path.abspath(path)

    changes = {}
    for key in inputs + outputs:
        value = getattr(cfg, key)
        changes[key] = [resolve(key, v) for v in value] if isinstance(value, list) else resolve(key, value)
    return dataclasses.replace(cfg, **changes)


def exit_on_error(exc: ConfigError) -> typing.NoReturn:
    """Print the error and exit 2. Redacted once more here: the last place before the terminal
    (and a job's log) where a credential in a URL quoted by some message can be caught."""
    print(f"galaxysae: config error: {redact_text(str(exc))}", file=sys.stderr)
    raise SystemExit(2)
