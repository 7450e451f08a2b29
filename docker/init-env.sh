#!/bin/sh
# Write .env for the compose stack from .env.example, filling every empty
# SECRET value with random hex (URL-safe, so it can sit inside database URLs).
# Refuses to overwrite an existing file.
#
#   docker/init-env.sh [TARGET]        # default: .env next to .env.example
set -eu

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
example="$repo_root/.env.example"
target="${1:-$repo_root/.env}"

if [ -e "$target" ]; then
    echo "init-env: $target exists; remove it first to regenerate" >&2
    exit 1
fi

random_hex() {
    # 24 random bytes as 48 hex characters; od is in coreutils everywhere.
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

umask 077
secret_next=no
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        "# SECRET:"*) secret_next=yes ;;
        "#"*|"") ;;
        *)
            # The first assignment after a "# SECRET:" comment is a secret.
            if [ "$secret_next" = yes ]; then
                case "$line" in
                    PREFECT_AUTH_STRING=) line="PREFECT_AUTH_STRING=admin:$(random_hex)" ;;
                    # A Fernet key: 32 random bytes, URL-safe base64.
                    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=) line="${line}$(head -c 32 /dev/urandom | base64 | tr '+/' '-_')" ;;
                    *=) line="${line}$(random_hex)" ;;
                esac
            fi
            secret_next=no
            ;;
    esac
    printf '%s\n' "$line"
done < "$example" > "$target"

echo "init-env: wrote $target (mode 600); keep it out of version control"
