"""``cpg-daemon COMMAND --help``: what the command does, and an example of it."""

from __future__ import annotations

import argparse

import pytest

from cpg_daemon.cli.main import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_says_what_it_does_and_shows_itself_in_an_example(name: str) -> None:
    parser = _commands()[name]
    text = parser.format_help()
    assert parser.description, name
    assert parser.description.splitlines()[0] in text
    examples = text[text.index("\nexample") :]
    assert f"cpg-daemon {name}" in examples, text
    # Examples keep their lines (a continued command stays continued).
    for line in examples.splitlines():
        assert len(line) <= 100, line


def test_upload_config_help_promises_only_what_upload_reads() -> None:
    """upload reads -c, else $CPG_DAEMON_CONFIG; never /etc/cpg-daemon/config.toml."""
    upload = _commands()["upload"]
    (config,) = [a for a in upload._actions if "--config" in a.option_strings]
    assert config.help is not None
    assert "/etc/cpg-daemon" not in config.help and "$CPG_DAEMON_CONFIG" in config.help
