"""Settings: a CSP path becomes a label that does not grow with the fleet."""

from __future__ import annotations

import pytest

from exporter.settings import operation, setting

POLICY = "Policy/Config/Security/RequireDeviceEncryption"
APP = "EnterpriseDesktopAppManagement/MSI/*/DownloadInstall"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # The scope prefix and Vendor/MSFT go, in any case.
        (f"./Device/Vendor/MSFT/{POLICY}", POLICY),
        (f"./Vendor/MSFT/{POLICY}", POLICY),
        (f"./User/Vendor/MSFT/{POLICY}", POLICY),
        (f"./device/vendor/msft/{POLICY}", POLICY),
        ("./DevDetail/SwV", "DevDetail/SwV"),
        # Instance segments become *.
        ("./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/"
         "{9BD7C3B5-6B1A-4A1B-9C2E-1D2F3A4B5C6D}/DownloadInstall", APP),
        ("./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/"
         "9bd7c3b5-6b1a-4a1b-9c2e-1d2f3a4b5c6d/DownloadInstall", APP),
        ("./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/"
         "%7B9BD7C3B5-6B1A-4A1B-9C2E-1D2F3A4B5C6D%7D/DownloadInstall", APP),
        ("./Vendor/MSFT/RootCATrustedCertificates/Root/0563B8630D62D75ABBC8AB1E4BDFB5A899B24D43"
         "/EncodedCertificate", "RootCATrustedCertificates/Root/*/EncodedCertificate"),
        ("./Vendor/MSFT/NodeCache/65f0c0ffee65f0c0ffee0001/X", "NodeCache/*/X"),
        ("./Vendor/MSFT/Office/Installation/3/Status", "Office/Installation/*/Status"),
        ("./User/Vendor/MSFT/Accounts/S-1-5-21-3623811015-3361044348-30300820-1013/X",
         "Accounts/*/X"),
        ("./Vendor/MSFT/Mail/jane.doe@example.com/Sync", "Mail/*/Sync"),
        # Names chosen by an administrator are settings of their own.
        ("./Vendor/MSFT/WiFi/Profile/Guest/WlanXml", "WiFi/Profile/Guest/WlanXml"),
        ("./Device/Vendor/MSFT/VPNv2/Corp VPN/ProfileXML", "VPNv2/Corp VPN/ProfileXML"),
        # Short hex-looking node names are not ids.
        ("./Vendor/MSFT/Policy/Config/Update/DeferFeatureUpdates",
         "Policy/Config/Update/DeferFeatureUpdates"),
        # Nothing to name.
        (None, "none"), ("", "none"), ("  ", "none"), ("./", "none"), ("./Device/", "none"),
    ],
)
def test_setting_of_a_path(path: str | None, expected: str) -> None:
    assert setting(path) == expected


def test_forty_product_guids_are_one_setting() -> None:
    paths = {
        f"./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/{{{n:08X}-0000-4000-8000-"
        f"{n:012X}}}/DownloadInstall"
        for n in range(40)
    }
    assert {setting(p) for p in paths} == {APP}


@pytest.mark.parametrize(
    ("given", "expected"),
    [("Replace", "Replace"), ("replace", "Replace"), (" EXEC ", "Exec"), ("Add", "Add"),
     ("Copy", "Copy"), ("Delete", "Delete"), ("Get", "Get"), ("Atomic", "other"),
     ("x" * 5000, "other"), (None, "none"), ("", "none")],
)
def test_operation_is_one_of_the_documented_names(given: str | None, expected: str) -> None:
    assert operation(given) == expected
