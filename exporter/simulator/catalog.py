"""Static material the simulated fleet is drawn from: policies, CSP commands, outcomes.

An administrator pushes *policies*: a name and the CSP commands that carry it out (Policy
CSP areas, app installs, Wi-Fi and VPN profiles, certificates). Paths are real CSP nodes,
with instance segments the way Windows spells them (MSI product codes in braces, SSIDs,
profile names, certificate thumbprints, tenant GUIDs, and per user an Entra ID SID or an
e-mail address), so that generated batches read like an administrator's work. Outcome
weights follow the SyncML codes Windows CSPs actually emit (docs/upstream-api.md §8): 404 for
an absent node and 405 for a read-only one dominate.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from exporter.statuses import STATUS_CLASS, SYNCML_CODE, StatusClass

ACTIONS = ("Add", "Copy", "Delete", "Exec", "Get", "Replace")
FORMATS = ("b64", "bin", "bool", "chr", "int", "node", "null", "xml", "date", "time", "float")

# A command's config: (path, action, value, format). ``value`` is None when not sent.
Config = tuple[str, str, str | None, str]


class Policy(NamedTuple):
    """What an administrator pushes: one batch name and the commands behind it."""

    name: str
    configs: tuple[Config, ...]


_DEVICE = "./Device/Vendor/MSFT"
_POLICY = f"{_DEVICE}/Policy/Config"
_USER_POLICY = "./User/Vendor/MSFT/Policy/Config"


def _get(path: str, fmt: str = "int") -> Config:
    return (path, "Get", None, fmt)


def _exec(path: str) -> Config:
    return (path, "Exec", None, "null")


# Settings: single nodes an administrator sets or reads. Besides their own policies, they
# fill batches up to the drawn size (see ``FILL``).
SETTINGS: tuple[Policy, ...] = (
    Policy("Security baseline", (
        (f"{_POLICY}/Security/RequireDeviceEncryption", "Replace", "1", "int"),
        (f"{_POLICY}/LocalPoliciesSecurityOptions/Accounts_EnableGuestAccountStatus",
         "Replace", "0", "int"),
        (f"{_POLICY}/Defender/AllowRealtimeMonitoring", "Replace", "1", "int"),
        (f"{_POLICY}/System/AllowTelemetry", "Replace", "1", "int"),
        (f"{_DEVICE}/Firewall/MdmStore/DomainProfile/EnableFirewall", "Replace", "true", "bool"),
    )),
    Policy("Disable Microsoft Store", (
        (f"{_POLICY}/ApplicationManagement/AllowStore", "Replace", "0", "int"),
        (f"{_POLICY}/ApplicationManagement/AllowGameDVR", "Replace", "0", "int"),
        (f"{_POLICY}/Experience/AllowCortana", "Replace", "0", "int"),
    )),
    Policy("Enforce BitLocker", (
        (f"{_DEVICE}/BitLocker/RequireDeviceEncryption", "Replace", "1", "int"),
        (f"{_DEVICE}/BitLocker/EncryptionMethodByDriveType", "Replace",
         '<enabled/><data id="EncryptionMethodWithXtsOsDropDown_Name" value="7"/>', "chr"),
        _get(f"{_DEVICE}/DeviceStatus/Compliance/EncryptionCompliance"),
    )),
    Policy("Defender real-time protection", (
        (f"{_POLICY}/Defender/AllowRealtimeMonitoring", "Replace", "1", "int"),
        (f"{_POLICY}/Defender/AllowCloudProtection", "Replace", "1", "int"),
        (f"{_POLICY}/Defender/ScheduleScanTime", "Replace", "120", "int"),
        _get(f"{_DEVICE}/Defender/Health/ProductStatus"),
    )),
    Policy("Windows Update ring: Broad", (
        (f"{_POLICY}/Update/ActiveHoursStart", "Replace", "8", "int"),
        (f"{_POLICY}/Update/ActiveHoursEnd", "Replace", "18", "int"),
        (f"{_POLICY}/Update/DeferQualityUpdatesPeriodInDays", "Replace", "7", "int"),
        (f"{_POLICY}/Update/DeferFeatureUpdatesPeriodInDays", "Replace", "30", "int"),
    )),
    Policy("Windows Update ring: Pilot", (
        (f"{_POLICY}/Update/ActiveHoursStart", "Replace", "8", "int"),
        (f"{_POLICY}/Update/ActiveHoursEnd", "Replace", "18", "int"),
        (f"{_POLICY}/Update/DeferQualityUpdatesPeriodInDays", "Replace", "0", "int"),
        (f"{_POLICY}/Update/DeferFeatureUpdatesPeriodInDays", "Replace", "0", "int"),
    )),
    Policy("Kiosk lockdown", (
        (f"{_DEVICE}/AssignedAccess/Configuration", "Replace",
         "PEFzc2lnbmVkQWNjZXNzQ29uZmlndXJhdGlvbiAvPg==", "b64"),
        (f"{_POLICY}/Start/HideShutDown", "Add", "1", "int"),
        (f"{_POLICY}/WindowsLogon/DontDisplayNetworkSelectionUI", "Add", "1", "int"),
    )),
    Policy("Password policy 2026", (
        (f"{_POLICY}/DeviceLock/DevicePasswordEnabled", "Replace", "0", "int"),
        (f"{_POLICY}/DeviceLock/MinDevicePasswordLength", "Replace", "12", "int"),
        (f"{_POLICY}/DeviceLock/MaxInactivityTimeDeviceLock", "Replace", "10", "int"),
    )),
    Policy("Firewall profiles", (
        (f"{_DEVICE}/Firewall/MdmStore/DomainProfile/EnableFirewall", "Replace", "true", "bool"),
        (f"{_DEVICE}/Firewall/MdmStore/PublicProfile/EnableFirewall", "Replace", "true", "bool"),
    )),
    Policy("Remove consumer apps", (
        (f"{_DEVICE}/EnterpriseModernAppManagement/AppManagement/EnterpriseID/"
         "Microsoft.BingWeather_8wekyb3d8bbwe", "Delete", None, "null"),
        (f"{_DEVICE}/EnterpriseModernAppManagement/AppManagement/EnterpriseID/"
         "Microsoft.XboxApp_8wekyb3d8bbwe", "Delete", None, "null"),
    )),
    Policy("Clear Kerberos UPN hints", (
        (f"{_POLICY}/Kerberos/UPNNameHints", "Delete", None, "null"),
    )),
    Policy("Inventory refresh", (
        _get("./DevDetail/SwV", "chr"),
        _get("./DevDetail/Ext/Microsoft/DeviceName", "chr"),
        _get("./DevDetail/Ext/Microsoft/TotalStorage"),
        _get(f"{_DEVICE}/DeviceStatus/OS/Mode"),
        _get(f"{_DEVICE}/DeviceStatus/Battery/EstimatedChargeRemaining"),
    )),
    Policy("Privacy settings", (
        (f"{_POLICY}/Privacy/LetAppsAccessCamera", "Replace", "2", "int"),
        (f"{_POLICY}/Browser/AllowPasswordManager", "Replace", "0", "int"),
        (f"{_POLICY}/System/AllowTelemetry", "Replace", "1", "int"),
    )),
    Policy("Reception PC setup", (
        (f"{_USER_POLICY}/Education/DefaultPrinterName", "Add", "Reception-MFP", "chr"),
        (f"{_USER_POLICY}/Start/HideRecentlyAddedApps", "Replace", "1", "int"),
        (f"{_DEVICE}/Accounts/Domain/ComputerName", "Replace", "%SERIAL%", "chr"),
    )),
    Policy("Bluetooth off (field devices)", (
        (f"{_POLICY}/Connectivity/AllowBluetooth", "Replace", "0", "int"),
    )),
)

# Desktop apps (name, version, MSI product code). EnterpriseDesktopAppManagement names each
# app's node after its product code, braces included: one node per app, one setting for all.
APPS: tuple[tuple[str, str, str], ...] = (
    ("7-Zip", "24.09", "{23170F69-40C1-2702-2409-000001000000}"),
    ("Google Chrome", "131.0.6778.86", "{1B2E9A4C-3F5D-4E61-9C07-5A8D2B64F310}"),
    ("Mozilla Firefox ESR", "128.5.1", "{8C4E27D1-6A93-4B0F-B1E5-27F3C9D04A68}"),
    ("Zoom Workplace", "6.2.11", "{3D9F5B82-0C47-4E1A-8F26-D4B1E7A90C53}"),
    ("Adobe Acrobat Reader", "24.005.20320", "{AC76BA86-7AD7-1033-7B44-AC0F074E4100}"),
    ("Notepad++", "8.7.1", "{5E0F7C13-B2A8-4D96-A351-0F8E6C2D47B9}"),
)


def _app_install(name: str, version: str, product: str) -> Policy:
    # Add creates the product's node, Exec hands it the install job, Get reads its status.
    node = f"{_DEVICE}/EnterpriseDesktopAppManagement/MSI/{product}"
    package = name.lower().replace(" ", "-")
    job = (
        f'<MsiInstallJob id="{product}"><Product Version="{version}"><Download>'
        f"<ContentURLList><ContentURL>https://apps.example.com/{package}-{version}.msi"
        "</ContentURL></ContentURLList></Download><Enforcement><CommandLine>/quiet"
        "</CommandLine><TimeOut>10</TimeOut><RetryCount>3</RetryCount><RetryInterval>5"
        "</RetryInterval></Enforcement></Product></MsiInstallJob>"
    )
    return Policy(f"Install {name} {version}", (
        (f"{node}/DownloadInstall", "Add", None, "node"),
        (f"{node}/DownloadInstall", "Exec", job, "xml"),
        _get(f"{node}/Status"),
    ))


def _wifi(ssid: str, authentication: str) -> Policy:
    profile = (
        '<WLANProfile xmlns="http://www.microsoft.com/networking/WLAN/profile/v1">'
        f"<name>{ssid}</name><SSIDConfig><SSID><name>{ssid}</name></SSID></SSIDConfig>"
        "<connectionType>ESS</connectionType><connectionMode>auto</connectionMode><MSM>"
        f"<security><authEncryption><authentication>{authentication}</authentication>"
        "<encryption>AES</encryption><useOneX>false</useOneX></authEncryption></security>"
        "</MSM></WLANProfile>"
    )
    return Policy(f"Wi-Fi: {ssid}", ((f"./Vendor/MSFT/WiFi/Profile/{ssid}/WlanXml", "Add",
                                      profile, "xml"),))


_VPN = f"{_DEVICE}/VPNv2/CorpVPN"
_TENANT = "5f6b8c2e-9d41-4a7b-b3e0-c19d27a4f8b6"
_ROOT_CA = "8F43288AD272F3103B6FB1428485EA3014C0BCFE"  # the certificate's SHA-1 thumbprint

# Profiles and packages: pushed as a whole, never filler of another batch.
PACKAGES: tuple[Policy, ...] = (
    *(_app_install(*app) for app in APPS),
    _wifi("Corp-WiFi", "WPA2"),
    _wifi("Warehouse-5G", "WPA3SAE"),
    Policy("Always-on VPN", (
        (f"{_VPN}/ProfileXML", "Add",
         "<VPNProfile><AlwaysOn>true</AlwaysOn><NativeProfile><Servers>vpn.example.com"
         "</Servers><NativeProtocolType>IKEv2</NativeProtocolType><Authentication>"
         "<UserMethod>Eap</UserMethod></Authentication></NativeProfile></VPNProfile>", "xml"),
        (f"{_VPN}/AlwaysOn", "Replace", "true", "bool"),
        (f"{_VPN}/RememberCredentials", "Replace", "true", "bool"),
    )),
    Policy("Trust corporate root CA", (
        (f"{_DEVICE}/RootCATrustedCertificates/Root/{_ROOT_CA}/EncodedCertificate", "Add",
         "MIIDdzCCAl+gAwIBAgIQGx1Yx4cw5JpKZ8yH0Nq2fTANBgkqhkiG9w0BAQsFADBO", "b64"),
    )),
    Policy("Windows Hello for Business", (
        (f"{_DEVICE}/PassportForWork/{_TENANT}/Policies/UsePassportForWork",
         "Replace", "true", "bool"),
        (f"{_DEVICE}/PassportForWork/{_TENANT}/Policies/PINComplexity/MinimumPINLength",
         "Replace", "6", "int"),
    )),
    Policy("Quick scan", (_exec(f"{_DEVICE}/Defender/Scan/QuickScan"),)),
    Policy("Restart after patching", (_exec(f"{_DEVICE}/Reboot/RebootNow"),)),
)

# What an administrator pushes to many devices at once.
ROLLOUTS: tuple[Policy, ...] = SETTINGS + PACKAGES

# Only ever for one device at a time.
ONE_OFF: tuple[Policy, ...] = (
    Policy("Rename device", (
        (f"{_DEVICE}/Accounts/Domain/ComputerName", "Replace", "%SERIAL%", "chr"),
    )),
    Policy("Wipe (protected)", (_exec("./Vendor/MSFT/RemoteWipe/doWipeProtected"),)),
)

POLICIES: tuple[Policy, ...] = ROLLOUTS + ONE_OFF

# Commands that fill a batch up to its drawn size: the settings, without repeats.
COMMANDS: tuple[Config, ...] = tuple(
    dict.fromkeys(config for policy in SETTINGS for config in policy.configs)
)
# Per policy, the fill commands it does not already hold.
FILL: dict[str, tuple[Config, ...]] = {
    policy.name: tuple(c for c in COMMANDS if c not in policy.configs) for policy in POLICIES
}


@lru_cache(maxsize=4096)
def user_policies(sid: str, email: str) -> tuple[Policy, ...]:
    """Policies for the device's signed-in user: certificate nodes named after the user."""
    scep = f"./User/Vendor/MSFT/ClientCertificateInstall/SCEP/{sid}/Install"
    pfx = f"./User/Vendor/MSFT/ClientCertificateInstall/PFXCertInstall/{email}"
    return (
        Policy("Wi-Fi certificate (SCEP)", (
            (f"{scep}/ServerURL", "Add", "https://scep.example.com/certsrv/mscep/mscep.dll",
             "chr"),
            (f"{scep}/SubjectName", "Add", f"CN={email}", "chr"),
            _exec(f"{scep}/Enroll"),
        )),
        Policy("S/MIME certificate", (
            (f"{pfx}/KeyLocation", "Add", "2", "int"),
            (f"{pfx}/PFXCertBlob", "Add", "MIIKVAIBAzCCChAGCSqGSIb3DQEHAaCCCgEEggn9", "b64"),
        )),
    )


class ModelFailure(NamedTuple):
    model: str
    path: str
    status: str


# One setting fails on one hardware model every time and succeeds elsewhere, as on a model
# whose firmware ships with its TPM turned off: device encryption answers 406 (optional
# feature not supported) there. The model must be one the fleet draws (profiles._MODELS).
MODEL_FAILURE = ModelFailure(
    "OptiPlex 7010", f"{_DEVICE}/BitLocker/RequireDeviceEncryption", "NotSupported"
)

# What a successful Get returns, by format.
GET_RESULTS: dict[str, str] = {"int": "1", "chr": "10.0.22631.4460", "bool": "true"}

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
