"""Generate the files that document the CLI, from the CLI itself, so they cannot drift.

    python -m ckptctl.docs            rebuild every generated file
    python -m ckptctl.docs --check    exit 1, naming every file that is stale (CI runs this)

Generated from the Typer app (typer.main.get_command(app), Typer's public API):

    completions/ckptctl.bash|zsh|fish   Typer's own scripts (`_CKPTCTL_COMPLETE=source_<shell>`)
    man/ckptctl.1                       the man page (roff)
    docs/cli.md                         the CLI reference
    tests/snapshots/help_*.txt          `--help` of every command (COLUMNS=100, no colour)

Everything is built in memory first; nothing depends on the date, the terminal or the machine.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import inspect
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

PROG = "ckptctl"
HELP_COLUMNS = 100
SNAPSHOT_DIR = "tests/snapshots"
SHELLS = ("bash", "zsh", "fish")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]")

ENVIRONMENT = [
    ("CKPTCTL_DEBUG", "Set to 1 to print the full traceback along with an error message."),
    ("NO_COLOR", "When set (to anything but the empty string), no colour in any output; the same "
                 "as --no-color. Tables are plain text whenever stdout is not a terminal."),
    ("COLUMNS", "Width of the terminal in characters; tables elide long names to fit it "
                "(--wide shows them in full)."),
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
    if (not getattr(p, "required", False) and getattr(p, "show_default", True) is not False
            and not callable(d) and d not in (None, False, (), []) and not is_flag):
        d = getattr(d, "value", d)
        default = ", ".join(str(getattr(x, "value", x)) for x in d) if isinstance(d, (list, tuple)) else str(d)
    return ParamDoc(
        kind=kind, name=p.name, opts=list(p.opts), secondary_opts=list(getattr(p, "secondary_opts", [])),
        metavar=metavar, help=getattr(p, "help", None) or "", default=default, choices=choices,
        required=bool(getattr(p, "required", False)), multiple=bool(getattr(p, "multiple", False)),
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
    short = getattr(cmd, "short_help", None) or (_paragraphs(help_text)[0] if help_text else "")
    doc = CommandDoc(
        name=name, path=path, help=help_text, short_help=_clean_help(short),
        epilog=_clean_help(getattr(cmd, "epilog", None)), params=params,
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
def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_pre(par: str) -> bool:
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
    for par in _paragraphs(epilog):
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


# ---- roff ---------------------------------------------------------------------------------------
_OPTION_WORD = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def roff_text(text: str, dashes: bool = False) -> str:
    """Escape plain text for roff: backslashes, option dashes (all dashes with `dashes`),
    non-ASCII as \\[uXXXX]."""
    s = text.replace("\\", "\\e")
    if dashes:
        s = s.replace("-", "\\-")
    else:
        s = _OPTION_WORD.sub(lambda m: m.group(1).replace("-", "\\-"), s)
    return "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in s)


def roff_synopsis(text: str) -> str:
    """'[OPTIONS] PATH...' with the placeholders in italics."""
    return re.sub(r"[A-Z][A-Z0-9_]+", lambda m: f"\\fI{m.group(0)}\\fR", roff_text(text, dashes=True))


def roff_markup(markup: str) -> str:
    """Rich markup (bold, italic) and `code` spans as roff font escapes."""
    out = []
    for text, style in runs(markup):
        parts = re.split(r"(`[^`\n]+`)", text)
        for part in parts:
            if len(part) > 2 and part.startswith("`") and part.endswith("`"):
                out.append("\\fB" + roff_text(part[1:-1]) + "\\fR")
            elif style == "b":
                out.append("\\fB" + roff_text(part) + "\\fR" if part else "")
            elif style == "i":
                out.append("\\fI" + roff_text(part) + "\\fR" if part else "")
            else:
                out.append(roff_text(part))
    return "".join(out)


def _roff_lines(text: str) -> list[str]:
    """Lines safe to put in a roff file: none starts with '.', "'" or a space."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if line[0] in ".'":
            line = "\\&" + line
        out.append(line)
    return out


def _roff_paragraphs(markup: str, first_pp: bool = False) -> list[str]:
    out: list[str] = []
    for i, par in enumerate(_paragraphs(markup)):
        if i or first_pp:
            out.append(".PP")
        if _is_pre(par):
            out += [".RS 4", ".nf"]
            for line in plain(par).strip("\b").split("\n"):
                if line.strip():
                    out.append("\\&" + roff_text(line.strip(), dashes=True))
            out += [".fi", ".RE"]
        else:
            out += _roff_lines(roff_markup(" ".join(ln.strip() for ln in par.split("\n"))))
    return out


def _param_head(p: ParamDoc, opt, var) -> str:
    """The parameter's name as the docs show it: `opt` formats an option name, `var` a metavar."""
    if p.kind == "argument":
        return var(p.metavar or p.name.upper()) + ("..." if p.nargs == -1 else "")
    names = ", ".join(opt(o) for o in sorted(p.opts, key=len))
    if p.secondary_opts:
        names += " / " + ", ".join(opt(o) for o in p.secondary_opts)
    return names + (" " + var(p.metavar) if p.metavar else "")


def _param_notes(p: ParamDoc, value) -> list[str]:
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


def _roff_param(p: ParamDoc) -> list[str]:
    head = _param_head(p, lambda o: f"\\fB{roff_text(o, dashes=True)}\\fR", lambda v: f"\\fI{roff_text(v)}\\fR")
    lines = [".TP", head]
    body = roff_markup(" ".join(p.help.split())) if p.help else ""
    text = " ".join(x for x in [body, *_param_notes(p, roff_text)] if x)
    lines += _roff_lines(text) or ["\\&"]
    return lines


def _exit_status(tree: CommandDoc) -> list[tuple[str, str]]:
    names = {c.name for c in tree.commands}
    rows = [
        ("0", "Success."),
        ("1", "Failure: a file that is missing, not a checkpoint, corrupt, unsafe to load, or inputs "
              "that cannot be combined. One line on stderr says which file and why."),
        ("2", "Usage error: an unknown option, a bad value, or a contradictory request."),
        ("130", "Interrupted (Ctrl-C)."),
    ]
    if "diff" in names:
        rows.append(("diff", "Like diff(1): 0 when the checkpoints are equal, 1 when they differ, "
                             "2 on an error."))
    if "scan" in names:
        rows.append(("scan", "1 when a file asks for a dangerous global (code that would run when it "
                             "is loaded with pickle or torch.load)."))
    return rows


def _completion_install() -> list[tuple[str, str]]:
    return [
        ("bash", "cp completions/ckptctl.bash ~/.local/share/bash-completion/completions/ckptctl"),
        ("zsh", "cp completions/ckptctl.zsh ~/.zfunc/_ckptctl  (with fpath+=(~/.zfunc) before compinit in ~/.zshrc)"),
        ("fish", "cp completions/ckptctl.fish ~/.config/fish/completions/ckptctl.fish"),
        ("any", "ckptctl --install-completion  (installs for the current shell)"),
    ]


def render_man(tree: CommandDoc, version: str) -> str:
    L: list[str] = [
        ".\\\" Generated by `python -m ckptctl.docs` from the Typer app. Do not edit.",
        f'.TH CKPTCTL 1 "" "ckptctl {roff_text(version)}" "User Commands"',
        ".nh",  # no hyphenation: option names and paths stay whole
        ".ad l",
        ".SH NAME",
        f"ckptctl \\- {roff_text(_lower_first(plain(_paragraphs(tree.help)[0]) if tree.help else ''))}",
        ".SH SYNOPSIS",
    ]
    for i, c in enumerate([tree, *tree.commands]):
        if i:
            L.append(".br")
        rest = c.synopsis()[len(c.path):].strip()
        L.append(f'.B "{c.path}"')
        if rest:
            L.append(roff_synopsis(rest))
    L.append(".SH DESCRIPTION")
    L += _roff_paragraphs(tree.help)
    L.append(".PP")
    L.append("Global options go before the command; \\fB\\-q\\fR, \\fB\\-v\\fR and \\fB\\-\\-no\\-color\\fR "
             "also work after it. Every command takes \\fB\\-h\\fR/\\fB\\-\\-help\\fR.")
    if tree.options:
        L.append(".SH GLOBAL OPTIONS")
        for p in tree.options:
            L += _roff_param(p)
    L.append(".SH COMMANDS")
    for c in tree.commands:
        L.append(f'.SS "{roff_text(c.path, dashes=True)}"')
        L.append(f"\\fB{roff_text(c.path, dashes=True)}\\fR {roff_synopsis(c.synopsis()[len(c.path):].strip())}".rstrip())
        L.append(".PP")
        notes, _ = split_epilog(c.epilog)
        L += _roff_paragraphs("\n\n".join([c.help, *notes]) if c.help or notes else c.short_help)
        if c.arguments:
            L += [".PP", "Arguments:", ".RS 4"]
            for p in c.arguments:
                L += _roff_param(p)
            L.append(".RE")
        if c.options:
            L += [".PP", "Options:", ".RS 4"]
            for p in c.options:
                L += _roff_param(p)
            L.append(".RE")
    L.append(".SH EXIT STATUS")
    for code, text in _exit_status(tree):
        L += [".TP", f"\\fB{roff_text(code)}\\fR", *_roff_lines(roff_markup(text))]
    L.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        L += [".TP", f"\\fB{roff_text(name, dashes=True)}\\fR", *_roff_lines(roff_markup(text))]
    L.append(".SH SHELL COMPLETION")
    L.append("Completion scripts for bash, zsh and fish are generated into \\fIcompletions/\\fR of the "
             "source tree. Install one of them:")
    L += [".RS 4", ".nf"]
    for shell, how in _completion_install():
        L.append("\\&" + roff_text(f"{shell + ':':6}{how}", dashes=True))
    L += [".fi", ".RE", ".PP",
          "They complete commands, options, choices, paths, and tensor names after \\fB\\-\\-filter\\fR "
          "(read from the checkpoint already on the command line)."]
    examples = [(c, ex) for c in tree.commands for ex in split_epilog(c.epilog)[1]]
    if examples:
        L.append(".SH EXAMPLES")
        for _c, ex in examples:
            if ex.description:
                L.append(".PP")
                L += _roff_lines(roff_markup(ex.description[:1].upper() + ex.description[1:]))
                L += [".RS 4", ".nf", "\\&" + roff_text(ex.command, dashes=True), ".fi", ".RE"]
            else:
                L += [".PP", ".RS 4", ".nf", "\\&" + roff_text(ex.command, dashes=True), ".fi", ".RE"]
    L += [".SH SEE ALSO", roff_text(SEE_ALSO), ".PP",
          "The CLI reference \\fIdocs/cli.md\\fR, generated from the same source as this page."]
    return "\n".join(L) + "\n"


def _lower_first(s: str) -> str:
    s = s.strip().rstrip(".")
    return s[:1].lower() + s[1:] if s[1:2].islower() or len(s) < 2 else s


# ---- markdown -----------------------------------------------------------------------------------
def md_markup(markup: str) -> str:
    out = []
    for text, style in runs(markup):
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()):]
        core = text.strip()
        if not core or style == "":
            out.append(text)
        elif style == "b":
            out.append(f"{lead}**{core}**{trail}")
        else:
            out.append(f"{lead}*{core}*{trail}")
    return "".join(out)


def _md_cell(markup: str) -> str:
    return md_markup(" ".join(markup.split())).replace("|", "\\|")


def _md_paragraphs(markup: str) -> list[str]:
    out = []
    for par in _paragraphs(markup):
        if _is_pre(par):
            out.append("```\n" + "\n".join(ln.strip() for ln in plain(par).strip("\b").split("\n") if ln.strip()) + "\n```")
        else:
            out.append(md_markup(" ".join(ln.strip() for ln in par.split("\n"))))
    return out


def _md_params(params: list[ParamDoc], kind: str) -> list[str]:
    if not params:
        return []
    rows = [f"**{kind}**", "", "| | |", "|---|---|"]
    for p in params:
        if p.kind == "argument":
            name = _param_head(p, lambda o: f"`{o}`", lambda v: f"`{v}`")
        else:
            name = _param_head(p, lambda o: f"`{o}`", lambda v: f"`{v}`".replace("|", "\\|"))
        extra = _param_notes(p, lambda v: f"`{v}`")
        text = " ".join(x for x in [_md_cell(p.help), *extra] if x).replace("|", "\\|") if extra else _md_cell(p.help)
        rows.append(f"| {name} | {text} |")
    return rows + [""]


def render_markdown(tree: CommandDoc, version: str) -> str:
    L = [
        "# ckptctl command-line reference",
        "",
        f"<!-- Generated by `python -m ckptctl.docs` from the Typer app (ckptctl {version}). Do not edit: "
        "change the help texts in src/ckptctl/cli/ and rerun it. -->",
        "",
    ]
    L += [p + "\n" for p in _md_paragraphs(tree.help)]
    L += ["```", tree.synopsis(), "```", ""]
    L += ["Global options go before the command; `-q`, `-v` and `--no-color` also work after it. "
          "Every command takes `-h`/`--help`.", ""]
    L += _md_params(tree.options, "Global options")
    L += ["## Commands", "", "| command | |", "|---|---|"]
    for c in tree.commands:
        L.append(f"| [`{c.name}`](#{c.slug}) | {_md_cell(c.short_help)} |")
    L.append("")
    for c in tree.commands:
        L += [f'<a id="{c.slug}"></a>', "", f"## {c.path}", ""]
        notes, examples = split_epilog(c.epilog)
        L += ["```", c.synopsis(), "```", ""]
        L += [p + "\n" for p in _md_paragraphs("\n\n".join([c.help, *notes]) if c.help or notes else c.short_help)]
        L += _md_params(c.arguments, "Arguments")
        L += _md_params(c.options, "Options")
        if examples:
            L += ["**Examples**", "", "```sh"]
            for ex in examples:
                if ex.description:
                    L.append("# " + plain(ex.description).strip())
                L.append(ex.command)
            L += ["```", ""]
    L += ["## Exit status", "", "| code | meaning |", "|---|---|"]
    for code, text in _exit_status(tree):
        L.append(f"| {code} | {_md_cell(text)} |")
    L += ["", "## Environment", "", "| variable | effect |", "|---|---|"]
    for name, text in ENVIRONMENT:
        L.append(f"| `{name}` | {_md_cell(text)} |")
    L += ["", "## Shell completion", "", "```sh"]
    for shell, how in _completion_install():
        L.append(f"# {shell}\n{how.split('  (')[0]}")
    L += ["```", ""]
    return "\n".join(L).rstrip("\n") + "\n"


# ---- help snapshots and completion scripts (through the CLI itself) -----------------------------
def _invoke(app, args: list[str], env: dict[str, str]) -> str:
    from typer.testing import CliRunner

    from ckptctl.cli import output

    output.STATE.__init__()
    base = {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": str(HELP_COLUMNS), "LINES": "50"}
    base.update(env)
    result = CliRunner().invoke(app, args, env=base, prog_name=PROG, catch_exceptions=False)
    return result.stdout


def normalize_help(text: str) -> str:
    """What a help snapshot stores: no escape codes, no trailing spaces, one final newline."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def help_text(args: list[str], app=None) -> str:
    """`ckptctl ARGS --help` as a snapshot stores it."""
    if app is None:
        from ckptctl.cli.app import app
    return normalize_help(_invoke(app, [*args, "--help"], {}))


def completion_script(shell: str, app=None) -> str:
    if app is None:
        from ckptctl.cli.app import app
    text = _invoke(app, [], {"_CKPTCTL_COMPLETE": f"source_{shell}"})
    if not text.strip():
        raise RuntimeError(f"Typer printed no {shell} completion script")
    return text.rstrip("\n") + "\n"


def snapshot_name(path: str) -> str:
    return f"{SNAPSHOT_DIR}/help_{path.replace(' ', '_')}.txt"


def generate(app=None) -> dict[str, str]:
    """Every generated file: relative path -> content."""
    from ckptctl import __version__

    if app is None:
        from ckptctl.cli.app import app
    tree = command_tree(app)
    files: dict[str, str] = {}
    for shell in SHELLS:
        files[f"completions/ckptctl.{shell}"] = completion_script(shell, app)
    files["man/ckptctl.1"] = render_man(tree, __version__)
    files["docs/cli.md"] = render_markdown(tree, __version__)
    files[snapshot_name(PROG)] = help_text([], app)
    for c in tree.commands:
        files[snapshot_name(c.path)] = help_text(c.path.split()[1:], app)
    return files


def _orphans(root: Path, files: dict[str, str]) -> list[str]:
    """Help snapshots of commands that no longer exist."""
    d = root / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    return sorted(
        f"{SNAPSHOT_DIR}/{p.name}" for p in d.glob("help_*.txt") if f"{SNAPSHOT_DIR}/{p.name}" not in files
    )


def stale(root: Path, files: dict[str, str]) -> list[tuple[str, str]]:
    """[(relative path, why)] for every file that differs from what the app generates."""
    out = []
    for rel, content in files.items():
        p = root / rel
        if not p.is_file():
            out.append((rel, "missing"))
        elif p.read_text(encoding="utf-8") != content:
            out.append((rel, "out of date"))
    out += [(rel, "no such command any more") for rel in _orphans(root, files)]
    return out


def write(root: Path, files: dict[str, str]) -> list[str]:
    """Write what changed (atomically, each file) and delete orphan snapshots; the paths touched."""
    changed = []
    for rel, why in stale(root, files):
        p = root / rel
        if rel not in files:
            p.unlink()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(files[rel], encoding="utf-8")
            os.replace(tmp, p)
        changed.append(f"{rel} ({'deleted' if rel not in files else why})")
    return changed


def default_root() -> Path:
    """The source tree this module lives in (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").is_file() and (here / "src" / "ckptctl").is_dir():
        return here
    return Path.cwd()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ckptctl.docs",
        description="Rebuild the completions, man page, CLI reference and help snapshots from the app.",
    )
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every stale file")
    ap.add_argument("--diff", action="store_true", help="with --check, also print a unified diff")
    ap.add_argument("--root", type=Path, default=None, help="the source tree (default: %(default)s)")
    a = ap.parse_args(argv)
    root = (a.root or default_root()).resolve()
    files = generate()
    if a.check:
        bad = stale(root, files)
        for rel, why in bad:
            print(f"stale: {rel}: {why}", file=sys.stderr)
            if a.diff and rel in files:
                p = root / rel
                old = p.read_text(encoding="utf-8").splitlines(keepends=True) if p.is_file() else []
                sys.stdout.writelines(difflib.unified_diff(old, files[rel].splitlines(keepends=True),
                                                           f"a/{rel}", f"b/{rel}"))
        if bad:
            print(f"{len(bad)} generated file(s) out of date in {root}: run `python -m ckptctl.docs`",
                  file=sys.stderr)
            return 1
        print(f"all {len(files)} generated files are up to date", file=sys.stderr)
        return 0
    changed = write(root, files)
    for c in changed:
        print(f"wrote {c}", file=sys.stderr)
    print(f"{len(changed)} of {len(files)} generated files changed in {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
