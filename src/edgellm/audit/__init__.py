"""The tamper-evident audit log: one HMAC-chained record per API request in the data
directory's database, keyed by a secret kept outside it.

    key       the audit key file ($EDGELLM_HOME/audit.key), made 0600 on first use
    chain     what a record's MAC covers, and `verify`, which names the first record that
              was changed, deleted, inserted or reordered
    writer    the thread that numbers, chains and stores records off the request path
    query     reading the log for `edgellm audit` (read-only)

The server's side (pairing each HTTP exchange with its pipeline record, refusing requests while
the log cannot be written) is `edgellm.server.audit`.
"""
