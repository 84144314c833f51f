# A chDB clickhouse-local kept alive as a server, for scripts/deps.sh (the dev server) and
# the ClickHouse clusters tests start (services/kit/src/testing/clickhouse.rs).
#
#   python clickhouse_server.py DATA_DIR LISTENERS [TAG]
#
# chDB's Python Session cannot open listeners, but chdb._chdb.query() runs a whole
# clickhouse-local (LocalServer) invocation, which can: SYSTEM START LISTEN <kind> opens each
# listener of LISTENERS (comma separated: HTTP, TCP) on the ports of ./config.xml (the working
# directory), and the following never-ending query keeps that clickhouse-local alive.
# sleepEachRow(1) over one-row blocks wakes once a second, so the process is idle; it shows in
# system.processes, and a KILL QUERY on it stops the server. "TabSeparated" makes that the
# default output format over HTTP, as on a real server (clickhouse-local's is CSV). TAG only
# names the process, so that pid checks can recognise it.
import sys

import chdb._chdb as c

listen = "".join(f"SYSTEM START LISTEN {kind.strip()}; " for kind in sys.argv[2].split(","))
r = c.query(
    listen + "SELECT sleepEachRow(1) FROM system.numbers SETTINGS max_block_size = 1 FORMAT Null",
    "TabSeparated",
    path=sys.argv[1],
)
print("clickhouse_server: the keep-alive query ended:", r.error_message() if r.has_error() else "no error", file=sys.stderr)
sys.exit(1)
