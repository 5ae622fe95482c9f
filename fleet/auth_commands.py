"""``quantfleet auth``: make operator tokens, device artifact credentials and console
passwords.

A token is printed once, beside the config line that holds its hash; the fleet
never stores or logs the token itself (``fleet/auth.py``).
"""

from __future__ import annotations

import json

import click
from pydantic import ValidationError

from .auth import issue_device_credential, issue_operator_token, toml_entry
from .config import DeviceToken, OperatorToken


@click.group(name="auth")
def auth_group() -> None:
    """Credentials for the fleet's HTTP server (docs/security.md)."""


def _show(token: str, entry: OperatorToken | DeviceToken, table: str, holder: str,
          as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"token": token, table: entry.model_dump()}))
        return
    click.echo(f"token for {holder} (shown once; the fleet keeps only its hash):\n  {token}\n"
               f"add to [http.auth] {table} (fleet.toml or the credentials file):\n"
               f"  {toml_entry(entry)}")


@auth_group.command(name="token")
@click.argument("name")
@click.option("--role", "roles", type=click.Choice(["read", "write"]), multiple=True,
              default=("read",), show_default=True, help="A role to grant (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def auth_token(name: str, roles: tuple[str, ...], as_json: bool) -> None:
    """Make an operator token: print it once, and the config line with its hash.

    \b
    Example:
      quantfleet auth token alice --role read
    """
    try:
        token, entry = issue_operator_token(name, list(dict.fromkeys(roles)))  # type: ignore[arg-type]
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="NAME") from None
    _show(token, entry, "operators", f"operator {name}", as_json)


@auth_group.command(name="device-token")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def auth_device_token(device_id: str, as_json: bool) -> None:
    """Make a device's artifact credential (enrolment issues one too).

    The device reads it from $CREDENTIALS_DIRECTORY/artifact-token or
    $QUANTFLEET_ARTIFACT_TOKEN ([update] in its agent.toml).

    \b
    Example:
      quantfleet auth device-token kiosk-17
    """
    try:
        token, entry = issue_device_credential(device_id)
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="DEVICE_ID") from None
    _show(token, entry, "devices", f"device {device_id}", as_json)


@auth_group.command(name="password")
@click.argument("name")
@click.option("--role", "roles", type=click.Choice(["read", "write"]), multiple=True,
              default=("read",), show_default=True, help="A role to grant (repeatable).")
@click.password_option("--password", help="The password (prompted for, twice, if not given).")
def auth_password(name: str, roles: tuple[str, ...], password: str) -> None:
    """Make a web-console login: print the [console] users line with the password's
    scrypt hash (the fleet never stores the password).

    \b
    Example:
      quantfleet auth password alice --role read --role write
    """
    from .config import ConsoleUser
    from .console.sessions import hash_password

    if len(password) < 12:
        raise click.BadParameter("use at least 12 characters", param_hint="--password")
    try:
        user = ConsoleUser(name=name, password_scrypt=hash_password(password),
                           roles=list(dict.fromkeys(roles)))
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="NAME") from None
    click.echo("add to [console] users (fleet.toml):\n  " + toml_entry(user))
