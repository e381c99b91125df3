"""How the simulated upstream reads what Applivery leaves undocumented: ``sort`` and ``tags``.

Upstream documents a ``sort`` parameter on its lists and an array filter ``tags`` on the
device list, but neither which sort fields it accepts nor how an array is written in a query
(docs/upstream-api.md §6, §15). A client that relies on either has to check what comes back;
a ``Dialect`` gives it an upstream that reads them otherwise. Set one at construction
(``Simulator(sort_mode=..., ...)``, the simulator's CLI flags) or swap it at run time
(``Simulator.set_dialect``, ``POST /_simulator/dialect``).

``sort_mode``, per list (``devices``, ``commands`` — the batch history — and ``actions``):

- ``honour`` (the default): sorted as asked; a history without ``sort`` comes newest first.
- ``ignore``: every request gets the stored order, as Mongo's natural order — devices as the
  fleet holds them, a history oldest first, actions in batch order — paged as usual in it.
- ``reject``: a request carrying ``sort`` answers 400 with code 5000.

``sort_fields`` narrows ``ignore`` and ``reject`` to sorts on those fields (None: any field);
a sort on another field is honoured, and a request without ``sort`` still gets the stored
order where the list ignores sorts.

``tags_format``: the spelling of the device list's ``tags`` array that is read.

- ``any`` (the default): ``tags=a&tags=b``, ``tags[]=a&tags[]=b`` and ``tags=a,b`` alike.
- ``repeated``: each ``tags`` value is one tag, as is (``tags=a,b`` looks for the tag
  ``a,b``, which no device carries).
- ``brackets``: only ``tags[]``.
- ``comma``: one ``tags`` value, split at commas (a repeated ``tags`` is not read).
- ``ignore``: the filter is dropped whatever its spelling: the whole list comes back.

``unknown_filter``: what a ``tags`` spelling the format does not read does — ``ignore``
(dropped, as an unknown query parameter: the whole list, or what the spellings that were read
select) or ``nothing`` (no device matches: an empty list).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HONOUR, IGNORE, REJECT = "honour", "ignore", "reject"
SORT_MODES = (HONOUR, IGNORE, REJECT)
SORTED_LISTS = ("devices", "commands", "actions")  # route names, as in the stats
ANY, REPEATED, BRACKETS, COMMA = "any", "repeated", "brackets", "comma"
TAGS_FORMATS = (ANY, REPEATED, BRACKETS, COMMA, IGNORE)
NOTHING = "nothing"
UNKNOWN_FILTERS = (IGNORE, NOTHING)
SETTINGS = ("sort_mode", "sort_fields", "tags_format", "unknown_filter")

# Upstream documents no code for a refused sort (docs/upstream-api.md §9); ours is the
# generic 5000 that the simulator's 500s carry too.
SORT_REJECTED_CODE = 5000

# What happened to a request, counted per route in ``Stats.dialect``.
SORT_IGNORED, SORT_REJECTED = "sort_ignored", "sort_rejected"
TAGS_IGNORED, TAGS_UNREAD = "tags_ignored", "tags_unread"

SortModeSpec = str | Mapping[str, str]
# Tags a device must carry one of; None: no filter. An empty set matches no device.
TagFilter = frozenset[str] | None


@dataclass(frozen=True, slots=True)
class Dialect:
    sort_mode: Mapping[str, str]  # every list in SORTED_LISTS -> its mode
    sort_fields: frozenset[str] | None
    tags_format: str
    unknown_filter: str

    @classmethod
    def of(
        cls,
        sort_mode: SortModeSpec = HONOUR,
        sort_fields: Iterable[str] | None = None,
        tags_format: str = ANY,
        unknown_filter: str = IGNORE,
    ) -> Dialect:
        """A checked dialect; raises ``ValueError`` naming the offending setting."""
        return cls(
            _sort_modes(sort_mode),
            _sort_fields(sort_fields),
            _choice("tags_format", tags_format, TAGS_FORMATS),
            _choice("unknown_filter", unknown_filter, UNKNOWN_FILTERS),
        )

    def changed(self, **changes: Any) -> Dialect:
        """This dialect with some settings changed (checked before anything is built)."""
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
        return Dialect.of(**{**self.settings(), **changes})

    def settings(self) -> dict[str, Any]:
        """The settings as JSON values (what the control endpoint answers)."""
        return {
            "sort_mode": dict(self.sort_mode),
            "sort_fields": None if self.sort_fields is None else sorted(self.sort_fields),
            "tags_format": self.tags_format,
            "unknown_filter": self.unknown_filter,
        }

    def __str__(self) -> str:
        """The settings that differ from the defaults, for banners; "" when none does."""
        parts = []
        changed = [f"{name}={mode}" for name, mode in self.sort_mode.items() if mode != HONOUR]
        if changed:
            on = "" if self.sort_fields is None else f" on {','.join(sorted(self.sort_fields))}"
            parts.append(f"sort {','.join(changed)}{on}")
        if self.tags_format != ANY:
            parts.append(f"tags {self.tags_format}")
        if self.unknown_filter != IGNORE:
            parts.append(f"unknown filter {self.unknown_filter}")
        return ", ".join(parts)

    # --- reading a request -----------------------------------------------------------------

    def sort_for(self, route: str, field: str | None) -> str:
        """What ``route`` does with a sort on ``field`` (None: no sort asked for)."""
        mode = self.sort_mode.get(route, HONOUR)
        if field is None:
            # Nothing to refuse; but an upstream that ignores sort serves its stored order.
            return IGNORE if mode == IGNORE else HONOUR
        if self.sort_fields is not None and field not in self.sort_fields:
            return HONOUR
        return mode

    def read_tags(self, query: Any) -> tuple[TagFilter, str | None]:
        """The tags filter of a device-list query (a multidict), and what was not read."""
        given = [*query.getall("tags", ()), *query.getall("tags[]", ())]
        if self.tags_format == IGNORE:
            return None, TAGS_IGNORED if given else None
        read, unread = _spellings(self.tags_format, query)
        tags = frozenset(tag.strip() for tag in read if tag.strip())
        if not unread:
            return tags or None, None
        if self.unknown_filter == NOTHING:
            return frozenset(), TAGS_UNREAD
        return tags or None, TAGS_UNREAD


def _spellings(tags_format: str, query: Any) -> tuple[list[str], bool]:
    """(tags read, whether a spelling the format does not read was given)."""
    plain: list[str] = query.getall("tags", [])
    brackets: list[str] = query.getall("tags[]", [])
    if tags_format == ANY:
        return [tag for value in plain + brackets for tag in value.split(",")], False
    if tags_format == REPEATED:
        return plain, bool(brackets)
    if tags_format == BRACKETS:
        return brackets, bool(plain)
    # COMMA: one value carries the whole array; a repeated one is not what this upstream reads.
    if len(plain) > 1:
        return [], True
    return [tag for value in plain for tag in value.split(",")], bool(brackets)


def _sort_modes(spec: Any) -> dict[str, str]:
    """Every list's mode from ``"ignore"``, ``"devices=reject,commands=ignore"`` or a mapping;
    lists not named honour ``sort``."""
    if isinstance(spec, str) and "=" not in spec:
        mode = _choice("sort_mode", spec.strip(), SORT_MODES)
        return dict.fromkeys(SORTED_LISTS, mode)
    if isinstance(spec, str):
        pairs = [part.partition("=")[::2] for part in spec.split(",") if part.strip()]
        spec = {name.strip(): mode.strip() for name, mode in pairs}
    if not isinstance(spec, Mapping):
        raise ValueError("sort_mode must be a mode or a mapping of list to mode")
    modes = dict.fromkeys(SORTED_LISTS, HONOUR)
    for name, mode in spec.items():
        if name not in SORTED_LISTS:
            raise ValueError(f"sort_mode: unknown list {name!r} (known: {', '.join(SORTED_LISTS)})")
        modes[name] = _choice(f"sort_mode for {name}", mode, SORT_MODES)
    return modes


def _sort_fields(fields: Any) -> frozenset[str] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = fields.split(",")
    if not isinstance(fields, Iterable):
        raise ValueError("sort_fields must be field names or null")
    names = [field.strip() if isinstance(field, str) else field for field in fields]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError("sort_fields must be non-empty field names")
    return frozenset(names)


def _choice(setting: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{setting}: {value!r} is not one of {', '.join(choices)}")
    return value
