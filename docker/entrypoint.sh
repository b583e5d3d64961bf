#!/bin/sh
# Entry point of the ticketgate image: migrate the database, then become the role.
#
#   ticketgate-entrypoint smtp|imap|api|worker|serve [ARGS...]  -> db upgrade, exec ticketgate ROLE
#   ticketgate-entrypoint OTHER-TICKETGATE-COMMAND [ARGS...]    -> exec ticketgate COMMAND
#   ticketgate-entrypoint PROGRAM [ARGS...]                     -> exec PROGRAM (celery, sh, ...)
#
# The upgrade is retried while the database is still starting (TICKETGATE_DB_WAIT seconds,
# default 60); concurrent upgrades from several containers are serialised by the database
# (a PostgreSQL advisory lock), so every role can run it.  TICKETGATE_SKIP_DB_UPGRADE=1 skips it.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve|smtp|imap|api|worker)
        if [ "${TICKETGATE_SKIP_DB_UPGRADE:-0}" != "1" ]; then
            waited=0
            until ticketgate db upgrade; do
                if [ "$waited" -ge "${TICKETGATE_DB_WAIT:-60}" ]; then
                    echo "ticketgate-entrypoint: database upgrade failed for ${waited}s; giving up" >&2
                    exit 1
                fi
                echo "ticketgate-entrypoint: database not ready; retrying in 2s" >&2
                sleep 2
                waited=$((waited + 2))
            done
        fi
        exec ticketgate "$@"
        ;;
    db|replay|quarantine|trace|check-config|check-health|--help)
        exec ticketgate "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
