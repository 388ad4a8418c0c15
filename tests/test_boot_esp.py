"""The boot loader's files where NixOS users put them (issue #22, item 8),
against the real agent and real nix.

$BOOT (systemd-boot's entries and the kernels it copies) is
boot.loader.systemd-boot.xbootldrMountPoint, else boot.loader.efi.efiSysMountPoint:
/boot by default, /boot/efi or /efi on many hosts.  The agent must find the
entries there (an entry without tries left settles a fallback), check the
space there, and never take a fallback for a manual choice: not when the
entries are out of its sight, not when LoaderEntryDefault is a pattern
(`bootctl set-default 'nixos-*'`; systemd-boot never copies loader.conf's
`default nixos-*`, what nixpkgs 26.11 writes, into the variable), not when
the EFI variables carry the counter as it was at boot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from util import MiB, boot_default, efivars, fall_back, fill_leaving, stage
from util import assert_host, state_gauge

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autodeploy as ad  # noqa: E402

LOCATIONS = ["/boot", "/boot/efi", "/efi"]


@pytest.fixture
def boot_host(host):
    yield host
    host.unmount_boot()


def entry(directory: Path, name: str, system: str) -> None:
    (directory / name).write_text(f"title NixOS\nversion 1\nlinux /EFI/nixos/x.efi\n"
                                  f"options init={system}/init quiet\n")


@pytest.mark.parametrize("given", [False, True], ids=["found", "--boot-dir"])
@pytest.mark.parametrize("at", LOCATIONS)
def test_an_exhausted_entry_on_the_esp_is_a_fallback(boot_host, world, server, at, given):
    """The entry files settle it wherever the ESP is mounted, even when the EFI
    variables say the booted entry was not the default (which alone would read
    as a manual choice, `booted_previous`, nothing counted)."""
    host = boot_host
    a, b = world.path("a"), world.path("b")
    mount = host.mount_boot(8 * MiB, at=at)
    args = ("--boot-dir", at) if given else ()
    stage(host, b, *args)
    fall_back(host, a)
    entries = mount / "loader" / "entries"
    # nixpkgs 26.11 names entries nixos-<content hash>.conf, with the counter
    # systemd-boot left on the staged one.
    entry(entries, "nixos-" + "1" * 32 + ".conf", a)
    entry(entries, "nixos-" + "2" * 32 + "+0-1.conf", b)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-" + "1" * 32 + ".conf", "nixos-" + "2" * 32 + ".conf")}
    r = host.once(host.url, "--switch-mode", "boot", *args, env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed"
    failure = host.state()["boot_failure"]
    assert failure["choice"] == "loader" and "+0-1.conf" in failure["reason"], failure
    assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 1
    assert_host(host, current=a, profile=a, deployed=a)
    assert boot_default(host) == a


@pytest.mark.parametrize("at", LOCATIONS)
def test_space_is_checked_where_the_kernels_go(boot_host, world, server, at):
    host = boot_host
    k = world.path("k")
    mount = host.mount_boot(16 * MiB, at=at)
    assert host.once(host.url).returncode == 0
    filler = fill_leaving(mount, 2 * MiB)
    server.pointer(k)
    r = host.once(host.url)
    assert r.returncode == 5, r.stderr
    assert f"{at} has" in r.stderr and "not deploying" in r.stderr, r.stderr
    m = host.metrics()
    assert 0 < m["nixos_autodeploy_boot_free_bytes"] <= 2 * MiB
    assert m["nixos_autodeploy_boot_needed_bytes"] > 2 * MiB
    assert list((mount / "EFI" / "nixos").iterdir()) == []
    filler.unlink()
    r = host.once(host.url)
    assert r.returncode == 0, r.stderr
    assert host.current == k
    assert len(list((mount / "EFI" / "nixos").iterdir())) == 2  # kernel and initrd, on the ESP


@pytest.mark.parametrize("selected", ["nixos-" + "1" * 32 + "+0-1.conf", "nixos-" + "1" * 32 + ".conf"])
def test_a_pattern_default_records_no_manual_choice(host, world, server, selected):
    """`bootctl set-default 'nixos-*'`: systemd-boot reports the pattern as
    LoaderEntryDefault.  Booting an older entry is then the boot loader's
    fallback (counted, quarantined), never `booted_previous`."""
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, selected, "nixos-*")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5, r.stderr
    assert state_gauge(host) == "boot_failed"
    assert host.state()["boot_failure"]["choice"] == "loader"
    assert "nixos-*" in host.state()["boot_failure"]["reason"]
    assert host.metrics()["nixos_autodeploy_boot_failures_total"] == 1


def test_variables_with_the_counter_as_at_boot_are_the_default(host, world, server):
    """LoaderEntrySelected carries the counter as it was at boot (`+1-0`), the
    default none: the same entry, so the loader booted its default."""
    a, b = world.path("a"), world.path("b")
    stage(host, b)
    fall_back(host, a)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-" + "1" * 32 + "+1-0.conf",
                                               "nixos-" + "1" * 32 + ".conf")}
    r = host.once(host.url, "--switch-mode", "boot", env=env)
    assert r.returncode == 5, r.stderr
    assert host.state()["boot_failure"]["choice"] == "loader"


def test_boot_entry_choice_table(tmp_path, monkeypatch):
    """The helper itself: counters stripped, patterns never manual, a real
    manual pick still told apart."""
    monkeypatch.setenv(ad.EFIVARS_ENV, str(tmp_path))

    def choice(selected, default):
        for name, value in (("LoaderEntrySelected", selected), ("LoaderEntryDefault", default)):
            path = tmp_path / f"{name}-{ad.LOADER_GUID}"
            if value is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le"))
        return ad.boot_entry_choice(None, str(tmp_path / "no-boot"))[0]

    assert choice("foo+1-0.conf", "foo.conf") == "loader"
    assert choice("foo+0-1.conf", "foo+1.conf") == "loader"
    assert choice("foo.conf", "bar.conf") == "manual"
    assert choice("foo+2-1.conf", "bar+3.conf") == "manual"
    assert choice("nixos-abc+0-2.conf", "nixos-*") == "loader"
    assert choice("windows.conf", "nixos-*") == "unknown"
    assert choice("foo.conf", None) == "unknown"
    assert ad.entry_id_without_counter("nixos-ab+12-3.conf") == "nixos-ab.conf"
    assert ad.entry_id_without_counter("nixos-ab+1") == "nixos-ab"
    assert ad.entry_id_without_counter("a+b.conf") == "a+b.conf"


def test_boot_dir_is_found_among_the_usual_mount_points(tmp_path, monkeypatch):
    monkeypatch.setenv(ad.EFIVARS_ENV, str(tmp_path / "efivars"))  # never the machine's
    roots = {name: tmp_path / name.strip("/").replace("/", "-") for name in ad.BOOT_DIR_CANDIDATES}
    monkeypatch.setattr(ad, "BOOT_DIR_CANDIDATES", tuple(str(p) for p in roots.values()))
    monkeypatch.setattr(ad, "BOOT_DIR", str(roots["/boot"]))
    assert ad.boot_dir_of(None) == str(roots["/boot"])  # nothing anywhere: /boot
    (roots["/boot/efi"] / "loader" / "entries").mkdir(parents=True)
    assert ad.boot_dir_of(None) == str(roots["/boot/efi"])
    (roots["/efi"] / "EFI" / "nixos").mkdir(parents=True)
    assert ad.boot_dir_of(None) == str(roots["/efi"])  # /efi before /boot/efi
    (roots["/boot"] / "grub").mkdir(parents=True)
    assert ad.boot_dir_of(None) == str(roots["/boot"])  # GRUB copies into /boot
    # ... unless systemd-boot booted: then its entries decide, not GRUB's leftovers
    (tmp_path / "efivars").mkdir()
    (tmp_path / "efivars" / f"LoaderInfo-{ad.LOADER_GUID}").write_bytes(
        b"\x06\x00\x00\x00" + "systemd-boot 258.1\0".encode("utf-16-le"))
    assert ad.boot_dir_of(None) == str(roots["/boot/efi"])
    (roots["/boot"] / "loader" / "entries").mkdir(parents=True)
    assert ad.boot_dir_of(None) == str(roots["/boot"])  # XBOOTLDR at /boot, ESP elsewhere
    assert ad.boot_dir_of("/given") == "/given"


def test_boot_dir_option():
    parser = ad.build_parser()
    args = parser.parse_args(["run", "--url", "http://x/p", "--boot-dir", "/boot/efi/"])
    assert ad.config_from_args(args).boot_dir == "/boot/efi"
    assert ad.config_from_args(parser.parse_args(["run", "--url", "http://x/p"])).boot_dir is None
    with pytest.raises(ad.UsageError, match="invalid absolute path value"):
        parser.parse_args(["run", "--url", "http://x/p", "--boot-dir", "boot/efi"])


def loader_info(host, value: str) -> None:
    """systemd-boot's LoaderInfo variable ("systemd-boot 258.1"): set by
    systemd-boot on every boot, by GRUB never."""
    d = host.root / "efivars"
    d.mkdir(exist_ok=True)
    (d / f"LoaderInfo-{ad.LOADER_GUID}").write_bytes(b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le"))


@pytest.mark.parametrize("given", [False, True], ids=["systemd-boot-booted", "--boot-dir"])
def test_grub_leftovers_in_boot_do_not_hide_the_esp(boot_host, world, server, given):
    """systemd-boot with the ESP at /boot/efi, on a host that used GRUB before:
    /boot (the root file system) still holds grub/ and kernels/.  The entries
    on the ESP must settle the fallback, not the EFI variables alone (which
    read as a manual choice), and the space check must run on the ESP, both
    with the module's --boot-dir and without it on a host systemd-boot booted."""
    host = boot_host
    a, b, k = world.path("a"), world.path("b"), world.path("k")
    mount = host.mount_boot(16 * MiB, at="/boot/efi")
    for leftover in ("grub", "kernels"):
        (host.root / "boot-dir" / leftover).mkdir()
    args = ("--boot-dir", "/boot/efi") if given else ()
    stage(host, b, *args)
    fall_back(host, a)
    entries = mount / "loader" / "entries"
    entry(entries, "nixos-generation-1.conf", a)
    entry(entries, "nixos-generation-2+0-1.conf", b)
    env = {"NIXOS_AUTODEPLOY_EFIVARS": efivars(host, "nixos-generation-1.conf", "nixos-generation-2.conf")}
    if not given:  # --boot-dir alone must do it (no LoaderInfo to fall back on)
        loader_info(host, "systemd-boot 258.1")
    r = host.once(host.url, "--switch-mode", "boot", *args, env=env)
    assert r.returncode == 5, r.stderr
    failure = host.state()["boot_failure"]
    assert failure["choice"] == "loader" and "+0-1.conf" in failure["reason"], failure
    # the space check runs where the kernels go: the ESP, not the leftovers
    filler = fill_leaving(mount, 2 * MiB)
    server.pointer(k)
    r = host.once(host.url, *args, env=env)
    assert r.returncode == 5, r.stderr
    assert "/boot/efi has" in r.stderr and "not deploying" in r.stderr, r.stderr
    filler.unlink()
