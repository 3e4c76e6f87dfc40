"""The `certkv` command (server/console.py) without installing it: every command reaches its module's parser under
its own name, and a missing or unknown command prints the list (the installed command: tests/test_packaging.py)."""

import pytest

from server import console


@pytest.mark.parametrize("command", sorted(console.COMMANDS))
def test_every_command_reaches_its_parser(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        console.main([command, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: certkv {command} ")


@pytest.mark.parametrize("argv,code", [([], 2), (["--help"], 0), (["bogus"], 2)])
def test_the_list_of_commands(argv, code, capsys):
    assert console.main(argv) == code
    out = capsys.readouterr()
    assert all(f"  {name} " in out.out + out.err for name in console.COMMANDS)
