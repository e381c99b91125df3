"""The 65 upstream action statuses and the class each belongs to.

The names are a closed set spelled exactly as upstream does (typos included). A name
outside the set keeps its raw spelling and gets the class ``unknown``.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum, StrEnum


class StatusClass(StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    CANCELED = "canceled"
    ERROR = "error"
    UNKNOWN = "unknown"


# (status, likely SyncML code, class) in upstream's enum order.
_TABLE: tuple[tuple[str, int | None, StatusClass], ...] = (
    ("Pending", None, StatusClass.PENDING),
    ("Awaiting", None, StatusClass.PENDING),
    ("UnexpectedError", None, StatusClass.ERROR),
    ("Acknowledged", 200, StatusClass.SUCCESS),
    ("Cancel", None, StatusClass.CANCELED),
    ("MethodNotAllowed", 405, StatusClass.ERROR),
    ("Unknown", None, StatusClass.UNKNOWN),
    ("Unauthorized", 401, StatusClass.ERROR),
    ("CommandFormatError", None, StatusClass.ERROR),
    ("CommandNotFound", 404, StatusClass.ERROR),
    ("NotSupported", 406, StatusClass.ERROR),
    ("DeleteWithoutArchive", 210, StatusClass.SUCCESS),
    ("ItemNotDeleted", 211, StatusClass.ERROR),
    ("AuthenticationAccepted", 212, StatusClass.SUCCESS),
    ("ChunkedItemAcceptedAndBuffered", 213, StatusClass.PENDING),
    ("OperationCanceled", 214, StatusClass.CANCELED),
    ("CommandNotExecutedUserCanceled", 215, StatusClass.CANCELED),
    ("CommandInsideAtomicElementAndAtomicFailed", 216, StatusClass.ERROR),
    ("RequestedTargetIsOneOfMultipleAlternativesRequestedTarget", 300, StatusClass.ERROR),
    ("RequestedTargetHasANewURI", 301, StatusClass.ERROR),
    ("RequestedTargetMovedToADifferentURI", 302, StatusClass.ERROR),
    ("RequestedTargetCanBeFoundAtAnotherURI", 303, StatusClass.ERROR),
    ("RequestedSyncMLCommandNotExecutedOnTarget", 304, StatusClass.ERROR),
    ("RequestedTargetMustBeAccessedThroughSpecifiedProxyURI", 305, StatusClass.ERROR),
    ("PaymentIsNeeded", 402, StatusClass.ERROR),
    ("FailedByRecipientUnderstoodTheCommand", 403, StatusClass.ERROR),
    ("InvalidOriginatorAuthentication", 407, StatusClass.ERROR),
    ("ExpectedMessageNotReceivedInRequiredPeriodOfTime", 408, StatusClass.ERROR),
    ("UpdateConflictBetweenClientAndServerVersion", 409, StatusClass.ERROR),
    ("TargetNotLongerAvailable", 410, StatusClass.ERROR),
    ("CommandMustBeAccompaniedByByteSizeOrLength", 411, StatusClass.ERROR),
    ("IncompleteOrIncorrectFormed", 412, StatusClass.ERROR),
    ("RequestItemTooLong", 413, StatusClass.ERROR),
    ("TargetURIIsTooLong", 414, StatusClass.ERROR),
    ("UnsupportedMediaType", 415, StatusClass.ERROR),
    ("ByteSizeTooBig", 416, StatusClass.ERROR),
    ("RequestFailRetryAfterSomeTime", 417, StatusClass.ERROR),
    ("PutOrAddCommandFailedBecauseTargetAlreadyExists", 418, StatusClass.ERROR),
    ("ConflictDetectedResolvedServerCommandWinning", 419, StatusClass.SUCCESS),
    ("NoMoreStorageSpaceForRemainingSynchronizationData", 420, StatusClass.ERROR),
    ("SpecifiedSearchGrammarWasNotKnown", 421, StatusClass.ERROR),
    ("CGIScriptingInLocURIWasIncorrectlyFormed", 422, StatusClass.ERROR),
    ("SoftDeletedItemAlreadyHardDeleted", 423, StatusClass.ERROR),
    ("ChunkedObjectReceivedByIncorrectSizeDeclared", 424, StatusClass.ERROR),
    ("InvalidAdequateAccessControlPermissions", 425, StatusClass.ERROR),
    ("PartialItemNotAccepted", 426, StatusClass.ERROR),
    ("ParentCanNotBeDeletedSinceItContainsChildren", 427, StatusClass.ERROR),
    ("MoveFailed", 428, StatusClass.ERROR),
    ("CommandNotSupported", 501, StatusClass.ERROR),
    ("GatewayOrProxyError", 502, StatusClass.ERROR),
    ("TemporaryOverloadingOrMaintenanceError", 503, StatusClass.ERROR),
    ("GatewayOrProxyTimeout", 504, StatusClass.ERROR),
    ("InvalidSyncMLDTDVersion", 505, StatusClass.ERROR),
    ("ApplicationErrorWhileProcessingTheRequest", 506, StatusClass.ERROR),
    ("ErrorCausedAllSyncMKCommandsFail", 507, StatusClass.ERROR),
    ("ErrorARefreshSynchronizationIsNeeded", 508, StatusClass.ERROR),
    ("ReservedForFutureUse", 509, StatusClass.ERROR),
    ("ErrorInRecipientDataStore", 510, StatusClass.ERROR),
    ("SevereErrorInServer", 511, StatusClass.ERROR),
    ("ApplicationErrorDuringSynchronization", 512, StatusClass.ERROR),
    ("SyncMLSynchronizationVersionNotSupported", 513, StatusClass.ERROR),
    ("SyncMlCommandCanceled", 514, StatusClass.CANCELED),
    ("AtomicRollbackFailed", 516, StatusClass.ERROR),
    ("AtomicResponseTooLarge", 517, StatusClass.ERROR),
    ("MalformedSyntax", 400, StatusClass.ERROR),)

STATUS_CLASS: dict[str, StatusClass] = {name: cls for name, _, cls in _TABLE}
SYNCML_CODE: dict[str, int] = {name: code for name, code, _ in _TABLE if code is not None}
KNOWN_STATUSES: tuple[str, ...] = tuple(name for name, _, _ in _TABLE)

# Statuses whose actions wait for the device; every other status is final.
PENDING_STATUSES: frozenset[str] = frozenset(
    name for name, cls in STATUS_CLASS.items() if cls is StatusClass.PENDING
)
CANCELED_STATUSES: frozenset[str] = frozenset(
    name for name, cls in STATUS_CLASS.items() if cls is StatusClass.CANCELED
)


def classify(status: str) -> StatusClass:
    """Class of an upstream status name; ``unknown`` for names outside the 65."""
    return STATUS_CLASS.get(status, StatusClass.UNKNOWN)


def is_known(status: str) -> bool:
    return status in STATUS_CLASS


def is_pending(status: str) -> bool:
    """True while the device has not answered (its status can still change)."""
    return status in PENDING_STATUSES


class Rank(IntEnum):
    """How far a status is along ``Pending -> Awaiting -> in progress -> final``. A read
    below the furthest rank an action reached is stale."""

    PENDING = 0
    AWAITING = 1
    PROGRESS = 2
    FINAL = 3


def rank(status: str) -> Rank:
    if status == "Pending":
        return Rank.PENDING
    if status == "Awaiting":
        return Rank.AWAITING
    return Rank.PROGRESS if classify(status) is StatusClass.PENDING else Rank.FINAL


# Distinct unknown status names kept as they are; later ones become OTHER_STATUS, so an
# upstream that invents names cannot grow the series for ever.
MAX_UNKNOWN_STATUSES = 100
OTHER_STATUS = "other"


class StatusTable:
    """Every status this process has met, each with a small index: the 65 known ones first,
    in upstream order, then up to MAX_UNKNOWN_STATUSES others as upstream spells them."""

    def __init__(self) -> None:
        self.names: list[str] = list(KNOWN_STATUSES)
        self.classes: list[str] = [classify(s).value for s in KNOWN_STATUSES]
        self.ranks: list[Rank] = [rank(s) for s in KNOWN_STATUSES]
        self.pending: list[bool] = [is_pending(s) for s in KNOWN_STATUSES]
        self._index: dict[str, int] = {s: i for i, s in enumerate(KNOWN_STATUSES)}

    def intern(self, status: str) -> int:
        """The index of ``status``, added on first sight (or that of OTHER_STATUS when the
        table is full)."""
        index = self._index.get(status)
        if index is not None:
            return index
        unknown = len(self.names) - len(KNOWN_STATUSES)
        if unknown >= MAX_UNKNOWN_STATUSES and status != OTHER_STATUS:
            return self.intern(OTHER_STATUS)
        index = len(self.names)
        self.names.append(status)
        self.classes.append(classify(status).value)
        self.ranks.append(rank(status))
        self.pending.append(is_pending(status))
        self._index[status] = index
        return index

    def any_pending(self, indexes: Iterable[int]) -> bool:
        """Whether any of these statuses is of class pending (every read asks: kept cheap)."""
        return any(map(self.pending.__getitem__, indexes))
