"""Static material the simulated fleet is drawn from: CSP commands, batch names, outcomes.

Paths are real Policy CSP and device CSP nodes so that generated batches read like an
administrator's work. Outcome weights follow the SyncML codes Windows CSPs actually emit
(docs/upstream-api.md §8): 404 for an absent node and 405 for a read-only one dominate.
"""

from __future__ import annotations

from exporter.statuses import STATUS_CLASS, SYNCML_CODE, StatusClass

ACTIONS = ("Add", "Copy", "Delete", "Exec", "Get", "Replace")
FORMATS = ("b64", "bin", "bool", "chr", "int", "node", "null", "xml", "date", "time", "float")

# A command's config: (path, action, value, format). ``value`` is None when not sent.
Config = tuple[str, str, str | None, str]

_POLICY = "./Device/Vendor/MSFT/Policy/Config"
_USER_POLICY = "./User/Vendor/MSFT/Policy/Config"

COMMANDS: tuple[Config, ...] = (
    (f"{_POLICY}/ApplicationManagement/AllowStore", "Replace", "0", "int"),
    (f"{_POLICY}/ApplicationManagement/AllowGameDVR", "Replace", "0", "int"),
    (f"{_POLICY}/Security/RequireDeviceEncryption", "Replace", "1", "int"),
    (f"{_POLICY}/DeviceLock/DevicePasswordEnabled", "Replace", "0", "int"),
    (f"{_POLICY}/DeviceLock/MinDevicePasswordLength", "Replace", "12", "int"),
    (f"{_POLICY}/DeviceLock/MaxInactivityTimeDeviceLock", "Replace", "10", "int"),
    (f"{_POLICY}/Defender/AllowRealtimeMonitoring", "Replace", "1", "int"),
    (f"{_POLICY}/Defender/AllowCloudProtection", "Replace", "1", "int"),
    (f"{_POLICY}/Defender/ScheduleScanTime", "Replace", "120", "int"),
    (f"{_POLICY}/Update/ActiveHoursStart", "Replace", "8", "int"),
    (f"{_POLICY}/Update/ActiveHoursEnd", "Replace", "18", "int"),
    (f"{_POLICY}/Update/DeferQualityUpdatesPeriodInDays", "Replace", "7", "int"),
    (f"{_POLICY}/Update/DeferFeatureUpdatesPeriodInDays", "Replace", "30", "int"),
    (f"{_POLICY}/Browser/AllowPasswordManager", "Replace", "0", "int"),
    (f"{_POLICY}/Connectivity/AllowBluetooth", "Replace", "0", "int"),
    (f"{_POLICY}/Experience/AllowCortana", "Replace", "0", "int"),
    (f"{_POLICY}/Privacy/LetAppsAccessCamera", "Replace", "2", "int"),
    (f"{_POLICY}/System/AllowTelemetry", "Replace", "1", "int"),
    (f"{_POLICY}/Start/HideShutDown", "Add", "1", "int"),
    (f"{_POLICY}/WindowsLogon/DontDisplayNetworkSelectionUI", "Add", "1", "int"),
    (f"{_POLICY}/LocalPoliciesSecurityOptions/Accounts_EnableGuestAccountStatus",
     "Replace", "0", "int"),
    (f"{_USER_POLICY}/Education/DefaultPrinterName", "Add", "Reception-MFP", "chr"),
    (f"{_USER_POLICY}/Start/HideRecentlyAddedApps", "Replace", "1", "int"),
    ("./Device/Vendor/MSFT/BitLocker/RequireDeviceEncryption", "Replace", "1", "int"),
    ("./Device/Vendor/MSFT/BitLocker/EncryptionMethodByDriveType", "Replace",
     '<enabled/><data id="EncryptionMethodWithXtsOsDropDown_Name" value="7"/>', "chr"),
    ("./Device/Vendor/MSFT/Firewall/MdmStore/DomainProfile/EnableFirewall",
     "Replace", "true", "bool"),
    ("./Device/Vendor/MSFT/Firewall/MdmStore/PublicProfile/EnableFirewall",
     "Replace", "true", "bool"),
    ("./Device/Vendor/MSFT/Reboot/RebootNow", "Exec", None, "null"),
    ("./Device/Vendor/MSFT/Defender/Scan/QuickScan", "Exec", None, "null"),
    ("./Device/Vendor/MSFT/Defender/Health/ProductStatus", "Get", None, "int"),
    ("./Device/Vendor/MSFT/DeviceStatus/OS/Mode", "Get", None, "int"),
    ("./Device/Vendor/MSFT/DeviceStatus/Compliance/EncryptionCompliance", "Get", None, "int"),
    ("./Device/Vendor/MSFT/DeviceStatus/Battery/EstimatedChargeRemaining", "Get", None, "int"),
    ("./DevDetail/SwV", "Get", None, "chr"),
    ("./DevDetail/Ext/Microsoft/DeviceName", "Get", None, "chr"),
    ("./DevDetail/Ext/Microsoft/TotalStorage", "Get", None, "int"),
    ("./Vendor/MSFT/RemoteWipe/doWipeProtected", "Exec", None, "null"),
    ("./Device/Vendor/MSFT/EnterpriseModernAppManagement/AppManagement/EnterpriseID/"
     "Microsoft.BingWeather_8wekyb3d8bbwe", "Delete", None, "null"),
    ("./Device/Vendor/MSFT/EnterpriseModernAppManagement/AppManagement/EnterpriseID/"
     "Microsoft.XboxApp_8wekyb3d8bbwe", "Delete", None, "null"),
    ("./Device/Vendor/MSFT/Policy/Config/Kerberos/UPNNameHints", "Delete", None, "null"),
    ("./Device/Vendor/MSFT/AssignedAccess/Configuration", "Replace",
     "PEFzc2lnbmVkQWNjZXNzQ29uZmlndXJhdGlvbiAvPg==", "b64"),
    ("./Device/Vendor/MSFT/Accounts/Domain/ComputerName", "Replace", "%SERIAL%", "chr"),
)

# What a successful Get returns, by format.
GET_RESULTS: dict[str, str] = {"int": "1", "chr": "10.0.22631.4460", "bool": "true"}

BATCH_NAMES: tuple[str, ...] = (
    "Security baseline",
    "Disable Microsoft Store",
    "Enforce BitLocker",
    "Defender real-time protection",
    "Windows Update ring: Broad",
    "Windows Update ring: Pilot",
    "Kiosk lockdown",
    "Password policy 2026",
    "Firewall profiles",
    "Remove consumer apps",
    "Inventory refresh",
    "Privacy settings",
    "Reception PC setup",
    "Quick scan",
    "Restart after patching",
    "Bluetooth off (field devices)",
    "Rename device",
)

# Error statuses and their weights. The codes Windows emits carry the weight; every other
# error status keeps a small share so that the whole enum shows up in a large fleet.
_FREQUENT_ERRORS: dict[str, float] = {
    "CommandNotFound": 30.0,  # 404 node absent
    "MethodNotAllowed": 12.0,  # 405 read-only node
    "UnexpectedError": 12.0,  # 500 command failed
    "MalformedSyntax": 10.0,  # 400
    "NotSupported": 8.0,  # 406
    "FailedByRecipientUnderstoodTheCommand": 6.0,  # 403
    "PutOrAddCommandFailedBecauseTargetAlreadyExists": 5.0,  # 418
    "UnsupportedMediaType": 4.0,  # 415
    "InvalidAdequateAccessControlPermissions": 4.0,  # 425
    "Unauthorized": 3.0,  # 401
    "ErrorCausedAllSyncMKCommandsFail": 3.0,  # 507
    "AtomicRollbackFailed": 2.0,  # 516
    "CommandInsideAtomicElementAndAtomicFailed": 2.0,  # 216
}
_RARE_ERROR_WEIGHT = 0.2

ERROR_STATUSES: tuple[str, ...] = tuple(
    name for name, cls in STATUS_CLASS.items() if cls is StatusClass.ERROR
)
ERROR_WEIGHTS: tuple[float, ...] = tuple(
    _FREQUENT_ERRORS.get(name, _RARE_ERROR_WEIGHT) for name in ERROR_STATUSES
)

# Statuses without a SyncML code in the enum table still carry one on the wire.
_EXTRA_CODES: dict[str, int] = {"UnexpectedError": 500, "CommandFormatError": 400}

# Device-side cancellations: the device answered that it did not run the command.
DEVICE_CANCELS: tuple[str, ...] = (
    "OperationCanceled", "CommandNotExecutedUserCanceled", "SyncMlCommandCanceled",
)
# An administrator's cancellation before the device answered.
ADMIN_CANCEL = "Cancel"

# Names that are not among the 65, for the unknown_status fault (upstream may add values).
UNKNOWN_STATUSES: tuple[str, ...] = (
    "AcknowledgedWithWarnings",
    "DeviceBusy",
    "NotificationThrottled",
    "PolicyConflictDetected",
    "RetryScheduled",
)


def status_code(status: str) -> int | None:
    """The SyncML code a device sends with a final status (None when it sends none)."""
    return SYNCML_CODE.get(status) or _EXTRA_CODES.get(status)
