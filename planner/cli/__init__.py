"""The `offplan` command line: typer commands (app.py, run_cmds.py) and rich rendering."""


def main() -> None:
    """Entry point of the `offplan` script (imports the commands only when called)."""
    from planner.cli.app import main as app_main

    app_main()
