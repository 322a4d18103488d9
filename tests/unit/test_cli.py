import subprocess
import sys

from l7proxy import __version__
from l7proxy.cli import main


def test_version_subcommand_prints_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"l7proxy {__version__}"


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "l7proxy", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "version" in out and "usage: l7proxy" in out
