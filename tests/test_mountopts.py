"""``-o`` mount options and the mount(8)-helper command line (rangefs/mountopts.py).

In-process: what each ``-o`` spelling parses to (through click, compared with the long
option), the generic options of mount(8) that are ignored, the refusals. The CLI in a
subprocess: an unknown option is one line and exit 2. Real mounts through mount(8) are in
tests/test_fstab.py.
"""

from __future__ import annotations

from typing import Any

import click
import pytest

from rangefs import cli, mountopts
from rangefs.errors import UsageError
from tests.mountutil import run_rangefs

# One valid value for each option of `rangefs mount` that takes one, and the flags.
SAMPLES: dict[str, str | None] = {
    "cache_dir": "/var/cache/rangefs/x",
    "cache_size": "50G",
    "cache_min_free": "10%",
    "block_size": "1M",
    "concurrency": "8",
    "max_rate": "10M",
    "prefetch": "none",
    "read_timeout": "5",
    "header": "X-A: b",
    "proxy": "http://proxy:3128",
    "no_proxy": None,
    "cacert": "/etc/ssl/ca.pem",
    "header_file": "/etc/rangefs/h",
    "url_command": "/usr/local/bin/presign",
    "url_command_timeout": "10",
    "allow_other": None,
    "foreground": None,
    "log_file": "/var/log/rangefs.log",
    "verbose": None,
    "debug": None,
}


def _params(args: list[str]) -> dict[str, Any]:
    """What `rangefs ARGS` passes to the mount command (parsed, not run)."""
    rewritten = mountopts.rewrite_argv(args, cli.rangefs)
    assert rewritten[0] == "mount", rewritten
    ctx = cli.mount_command.make_context("mount", rewritten[1:])
    return dict(ctx.params)


def _long_option(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_mount_option_has_an_o_spelling() -> None:
    table = mountopts.option_table(cli.mount_command)
    for name in SAMPLES:
        assert name in table, name
    for name, spelling in table.items():
        assert spelling.option == _long_option(name), (name, spelling)


@pytest.mark.parametrize(("name", "value"), SAMPLES.items())
def test_each_o_option_means_its_long_option(name: str, value: str | None) -> None:
    item = name if value is None else f"{name}={value}"
    long_args = [_long_option(name)] if value is None else [_long_option(name), value]
    expected = cli.mount_command.make_context("mount", [*long_args, "L", "M"]).params
    assert _params(["L", "M", "-o", item]) == expected
    assert _params(["mount", "L", "M", "-o", item]) == expected
    assert _params(["-o", item, "L", "M"]) == expected


def test_every_option_of_the_command_translates() -> None:
    """Options added to `rangefs mount` later get their spelling with no change here."""
    table = mountopts.option_table(cli.mount_command)
    for name, spelling in table.items():
        if spelling.takes_value:
            assert mountopts.translate(f"{name}=v", table) == [f"{spelling.option}=v"]
        else:
            assert mountopts.translate(name, table) == [spelling.option]


def test_a_whole_fstab_option_string() -> None:
    """What mount(8) and mount.fuse3 hand over for a typical fstab line (rw first, dev,suid
    appended as root) next to rangefs' own options."""
    params = _params([
        "/etc/rangefs/m.urls", "/mnt/m", "-o",
        "rw,relatime,noexec,nosuid,nodev,allow_other,cache_size=50G,cache_dir=/c,"
        "block_size=1M,concurrency=8,prefetch=all,read_timeout=120,no_proxy,verbose=2,dev,suid",
    ])
    assert params["urllist"] == "/etc/rangefs/m.urls" and params["mountpoint"] == "/mnt/m"
    assert params["allow_other"] is True and params["no_proxy"] is True
    assert params["cache_size"] == 50 << 30 and str(params["cache_dir"]) == "/c"
    assert params["block_size"] == 1 << 20 and params["concurrency"] == 8
    assert params["prefetch"] == "all" and params["read_timeout"] == 120.0
    assert params["verbose"] == 2
    assert params["foreground"] is False, "a helper detaches: mount(8) waits for it"


def test_o_lists_anywhere_repeated_attached_and_with_other_options() -> None:
    params = _params(["-ocache_size=1G", "L", "-v", "M", "-f", "-o", "allow_other",
                      "-o", "verbose", "--block-size", "256K"])
    assert params["cache_size"] == 1 << 30 and params["allow_other"] is True
    assert params["verbose"] == 2 and params["foreground"] is True
    assert params["block_size"] == 256 << 10
    # a value option's value is never taken for a positional argument or an -o list
    params = _params(["--header", "-o", "L", "M", "-o", "no_proxy"])
    assert params["headers"] == ("-o",) and params["no_proxy"] is True


def test_double_dash_ends_the_options() -> None:
    assert mountopts.rewrite_argv(["-o", "allow_other", "--", "-o", "M"], cli.rangefs) == [
        "mount", "--allow-other", "--", "-o", "M",
    ]


def test_quoted_values_keep_their_commas() -> None:
    params = _params(["L", "M", "-o", 'header="X-List: a,b",allow_other'])
    assert params["headers"] == ("X-List: a,b",) and params["allow_other"] is True
    with pytest.raises(UsageError, match="quote"):
        mountopts.split_options('header="X: a,b')
    assert mountopts.split_options(",a,,b=1,") == ["a", "b=1"]


@pytest.mark.parametrize("item", [
    "ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "nodev", "dev", "nosuid", "suid", "noexec", "exec", "atime",
    "noatime", "relatime", "strictatime", "lazytime", "nodiratime", "sync", "async",
    "dirsync", "default_permissions", "x-systemd.automount", "x-systemd.idle-timeout=60",
    "x-systemd.requires=network-online.target", "x-gvfs-show", "comment=systemd.automount",
    "comment=x-gvfs-show",
])
def test_generic_mount_options_are_ignored(item: str) -> None:
    table = mountopts.option_table(cli.mount_command)
    assert mountopts.translate(item, table) == []
    assert item in mountopts.IGNORED or item.startswith(mountopts.IGNORED_PREFIXES)


@pytest.mark.parametrize(("item", "needle"), [
    ("bogus", "unknown mount option 'bogus'"),
    ("bogus=1", "unknown mount option 'bogus=1'"),
    ("allow_root", "unknown mount option 'allow_root'"),
    ("auto_unmount", "unknown mount option 'auto_unmount'"),
    ("cache-size=1G", "unknown mount option 'cache-size=1G'"),
    ("ro=1", "ro takes no value"),
    ("allow_other=yes", "allow_other is a flag"),
    ("cache_size", "cache_size needs a value"),
    ("verbose=lots", "give a count"),
])
def test_bad_o_options_are_refused(item: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        mountopts.rewrite_argv(["L", "M", "-o", f"allow_other,{item}"], cli.rangefs)
    assert needle in str(info.value)


def test_other_commands_and_the_group_are_left_alone() -> None:
    for args in (
        [], ["--help"], ["--version"], ["mount", "--help"],
        ["download", "http://h/x", "-o", "x"], ["cat", "http://h/x"],
    ):
        assert mountopts.rewrite_argv(args, cli.rangefs) == args
    assert mountopts.rewrite_argv(["mount", "L", "M"], cli.rangefs) == ["mount", "L", "M"]
    assert mountopts.rewrite_argv(["L", "M"], cli.rangefs) == ["mount", "L", "M"]
    with pytest.raises(UsageError, match="-o needs"):
        mountopts.rewrite_argv(["L", "M", "-o"], cli.rangefs)


def test_value_options_read_from_the_click_command() -> None:
    """The scan that finds positional arguments knows every option that takes a value."""
    values = mountopts._value_options(cli.mount_command)
    for param in cli.mount_command.params:
        if isinstance(param, click.Option) and not (param.is_flag or param.count):
            assert set(param.opts) <= values
    assert "-f" not in values and "--allow-other" not in values


# -- the CLI in a subprocess: one line, exit 2, nothing mounted ------------------------------


@pytest.mark.parametrize("prefix", [[], ["mount"]])
def test_unknown_o_option_is_one_line_and_exit_2(tmp_path: Any, prefix: list[str]) -> None:
    result = run_rangefs([*prefix, str(tmp_path / "l.urls"), str(tmp_path),
                          "-o", "allow_other,frobnicate=3"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rangefs: unknown mount option 'frobnicate=3'"), lines


def test_a_bad_o_value_is_the_options_own_error(tmp_path: Any) -> None:
    result = run_rangefs([str(tmp_path / "l.urls"), str(tmp_path), "-o", "block_size=3000"])
    assert result.returncode == 2, result.stderr
    assert "--block-size" in result.stderr and "Traceback" not in result.stderr
