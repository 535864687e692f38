"""MLflow accounts for the services, made by the MLflow admin (basic-auth app).

    MLFLOW_TRACKING_URI=... MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    LEUKOFED_MLFLOW_PASSWORD_AGGREGATOR=... python -m registry.users aggregator inference

Creates each named user with the password in ``LEUKOFED_MLFLOW_PASSWORD_<NAME>``, or sets
that password when the user exists: idempotent, so compose runs it at every start. New
users get the server's default permission (READ in infra/mlflow/basic_auth.ini); what a
user creates (the aggregator's experiment and registered model) it manages.
"""

from __future__ import annotations

import os
import sys

PASSWORD_ENV = "LEUKOFED_MLFLOW_PASSWORD_"


def ensure_users(tracking_uri: str, passwords: dict[str, str]) -> list[str]:
    """Create or update each user; returns what was done, one line per user."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    admin = get_app_client("basic-auth", tracking_uri=tracking_uri)
    done = []
    for user, password in passwords.items():
        try:
            admin.get_user(user)
        except MlflowException:
            admin.create_user(user, password)
            done.append(f"created user {user}")
            continue
        admin.update_user_password(user, password)
        done.append(f"user {user} exists; password set")
    return done


def main(argv: list[str] | None = None) -> None:
    names = sys.argv[1:] if argv is None else argv
    missing = [n for n in names if not os.environ.get(PASSWORD_ENV + n.upper())]
    if not names or missing:
        sys.exit(f"give user names, each with {PASSWORD_ENV}<NAME> set"
                 + (f" (missing: {', '.join(missing)})" if missing else ""))
    uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    for line in ensure_users(uri, {n: os.environ[PASSWORD_ENV + n.upper()] for n in names}):
        print(line)


if __name__ == "__main__":
    main()
