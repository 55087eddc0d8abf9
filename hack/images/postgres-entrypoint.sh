#!/bin/sh
# The entrypoint of localhost/postgres:15-debian (hack/images/build). It keeps
# the part of the official postgres image's interface that the operator's
# managed database uses (src/database/managed.rs): POSTGRES_PASSWORD sets the
# superuser `postgres`'s password when an empty PGDATA is initialised, and the
# server then listens on *:5432 with password (SCRAM) authentication. Unlike
# the official image it never runs as root: the pod's restricted security
# context starts it as uid 999 with no capabilities, so there is no switch of
# user to make and no ownership to fix.
set -eu

# As the official image: options alone mean options for postgres.
case "${1:-}" in
'' | -*) set -- postgres "$@" ;;
esac

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
	if [ -z "${POSTGRES_PASSWORD:-}" ]; then
		echo "error: PGDATA $PGDATA is empty and POSTGRES_PASSWORD is not set: the superuser needs a password" >&2
		exit 1
	fi
	mkdir -p "$PGDATA"
	chmod 0700 "$PGDATA"
	# The password reaches initdb through a pipe, never a file on a volume.
	printf '%s\n' "$POSTGRES_PASSWORD" | initdb \
		--pgdata="$PGDATA" \
		--username=postgres \
		--pwfile=/proc/self/fd/0 \
		--auth-local=scram-sha-256 \
		--auth-host=scram-sha-256 \
		--encoding=UTF8 \
		--locale=C.UTF-8
	# initdb allows loopback clients only; the servers and the operator come
	# from other pods.
	printf '\nhost all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
	printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
fi

exec "$@"
