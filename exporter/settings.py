"""Which setting an action configures: its CSP path as a label that does not grow with the fleet.

Pure functions. A CSP path names one node on one device, often with instance segments in it
(an app's product GUID, a user's SID, a certificate's thumbprint): 40 app installs under 40
product GUIDs are one setting to an administrator, and one series to Prometheus.
"""

from __future__ import annotations

import re

# The scope a node lives in, then the vendor prefix every Microsoft CSP carries.
_SCOPE = re.compile(r"^\.?/?(?:(?:device|user)/)?(?:vendor/msft/)?", re.IGNORECASE)

# A whole segment that names an instance rather than a node.
_INSTANCE = re.compile(
    r"""
    (?:\{|%7B)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?:\}|%7D)?  # GUID
    | [0-9a-f]{16,}                       # a long hex id (object id, thumbprint)
    | [0-9]+                              # a number (an index, an account id)
    | S-1-[0-9]+(?:-[0-9]+)+              # a Windows SID
    | [^@/\s]+@[^@/\s]+                   # an e-mail address (a user principal name)
    """,
    re.IGNORECASE | re.VERBOSE,
)
INSTANCE = "*"
# Actions without a config.path.
NO_SETTING = "none"

OPERATIONS = ("Add", "Copy", "Delete", "Exec", "Get", "Replace")
_OPERATION = {op.lower(): op for op in OPERATIONS}
NO_OPERATION = "none"
OTHER_OPERATION = "other"


def setting(path: str | None) -> str:
    """``./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/{GUID}/DownloadInstall`` ->
    ``EnterpriseDesktopAppManagement/MSI/*/DownloadInstall``."""
    if not path or not path.strip():
        return NO_SETTING
    segments = _SCOPE.sub("", path.strip(), count=1).split("/")
    kept = [INSTANCE if _INSTANCE.fullmatch(s) else s for s in segments if s]
    return "/".join(kept) or NO_SETTING


def operation(action: str | None) -> str:
    """``config.action`` by its documented name (any case); others are ``other``."""
    if not action:
        return NO_OPERATION
    return _OPERATION.get(action.strip().lower(), OTHER_OPERATION)
