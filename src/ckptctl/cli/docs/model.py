"""A model of the command tree, and the text helpers (Rich markup, paragraphs, examples) that the
man page and the markdown reference share."""

from __future__ import annotations

import enum
import inspect
import os
import re
import typing
from dataclasses import dataclass, field

PROG = "ckptctl"
HELP_COLUMNS = 100
SNAPSHOT_DIR = "tests/snapshots"
SHELLS = ("bash", "zsh", "fish")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]")

ENVIRONMENT = [
    ("CKPTCTL_DEBUG", "Set to 1 to print the full traceback along with an error message."),
    (
        "NO_COLOR",
        "When set (to anything but the empty string), no colour in any output; the same "
        "as --no-color. Tables are plain text whenever stdout is not a terminal.",
    ),
    ("COLUMNS", "Width of the terminal in characters; tables elide long names to fit it (--wide shows them in full)."),
    ("TERM", "With TERM=dumb there are no progress bars."),
    ("_CKPTCTL_COMPLETE", "Used by the shell completion scripts to ask ckptctl for completions."),
]

SEE_ALSO = "diff(1), jq(1), python(1)"


# ---- a model of the command tree ----------------------------------------------------------------
@dataclass
class ParamDoc:
    kind: str  # "argument" | "option"
    name: str
    opts: list[str]
    secondary_opts: list[str]
    metavar: str | None  # the value placeholder; None for a flag
    help: str  # Rich markup as written
    default: str | None
    choices: list[str]
    required: bool
    multiple: bool
    nargs: int


@dataclass
class CommandDoc:
    name: str
    path: str  # "ckptctl inspect"
    help: str
    short_help: str
    epilog: str
    params: list[ParamDoc]
    commands: list[CommandDoc] = field(default_factory=list)
    is_group: bool = False

    @property
    def arguments(self) -> list[ParamDoc]:
        return [p for p in self.params if p.kind == "argument"]

    @property
    def options(self) -> list[ParamDoc]:
        return [p for p in self.params if p.kind == "option"]

    @property
    def slug(self) -> str:
        return self.path.replace(" ", "-")

    def synopsis(self) -> str:
        parts = [self.path]
        if self.options:
            parts.append("[OPTIONS]")
        for a in self.arguments:
            word = a.metavar or a.name.upper()
            if a.nargs == -1 or a.multiple:
                word += "..."
            parts.append(word if a.required else f"[{word}]")
        if self.is_group:
            parts.append("COMMAND [ARGS]...")
        return " ".join(parts)


def _annotation_choices(ann) -> tuple[list[str], type | None]:
    """Choices and the base type of a parameter annotation (Enum, Literal, list[...], X | None)."""
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return [str(a) for a in typing.get_args(ann)], str
    if origin is not None:
        for a in typing.get_args(ann):
            if a is not type(None):
                return _annotation_choices(a)
        return [], None
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [str(m.value) for m in ann], ann
    return [], ann if isinstance(ann, type) else None


def _param_doc(p) -> ParamDoc | None:
    if getattr(p, "hidden", False):
        return None
    kind = getattr(p, "param_type_name", "option")
    choices: list[str] = []
    base = None
    ptype = getattr(p, "type", None)  # click-style parameters
    if ptype is not None and getattr(ptype, "choices", None):
        choices = [str(getattr(c, "value", c)) for c in ptype.choices]
    desc = getattr(p, "type_descriptor", None)  # Typer's own parameters
    if desc is not None and getattr(desc, "annotation", None) is not None:
        c2, base = _annotation_choices(desc.annotation)
        choices = choices or c2
    is_flag = bool(getattr(p, "is_flag", False)) or bool(getattr(p, "count", False))
    metavar = getattr(p, "metavar", None)
    if kind == "argument":
        metavar = metavar or p.name.upper()
    elif is_flag:
        metavar = None
    elif not metavar:
        if choices:
            metavar = "|".join(choices)
        elif base is not None and issubclass(base, os.PathLike):
            metavar = "PATH"
        elif base is int:
            metavar = "N"
        elif base is float:
            metavar = "X"
        else:
            longest = max(p.opts, key=len)
            metavar = longest.lstrip("-").replace("-", "_").upper()
    default = None
    d = getattr(p, "default", None)
    if is_flag and getattr(p, "secondary_opts", None) and isinstance(d, bool):
        # --verify/--no-verify: say which one holds when neither is given
        longest = lambda opts: max(opts, key=len)  # noqa: E731
        default = longest(p.opts) if d else longest(p.secondary_opts)
    if (
        not getattr(p, "required", False)
        and getattr(p, "show_default", True) is not False
        and not callable(d)
        and d not in (None, False, (), [])
        and not is_flag
    ):
        d = getattr(d, "value", d)
        default = ", ".join(str(getattr(x, "value", x)) for x in d) if isinstance(d, (list, tuple)) else str(d)
    return ParamDoc(
        kind=kind,
        name=p.name,
        opts=list(p.opts),
        secondary_opts=list(getattr(p, "secondary_opts", [])),
        metavar=metavar,
        help=getattr(p, "help", None) or "",
        default=default,
        choices=choices,
        required=bool(getattr(p, "required", False)),
        multiple=bool(getattr(p, "multiple", False)),
        nargs=int(getattr(p, "nargs", 1) or 1),
    )


def _clean_help(text: str | None) -> str:
    return inspect.cleandoc(text or "").partition("\f")[0].strip()


def command_tree(app=None) -> CommandDoc:
    """The whole CLI as plain data, from typer.main.get_command(app)."""
    import typer

    if app is None:
        from ckptctl.cli.app import app
    root = typer.main.get_command(app)
    return _command_doc(root, PROG, PROG)


def _command_doc(cmd, name: str, path: str) -> CommandDoc:
    params = [d for d in (_param_doc(p) for p in getattr(cmd, "params", ())) if d is not None]
    help_text = _clean_help(getattr(cmd, "help", None))
    short = getattr(cmd, "short_help", None) or (paragraphs(help_text)[0] if help_text else "")
    doc = CommandDoc(
        name=name,
        path=path,
        help=help_text,
        short_help=_clean_help(short),
        epilog=_clean_help(getattr(cmd, "epilog", None)),
        params=params,
    )
    subs = getattr(cmd, "commands", None)
    if isinstance(subs, dict):
        doc.is_group = True
        for sub_name, sub in subs.items():
            if getattr(sub, "hidden", False):
                continue
            doc.commands.append(_command_doc(sub, sub_name, f"{path} {sub_name}"))
    return doc


# ---- text: Rich markup, paragraphs, examples ----------------------------------------------------
def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_pre(par: str) -> bool:
    lines = par.split("\n")
    return all(line.startswith((" ", "\t")) for line in lines if line.strip()) or par.startswith("\b")


def runs(markup: str) -> list[tuple[str, str]]:
    """Rich markup as [(text, style)], style '' | 'b' (bold) | 'i' (italic/underline)."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        t = Text.from_markup(markup)
    except MarkupError:
        return [(markup, "")]
    plain = t.plain
    flags = [""] * len(plain)
    for span in t.spans:
        s = str(span.style)
        f = "b" if "bold" in s else "i" if ("italic" in s or "underline" in s) else ""
        for i in range(span.start, min(span.end, len(plain))):
            if f and flags[i] != "b":
                flags[i] = f
    out: list[tuple[str, str]] = []
    for ch, f in zip(plain, flags):
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + ch, f)
        else:
            out.append((ch, f))
    return out


def plain(markup: str) -> str:
    return "".join(t for t, _ in runs(markup))


@dataclass
class Example:
    command: str
    description: str = ""


def split_epilog(epilog: str) -> tuple[list[str], list[Example]]:
    """(other paragraphs, examples) of an epilog: lines that start with `ckptctl ` (or `$ ckptctl `)
    are examples; a paragraph ending in ':' just before them describes them; a lone 'Examples'
    heading is dropped."""
    notes: list[str] = []
    examples: list[Example] = []
    pending = ""
    for par in paragraphs(epilog):
        text = plain(par)
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        cmds = [ln[2:] if ln.startswith("$ ") else ln for ln in lines]
        if cmds and all(c.startswith(PROG + " ") or c == PROG or c.startswith("#") for c in cmds):
            desc = pending
            for c in cmds:
                if c.startswith("#"):
                    desc = c.lstrip("# ").strip()
                    continue
                cmd = c
                m = re.match(r"(.*?\S)\s{2,}#\s*(\S.*)$", c)
                if m and m.group(1).count("'") % 2 == 0 and m.group(1).count('"') % 2 == 0:
                    # `ckptctl diff a b    # exit 0: equal` -> the comment describes the command
                    cmd, desc = m.group(1), (desc + " " if desc else "") + m.group(2)
                examples.append(Example(cmd, desc))
                desc = ""
            pending = ""
            continue
        if pending:
            notes.append(pending)
            pending = ""
        if re.fullmatch(r"examples?:?", text.strip(), re.IGNORECASE):
            continue
        if text.strip().endswith(":"):
            pending = par
        else:
            notes.append(par)
    if pending:
        notes.append(pending)
    return notes, examples


# ---- content the man page and the markdown reference share ---------------------------------------
def param_head(p: ParamDoc, opt, var) -> str:
    """The parameter's name as the docs show it: `opt` formats an option name, `var` a metavar."""
    if p.kind == "argument":
        return var(p.metavar or p.name.upper()) + ("..." if p.nargs == -1 else "")
    names = ", ".join(opt(o) for o in sorted(p.opts, key=len))
    if p.secondary_opts:
        names += " / " + ", ".join(opt(o) for o in p.secondary_opts)
    return names + (" " + var(p.metavar) if p.metavar else "")


def param_notes(p: ParamDoc, value) -> list[str]:
    """Optional / Repeatable / choices / default / Required notes; `value` formats a literal."""
    extra = []
    if p.kind == "argument" and not p.required:
        extra.append("Optional.")
    if p.multiple and p.kind == "option" and "repeat" not in plain(p.help).lower():
        extra.append("Repeatable.")
    if p.choices and (not p.metavar or "|" not in p.metavar):
        extra.append("One of: " + ", ".join(value(c) for c in p.choices) + ".")
    if p.default is not None:
        extra.append(f"Default: {value(p.default)}.")
    if p.kind == "option" and p.required:
        extra.append("Required.")
    return extra


def exit_status(tree: CommandDoc) -> list[tuple[str, str]]:
    names = {c.name for c in tree.commands}
    rows = [
        ("0", "Success."),
        (
            "1",
            "Failure: a file that is missing, not a checkpoint, corrupt, unsafe to load, or inputs "
            "that cannot be combined. One line on stderr says which file and why.",
        ),
        ("2", "Usage error: an unknown option, a bad value, or a contradictory request."),
        ("130", "Interrupted (Ctrl-C)."),
    ]
    if "diff" in names:
        rows.append(("diff", "Like diff(1): 0 when the checkpoints are equal, 1 when they differ, 2 on an error."))
    if "scan" in names:
        rows.append(
            (
                "scan",
                "1 when a file asks for a dangerous global (code that would run when it "
                "is loaded with pickle or torch.load).",
            )
        )
    return rows


def completion_install() -> list[tuple[str, str]]:
    return [
        ("bash", "cp completions/ckptctl.bash ~/.local/share/bash-completion/completions/ckptctl"),
        ("zsh", "cp completions/ckptctl.zsh ~/.zfunc/_ckptctl  (with fpath+=(~/.zfunc) before compinit in ~/.zshrc)"),
        ("fish", "cp completions/ckptctl.fish ~/.config/fish/completions/ckptctl.fish"),
        ("any", "ckptctl --install-completion  (installs for the current shell)"),
    ]
