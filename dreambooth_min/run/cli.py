"""The command lines' shared plumbing: flags generated from a settings dataclass, and one-line errors.

A field `class_noun: str = option("person", "what the subject is", group)` becomes `--class-noun` with
that help in that group; a bool that defaults to True becomes `--no-<name>`; `alias=(flag, value)` adds
a flag that sets the field to a fixed value (--no-prior = --prior-weight 0).
"""
import argparse
import dataclasses
import difflib
import errno
import sys

from ..errors import SettingError, UserError, is_out_of_memory


def flag(name):
    return "--" + name.replace("_", "-")


def _add_option(group, f):
    meta = dict(f.metadata)
    help, flags = meta.pop("help"), meta.pop("flags", (flag(f.name),))
    meta.pop("group")
    alias = meta.pop("alias", None)
    if f.type in (bool, "bool"):
        if f.default:
            group.add_argument(flag("no_" + f.name), dest=f.name, action="store_false", help=help)
        else:
            group.add_argument(*flags, dest=f.name, action="store_true", help=help)
        return
    kind = {"int": int, "float": float, "tuple": _comma_list}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
    default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
    shown = f" (default: {default!r})" if isinstance(default, str) and default else \
        "" if default in ("", 0, 0.0) or "(0:" in help else f" (default: {default})"
    if "choices" not in meta:
        meta.setdefault("metavar", {int: "N", float: "X", _comma_list: "A,B,..."}.get(kind, "TEXT"))
    group.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help + shown, **meta)
    if alias:
        group.add_argument(alias[0], dest=f.name, action="store_const", const=alias[1], default=argparse.SUPPRESS,
                           help=f"= {flags[0]} {alias[1]}")


def _comma_list(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_options(parser, settings_class):
    """One flag per field of `settings_class`, in argument groups named by the fields' `group`."""
    groups = {}
    for f in dataclasses.fields(settings_class):
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        _add_option(groups[name], f)
    return parser


def settings_from_args(settings_class, args):
    """The dataclass with every flag the user gave; the others keep the fields' defaults."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    return settings_class(**{k: v for k, v in vars(args).items() if k in names})


EXIT_CODES = {"done": 0, "bad input": 2, "out of memory": 3, "disk full": 4, "interrupted (Ctrl-C, SIGTERM)": 130}


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes read like every other bad input: one `error:` line and exit status 2 (argparse's
    own prints the whole usage first), with the nearest flag for a mistyped one."""

    def error(self, message):
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        words = [w.rstrip(":") for w in message.replace(",", " ").split()]  # "argument --dora: invalid choice"
        typos = [w for w in words if w.startswith("--") and w not in flags]
        near = [m for w in typos for m in difflib.get_close_matches(w, flags, n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        print(f"error: {message}{hint}; see --help", file=sys.stderr)
        sys.exit(EXIT_CODES["bad input"])


def run_command(main):
    """Run main(); an error becomes one `error:` line and its exit status (EXIT_CODES): bad input 2,
    out of memory 3, disk full 4 (UserError subclasses say theirs in `exit_code`); Ctrl-C 130."""
    try:
        return main()
    except SettingError as e:  # names the flag, not the field
        print(f"error: {flag(e.setting)} {e.problem}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # its message, if any, says what was kept and how to go on
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError, OSError) as e:
        # The last net for a failure no code path turned into a sentence: still one line, not a traceback.
        code = _resource_exit_code(e)
        if code is None:
            raise
        what = "out of memory" if code == 3 else f"the disk is full: could not write {e.filename or 'a file'}"
        print(f"error: {what} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
              file=sys.stderr)
        return code


def _resource_exit_code(error):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 4
    return 3 if is_out_of_memory(error) else None
