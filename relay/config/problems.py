"""Naming configuration problems: a pydantic error becomes file, dotted key, what was expected, and the line.

The YAML line is found only when there is a problem to name: the file is composed once more into nodes
(which carry their marks), so loading a good file costs nothing extra. The nodes also tell what the operator
wrote where YAML 1.1 read something else (``key_id: 0123`` is the number 83), for a "put it in quotes" hint.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from relay.errors import ConfigError, ConfigProblem

Loc = tuple[str | int, ...]
_OLD_PLATFORM_NAMES = {"gcm": "GCM, FCM's former name", "firebase": "Firebase", "ios": "iOS", "android": "Android"}
_YAML_KINDS = {"tag:yaml.org,2002:int": "the number", "tag:yaml.org,2002:float": "the number",
               "tag:yaml.org,2002:bool": "the flag", "tag:yaml.org,2002:null": "nothing (null)"}


def load_yaml(path: Path) -> Any:
    """Read one YAML file with the C loader when available; errors name the file (and the line)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with path.open("rb") as fh:
            return yaml.load(fh, Loader=loader)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"cannot read: {exc.strerror or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"invalid YAML: {exc}")]) from exc


class YamlNodes:
    """The node tree of one file, composed on first use, to find where a key is and what was written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._root: yaml.Node | None = None
        self._loaded = False

    def _tree(self) -> yaml.Node | None:
        if not self._loaded:
            self._loaded = True
            try:
                self._root = yaml.compose(self.path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                self._root = None
        return self._root

    def find(self, loc: Sequence[str | int]) -> tuple[yaml.Node | None, yaml.Node | None]:
        """(key node, value node) at ``loc``; as far as the path exists (the key node of the last found)."""
        key: yaml.Node | None = None
        node = self._tree()
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                pair = next(((k, v) for k, v in node.value if _same_key(k, part)), None)
                if pair is None:
                    return key, None
                key, node = pair
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                key = node = node.value[part]
            else:
                return key, None
        return key, node


def _same_key(node: yaml.Node, part: str | int) -> bool:
    if not isinstance(node, yaml.ScalarNode):
        return False
    if node.value == str(part):
        return True
    return node.style is None and not isinstance(part, str) and yaml.safe_load(node.value) == part


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return members
            tp = members[0]
        else:
            return tp


def _walk(root: type, loc: Loc) -> tuple[Loc, Any]:
    """``loc`` without pydantic's union tags and ``[key]`` markers, and the type the path ends in."""
    tp: Any = root
    shown: list[str | int] = []
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, list):  # a discriminated union: this part is the tag
            tp = next((m for m in tp if getattr(m, "__pydantic_fields__", {}).get("platform", None)
                       and m.__pydantic_fields__["platform"].default == part), None)
            continue
        if part == "[key]":
            continue
        shown.append(part)
        fields = getattr(tp, "__pydantic_fields__", None)
        if fields is not None:
            tp = fields[part].annotation if part in fields else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        else:
            tp = None
    return tuple(shown), _unwrap(tp)


def line_of(node: yaml.Node | None) -> int | None:
    """The 1-based line a node starts on."""
    return None if node is None else node.start_mark.line + 1


def dotted(loc: Iterable[str | int]) -> str:
    """``apps.ios.key_id``, ``auth.signature.keys[0].secret``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _expected(ctx: dict[str, Any]) -> str:
    return str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")


def _quote_hint(node: yaml.Node | None, name: str, key_error: bool) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.style is not None or node.tag not in _YAML_KINDS:
        return ""
    read = yaml.safe_load(node.value)
    quoted = f"\"{node.value}\": ..." if key_error else f"{name}: \"{node.value}\""
    return f": put it in quotes ({quoted}); YAML reads {node.value} as {_YAML_KINDS[node.tag]} {read!r}"


def _message(error: ErrorDetails, shown: Loc, tp: Any, nodes: YamlNodes, key_error: bool) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    fields = getattr(tp, "__pydantic_fields__", {})  # of the mapping holding the key (see problems_from)
    if kind == "missing":
        about = fields[shown[-1]].description if shown and shown[-1] in fields else None
        return "is required" + (f": {about}" if about else "")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = [k for k in fields if k != "name"]
        close = difflib.get_close_matches(str(shown[-1]), known, n=1)
        return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    if kind == "string_type":
        key_node, value_node = nodes.find(shown)
        hint = _quote_hint(key_node if key_error else value_node, str(shown[-1]) if shown else "", key_error)
        return f"must be text, not {type(value).__name__}{hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = value.get("platform") if isinstance(value, dict) else None
        hint = f" ({_OLD_PLATFORM_NAMES[str(tag).lower()]})" if str(tag).lower() in _OLD_PLATFORM_NAMES else ""
        what = "is required" if tag is None else f"{tag!r} is not a platform{hint}"
        return (f"{what}: use apns (iOS, Apple Push Notification service) or fcm "
                "(Android, Firebase Cloud Messaging)")
    texts = {
        "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
        "float_parsing": "must be a number", "float_type": "must be a number",
        "bool_parsing": "must be true or false", "bool_type": "must be true or false",
        "literal_error": f"must be one of {_expected(ctx)}",
        "dict_type": "must be a mapping", "dataclass_type": "must be a mapping",
        "dataclass_args_type": "must be a mapping",
        "list_type": "must be a list", "tuple_type": "must be a list", "path_type": "must be a file path",
    }
    if kind in texts:
        return f"{texts[kind]}, not {value!r}"
    bounds = {"greater_than_equal": ("at least", "ge"), "greater_than": ("more than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if kind in bounds:
        word, name = bounds[kind]
        return f"must be {word} {ctx[name]}, not {value}"
    if kind == "too_short":
        return f"at least one {str(shown[-1]).removesuffix('s')} is required" if shown else "must not be empty"
    return str(error["msg"]).removeprefix("Value error, ")


def problems_from(error: ValidationError, root: type, file: Path, *, prefix: Loc = (),
                  quiet: Iterable[Loc] = ()) -> list[ConfigProblem]:
    """One problem per pydantic error, each once, skipping keys already named (``quiet``, e.g. unset ``${VAR}``)."""
    nodes = YamlNodes(file)
    quiet = [tuple(q) for q in quiet]
    problems: list[ConfigProblem] = []
    for detail in error.errors(include_url=False):
        loc = tuple(detail["loc"])
        shown, tp = _walk(root, loc)
        if detail["type"] in ("extra_forbidden", "unexpected_keyword_argument", "missing"):
            tp = _walk(root, loc[:-1])[1]
        message = _message(detail, prefix + shown, tp, nodes, key_error="[key]" in loc)
        if detail["type"] == "config":
            key = str((detail.get("ctx") or {})["key"])
            if key.startswith("[") and shown:  # an index into the value itself: X-Key[1]
                shown, key = (*shown[:-1], f"{shown[-1]}{key.partition('.')[0]}"), key.partition(".")[2]
            shown += tuple(p for p in key.split(".") if p)
        if detail["type"] in ("union_tag_invalid", "union_tag_not_found"):
            shown += ("platform",)
        full = prefix + shown
        key_node, value_node = nodes.find(full)
        if "[key]" in loc and isinstance(key_node, yaml.ScalarNode):
            full = (*full[:-1], key_node.value)  # the key as written (0777), not as YAML read it (511)
        if any(full[: len(q)] == q for q in quiet):
            continue
        problems.append(ConfigProblem(str(file), dotted(full), message, line_of(key_node or value_node)))
    return list(dict.fromkeys(problems))
