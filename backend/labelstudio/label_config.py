"""Label config → one `LabelSpace` per `<Choices>` / `<Taxonomy>` control over an `<Image>`.

Parsing is done by label-studio-sdk's `LabelInterface`; this module only reads what it parsed
and adds the attributes this backend understands (documented in the README):

on `<Choices>` / `<Taxonomy>`
    model_score_threshold   per-label threshold for multi-label; for single choice, abstain below
    model_templates         template set name (simple, openai, photo) or templates joined by '|'
    model_scoring           softmax | sigmoid (default: the model family's own rule)
    model_pooling           mean (one embedding per label) | max (best-matching name wins)

on `<Choice>`
    predicted_values        comma-separated names the model should look for (as in the official
                            YOLO example); default: the choice's value
    model_prompts           full-sentence prompts joined by '|', used without templates
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from label_studio_sdk.label_interface.interface import LabelInterface

from ..errors import LabelConfigError

SUPPORTED = (
    "<Choices> (single or choice=\"multiple\") and <Taxonomy>, each with toName pointing to an "
    "<Image value=\"$field\"> tag"
)
MAX_LABELS = 10_000
MAX_PROMPT_CHARS = 1_000
PARSED_CACHE_SIZE = 256
"""Parsed configs kept, keyed by the config's SHA-256: never the text (up to MAX_REQUEST_BYTES)."""

Kind = Literal["choices", "taxonomy"]
Scoring = Literal["softmax", "sigmoid"]
Pooling = Literal["mean", "max"]


@dataclass(frozen=True)
class Label:
    """One selectable label of a control.

    `path` is what Label Studio stores: `(value,)` for Choices, root-to-node values for Taxonomy.
    `names` are filled into every template; `prompts` are used verbatim.
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    prompts: tuple[str, ...] = ()

    @property
    def value(self) -> str:
        return self.path[-1]


@dataclass(frozen=True)
class LabelSpace:
    """Everything needed to score and emit one control."""

    name: str
    to_name: str
    data_key: str
    kind: Kind
    multiple: bool
    labels: tuple[Label, ...]
    threshold: float | None = None
    templates: str | None = None
    scoring: Scoring | None = None
    pooling: Pooling = "mean"
    leafs_only: bool = True
    max_labels: int | None = None
    parents: tuple[tuple[str, ...], ...] = field(default=(), repr=False)

    def fingerprint(self) -> str:
        """Stable text of everything that changes what this control predicts."""
        payload = {
            "name": self.name, "to": self.to_name, "kind": self.kind, "multiple": self.multiple,
            "threshold": self.threshold, "templates": self.templates, "scoring": self.scoring,
            "pooling": self.pooling, "leafs_only": self.leafs_only, "max": self.max_labels,
            "labels": [[list(lb.path), list(lb.names), list(lb.prompts)] for lb in self.labels],
        }
        return json.dumps(payload, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedConfig:
    spaces: tuple[LabelSpace, ...]
    skipped: tuple[str, ...]
    """Controls present in the config that this backend does not predict (with why)."""

    def digest(self) -> str:
        text = "\n".join(space.fingerprint() for space in self.spaces)
        return hashlib.sha256(text.encode()).hexdigest()


_parsed: OrderedDict[bytes, ParsedConfig] = OrderedDict()
_parsed_lock = threading.Lock()


def parse_label_config(config: str) -> ParsedConfig:
    """Parse a Label Studio label config; raise LabelConfigError if nothing is predictable."""
    if not isinstance(config, str):
        return _parse(config)
    key = hashlib.sha256(config.encode("utf-8", "surrogatepass")).digest()
    with _parsed_lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    parsed = _parse(config)
    with _parsed_lock:
        _parsed[key] = parsed
        while len(_parsed) > PARSED_CACHE_SIZE:
            _parsed.popitem(last=False)
    return parsed


def _parse(config: str) -> ParsedConfig:
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError(f"The label config is empty. Supported: {SUPPORTED}.")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several unrelated types for malformed XML
        raise LabelConfigError(f"The label config is not valid XML ({exc}).") from None
    spaces, skipped = [], []
    for control in interface.controls:
        reason = _unsupported_reason(control)
        if reason:
            skipped.append(f"<{control.tag} name={control.name!r}>: {reason}")
            continue
        spaces.append(_build_space(interface, control))
    if not spaces:
        found = "; ".join(skipped) or "no control tags at all"
        raise LabelConfigError(
            f"Nothing in this label config can be pre-labeled ({found}). Supported: {SUPPORTED}."
        )
    return ParsedConfig(tuple(spaces), tuple(skipped))


def _unsupported_reason(control: Any) -> str | None:
    tag = control.tag.lower()
    if tag not in ("choices", "taxonomy"):
        return "only Choices and Taxonomy are supported"
    if control.attr.get("perRegion") == "true":
        return "per-region classification needs regions this backend does not create"
    if control.dynamic_value:
        return "labels loaded from task data or an API (value=/apiUrl=) are not supported"
    images = [obj for obj in control.objects or [] if obj.tag.lower() == "image"]
    if len(images) != 1 or len(control.objects) != 1:
        return "toName must name exactly one <Image> tag"
    image = images[0]
    if image.attr.get("valueList"):
        return "<Image valueList=...> (several images per task) is not supported"
    if not str(image.value or "").startswith("$"):
        return "the <Image> tag needs value=\"$field\""
    return None


def _build_space(interface: LabelInterface, control: Any) -> LabelSpace:
    image = control.objects[0]
    attrs = control.attr
    kind: Kind = "taxonomy" if control.tag.lower() == "taxonomy" else "choices"
    parents: tuple[tuple[str, ...], ...]
    if kind == "choices":
        labels, parents = _choices_labels(control), ()
        multiple, max_labels = attrs.get("choice") == "multiple", None
    else:
        labels, parents = _taxonomy_labels(interface, control)
        max_labels = _int_attr(control, "maxUsages")
        multiple = max_labels is not None and max_labels > 1
    _check_labels(control.name, labels)
    return LabelSpace(
        name=control.name,
        to_name=image.name,
        data_key=str(image.value)[1:],
        kind=kind,
        multiple=multiple,
        labels=tuple(labels),
        threshold=_threshold(control),
        templates=attrs.get("model_templates") or None,
        scoring=_enum_attr(control, "model_scoring", ("softmax", "sigmoid")),  # type: ignore[arg-type]
        pooling=_enum_attr(control, "model_pooling", ("mean", "max")) or "mean",  # type: ignore[arg-type]
        leafs_only=kind == "choices" or attrs.get("leafsOnly") == "true",
        max_labels=max_labels,
        parents=parents,
    )


def _choices_labels(control: Any) -> list[Label]:
    return [_label((value,), tag.attr) for value, tag in (control.labels_attrs or {}).items()]


def _taxonomy_labels(
    interface: LabelInterface, control: Any
) -> tuple[list[Label], tuple[tuple[str, ...], ...]]:
    """Leaves of the taxonomy become labels; inner nodes are kept as `parents` for back-off."""
    node = _find_control_node(interface, control.name)
    leaves: list[Label] = []
    parents: list[tuple[str, ...]] = []

    def walk(element: Any, prefix: tuple[str, ...]) -> None:
        for child in element:
            if child.tag != "Choice":
                walk(child, prefix)  # <View> wrappers inside the taxonomy
                continue
            value = child.attrib.get("alias") or child.attrib.get("value")
            if value is None:
                continue
            path = prefix + (value,)
            if any(grand.tag == "Choice" for grand in child.iter() if grand is not child):
                parents.append(path)
                walk(child, path)
            else:
                leaves.append(_label(path, dict(child.attrib)))

    walk(node, ())
    return _disambiguate(leaves), tuple(parents)


def _disambiguate(leaves: list[Label]) -> list[Label]:
    """Leaves sharing a value (Animal/Cat, Toy/Cat) are prompted with their whole path."""
    counts: dict[str, int] = {}
    for leaf in leaves:
        counts[leaf.value] = counts.get(leaf.value, 0) + 1
    return [
        Label(leaf.path, (" ".join(leaf.path),), leaf.prompts)
        if counts[leaf.value] > 1 and leaf.names == (leaf.value,) else leaf
        for leaf in leaves
    ]


def _find_control_node(interface: LabelInterface, name: str) -> Any:
    tree = interface._tree  # the SDK's parsed lxml tree; hierarchy is not exposed otherwise
    for element in tree.iter():
        if element.attrib.get("name") == name and element.attrib.get("toName"):
            return element
    raise LabelConfigError(f"Control {name!r} vanished while parsing the label config.")


def _label(path: tuple[str, ...], attrs: dict[str, str]) -> Label:
    names = _split(attrs.get("predicted_values", ""), ",") or (path[-1],)
    prompts = _split(attrs.get("model_prompts", ""), "|")
    for text in names + prompts:
        if len(text) > MAX_PROMPT_CHARS:
            raise LabelConfigError(
                f"Label {path[-1]!r}: a prompt or name is {len(text)} characters; the limit is "
                f"{MAX_PROMPT_CHARS}. Shorten predicted_values / model_prompts."
            )
    return Label(path=path, names=names, prompts=prompts)


def _split(text: str, sep: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(sep) if part.strip())


def _check_labels(control: str, labels: list[Label]) -> None:
    if not labels:
        raise LabelConfigError(f"Control {control!r} has no <Choice> values to predict.")
    if len(labels) > MAX_LABELS:
        raise LabelConfigError(
            f"Control {control!r} has {len(labels)} labels; the limit is {MAX_LABELS}."
        )
    paths = [label.path for label in labels]
    if len(set(paths)) != len(paths):
        raise LabelConfigError(f"Control {control!r} lists the same label twice.")


def _threshold(control: Any) -> float | None:
    raw = control.attr.get("model_score_threshold")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(
            f"Control {control.name!r}: model_score_threshold={raw!r} must be a number in [0, 1]."
        )
    return value


def _int_attr(control: Any, name: str) -> int | None:
    raw = control.attr.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LabelConfigError(
            f"Control {control.name!r}: {name}={raw!r} is not an integer."
        ) from None


def _enum_attr(control: Any, name: str, allowed: tuple[str, ...]) -> str | None:
    raw = control.attr.get(name)
    if raw is None or raw == "":
        return None
    if raw not in allowed:
        raise LabelConfigError(
            f"Control {control.name!r}: {name}={raw!r}; use one of {', '.join(allowed)}."
        )
    return str(raw)
