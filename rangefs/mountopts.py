"""``-o`` mount options, and rangefs as the mount(8) helper of ``fuse.rangefs``.

``mount -t fuse.rangefs LIST MOUNTPOINT -o OPTS`` (and an fstab line or a systemd
``.mount`` unit, which run the same command) reaches rangefs through ``mount.fuse3``:
mount(8) runs ``/sbin/mount.fuse LIST MOUNTPOINT -o rw,OPTS -t fuse.rangefs`` with
``PATH``, ``HOME`` and ``SHELL`` removed from the environment (util-linux 2.38 does that
even for root), and mount.fuse3 runs ``/bin/sh -c "'rangefs' 'LIST' 'MOUNTPOINT' '-o'
'OPTS'"`` - found through the shell's default PATH (``/usr/local/sbin:/usr/local/bin:
/usr/sbin:/usr/bin:/sbin:/bin`` for Debian's dash). mount(8) adds ``rw`` unless ``ro`` is
given and turns ``user``/``users`` into ``noexec,nosuid,nodev``; mount.fuse3 drops
``user``, ``users``, ``nouser``, ``auto``, ``noauto``, ``_netdev``, ``nofail`` and, as
root, appends ``dev,suid`` unless ``nodev``/``nosuid`` were given. mount(8) waits for the
helper: rangefs' default (fork, return once the mount answers, the child's error on
stderr with its exit code) is what it needs.

:func:`rewrite_argv` turns such a command line (``rangefs LIST MOUNTPOINT -o ...``, no
subcommand) into ``rangefs mount ...``, and every ``-o`` list (there or after ``rangefs
mount``, before or after the positional arguments) into long options: ``NAME=VALUE`` is
``--NAME VALUE`` and a bare ``NAME`` the flag ``--NAME`` for every option of ``rangefs
mount``, with ``_`` for ``-`` (``cache_size=50G`` is ``--cache-size 50G``). The table is
read from the click command itself, so an option added there gets its ``-o`` spelling
too. The generic options of mount(8) are accepted and ignored (:data:`IGNORED`); an
unknown one is a :class:`UsageError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import click

from .errors import UsageError

# Generic mount options, accepted and ignored, each with the reason (for the docs).
IGNORED: dict[str, str] = {
    **dict.fromkeys(("ro", "rw"), "a rangefs mount is always read-only (mount(8) adds rw "
                    "whenever ro is not given; writes get EROFS either way)"),
    **dict.fromkeys(("defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                     "group", "_netdev", "nofail"),
                    "for mount(8) and systemd, not the file system"),
    **dict.fromkeys(("nodev", "dev", "nosuid", "suid"),
                    "always nodev,nosuid (mount.fuse3 adds dev,suid as root)"),
    **dict.fromkeys(("noexec", "exec"), "files are r--r--r--: nothing can be executed"),
    **dict.fromkeys(("atime", "noatime", "relatime", "norelatime", "strictatime",
                     "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime"),
                    "a read-only mount never updates access times"),
    **dict.fromkeys(("sync", "async", "dirsync"), "nothing is ever written"),
    "default_permissions": "always on: the kernel checks the r--r--r-- modes",
}
# Prefixes of options meant for mount(8), systemd and file managers.
IGNORED_PREFIXES = ("x-", "comment=")

OPTION_FLAG = "-o"


@dataclass(frozen=True)
class Spelling:
    """How one ``-o`` name is given to the click command."""

    option: str  # the long option, e.g. '--cache-size'
    takes_value: bool  # NAME=VALUE; else a bare flag (a count: NAME or NAME=N)
    count: bool = False


def option_table(command: click.Command) -> dict[str, Spelling]:
    """``-o`` name -> long option, for every option of ``command`` that has a long form
    (``--cache-size`` -> ``cache_size``; an on/off flag's ``--no-x`` too)."""
    table: dict[str, Spelling] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        flag = param.is_flag or param.count
        for opts in (param.opts, param.secondary_opts):
            longs = [o for o in opts if o.startswith("--")]
            if not longs:
                continue
            name = longs[0][2:].replace("-", "_")
            table[name] = Spelling(longs[0], takes_value=not flag, count=param.count)
    return table


def split_options(text: str) -> list[str]:
    """``a,b=1,c="x,y"`` -> ``['a', 'b=1', 'c=x,y']``: commas inside double quotes do not
    split (libmount's quoting) and the quotes go; empty items are dropped."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise UsageError(f"mount options {text!r}: a double quote is not closed")
    items.append("".join(current))
    return [item for item in items if item]


def translate(text: str, table: dict[str, Spelling]) -> list[str]:
    """The long options for one ``-o`` list; UsageError for an unknown or malformed one."""
    args: list[str] = []
    for item in split_options(text):
        name, eq, value = item.partition("=")
        spelling = table.get(name)
        if spelling is None:
            if item in IGNORED or item.startswith(IGNORED_PREFIXES):
                continue
            if name in IGNORED:
                raise UsageError(f"mount option {name} takes no value (got {item!r})")
            raise UsageError(
                f"unknown mount option {item!r} (-o takes every 'rangefs mount' option "
                f"with _ for -, e.g. cache_size=50G, allow_other; see 'rangefs mount --help')"
            )
        if spelling.count:
            times = 1
            if eq:
                if not value.isdigit():
                    raise UsageError(f"mount option {name}={value}: give a count (e.g. {name}=2)")
                times = int(value)
            args.extend([spelling.option] * times)
        elif spelling.takes_value:
            if not eq:
                raise UsageError(f"mount option {name} needs a value ({name}=...)")
            args.append(f"{spelling.option}={value}")
        else:
            if eq:
                raise UsageError(f"mount option {name} is a flag and takes no value "
                                 f"(got {item!r})")
            args.append(spelling.option)
    return args


def _value_options(command: click.Command) -> frozenset[str]:
    """Every spelling (short and long) of ``command``'s options that take a value."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option) and not (param.is_flag or param.count):
            names.update(param.opts)
    return frozenset(names)


def _first_positional(args: Sequence[str], value_options: frozenset[str]) -> int | None:
    """Index of the first positional argument of ``args`` (options of the mount command
    skipped with their values), or None."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return i + 1 if i + 1 < len(args) else None
        if arg == OPTION_FLAG or arg in value_options:
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            i += 1
            continue
        return i
    return None


def expand(args: Sequence[str], command: click.Command) -> list[str]:
    """``args`` of ``command`` with each ``-o LIST`` (or ``-oLIST``) replaced by the long
    options it stands for, in place; nothing after ``--`` is touched."""
    table = option_table(command)
    value_options = _value_options(command)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg == OPTION_FLAG:
            if i + 1 == len(args):
                raise UsageError("-o needs a list of mount options (-o opt1,opt2=value)")
            out.extend(translate(args[i + 1], table))
            i += 2
            continue
        if arg.startswith(OPTION_FLAG) and not arg.startswith("--") and arg not in value_options:
            out.extend(translate(arg[len(OPTION_FLAG):], table))
            i += 1
            continue
        out.append(arg)
        if arg in value_options and i + 1 < len(args):
            out.append(args[i + 1])
            i += 1
        i += 1
    return out


def rewrite_argv(args: Sequence[str], group: click.Group, mount: str = "mount") -> list[str]:
    """The command line click should parse: ``LIST MOUNTPOINT [-o OPTS] ...`` without a
    subcommand (as mount.fuse3 runs it) becomes ``mount LIST MOUNTPOINT ...``, and ``-o``
    lists of the mount command become long options. Other commands are left alone."""
    command = group.commands[mount]
    first = _first_positional(args, _value_options(command))
    if first is None:
        return list(args)
    if args[first] in group.commands:
        if args[first] != mount:
            return list(args)
        return [*args[: first + 1], *expand(args[first + 1 :], command)]
    return [mount, *expand(args, command)]
