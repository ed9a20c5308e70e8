#!/usr/bin/env bash
# Start the local PostgreSQL the tests use, if it is not running. Prints the URL to use.
set -u
host=127.0.0.1
if ! pg_isready -q -h "$host" -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
    for _ in $(seq 1 30); do pg_isready -q -h "$host" -p 5432 && break; sleep 1; done
  fi
fi
if pg_isready -q -h "$host" -p 5432 2>/dev/null; then
  # The tests' default: user postgres without a password, database "test". A server that
  # wants a password or lacks the database is not an error: say what to set instead.
  if command -v psql >/dev/null 2>&1 && ! psql -h "$host" -p 5432 -U postgres -d test -w -Atc "select 1" >/dev/null 2>&1; then
    echo "PostgreSQL at $host:5432 does not let user postgres into database test without a password;" \
      "set ATELIER_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE to run its tests" >&2
    exit 0
  fi
  echo "postgresql+asyncpg://postgres@$host:5432/test"
fi
