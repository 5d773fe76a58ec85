"""Write edge-agent(1), in roff, from the CLI's own click help (packaging/build_deb.sh).

One page for the whole tool, every command and option in it, so `man edge-agent` says
what `edge-agent ... --help` says and cannot drift from it. (click-man would write one
page per subcommand and leave edge-agent(1) itself without them.)

    python packaging/manpage.py OUT.1 [--date YYYY-MM-DD]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def roff(text: str) -> str:
    """Escape text for roff: backslashes, minus signs, and control characters at line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"(?m)^([.'])", r"\\&\1", text)


def paragraphs(text: str) -> str:
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        if para.lstrip().startswith("\b"):  # click's "don't rewrap" marker: keep the lines
            lines = para.lstrip()[1:].strip("\n").splitlines()
            out.append(".nf\n" + roff("\n".join(lines)) + "\n.fi")
        else:
            out.append(roff(" ".join(para.split())))
    return "\n.PP\n".join(out)


def options(cmd: click.Command, ctx: click.Context, *, with_help: bool = False) -> list[str]:
    lines = []
    for param in cmd.get_params(ctx):
        if param.name == "help" and not with_help:  # said once, for the tool
            continue
        record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
        if record is None:  # hidden options; arguments are in the usage line
            continue
        names, help_text = record
        lines += [".TP", f"\\fB{roff(names)}\\fR"]
        lines.append(roff(" ".join(help_text.split())) if help_text else "")
    return lines


def command_sections(group: click.Group, ctx: click.Context, prefix: str) -> list[str]:
    lines = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        lines += [".SS", f"\\fB{roff(prefix + ' ' + name)}\\fR {roff(usage)}"]
        if cmd.help:
            lines.append(paragraphs(click.unstyle(cmd.help)))
        lines += options(cmd, sub)
        if isinstance(cmd, click.Group):
            lines += command_sections(cmd, sub, f"{prefix} {name}")
    return lines


def render(date: str) -> str:
    sys.path.insert(0, str(ROOT))
    from agent import __version__
    from agent.cli import cli

    ctx = cli.make_context("edge-agent", [], resilient_parsing=True)  # with context_settings
    summary = (cli.help or "").strip().splitlines()[0].rstrip(".") if cli.help else ""
    lines = [
        f'.TH EDGE\\-AGENT 1 "{date}" "edge\\-agent {roff(__version__)}" "User Commands"',
        ".SH NAME",
        f"edge\\-agent \\- {roff(summary or 'plant-edge store-and-forward agent')}",
        ".SH SYNOPSIS",
        f"\\fBedge\\-agent\\fR {roff(' '.join(cli.collect_usage_pieces(ctx)))}",
        ".SH DESCRIPTION",
        paragraphs(click.unstyle(cli.help or "")),
        ".SH OPTIONS",
        *options(cli, ctx, with_help=True),
        ".SH COMMANDS",
        *command_sections(cli, ctx, "edge-agent"),
        ".SH FILES",
        ".TP",
        "\\fI/etc/edge\\-agent/edge\\-agent.toml\\fR",
        "the configuration the systemd unit runs with",
        ".TP",
        "\\fI/var/lib/edge\\-agent/\\fR",
        "the buffer and adapter state",
        ".TP",
        "\\fI/usr/share/doc/edge\\-agent/examples/\\fR",
        "one sample configuration per source and sink type",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), /usr/share/doc/edge\\-agent/install.md",
    ]
    return "\n".join(line for line in lines if line != "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args()
    args.out.write_text(render(args.date), encoding="utf-8")


if __name__ == "__main__":
    main()
